"""A rank that reconnects (the same process resuming its session) keeps its verified step clock.

The coordinator forgot a rank's step-clock probes and verdicts at every registration. A new
process may count from anywhere, so for it that is right; but an agent that reopened its socket
(a coordinator that went silent, a slow host) or was declared dead and came back is the same
process counting the same steps. Forgotten, its clock was unverified again until a new decisive
probe came: the status said ``step_clock_offset: None`` (seen for rank 1 in a real-vLLM DP 2
run), the step-clock watch could not see that rank counting apart meanwhile, and planning waited
up to ``step_clock_grace_s`` (then went on without the check, warned about only the first time).
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
from plan_harness import beat, harness, hello_again

from eplb_service import protocol
from eplb_service.step_clock import PROBE_EVERY, PROBE_RADIUS

STEP_S = 0.05


def clock(first_probe: int, probes: int, jitter_s: float = 0.0, seed: int = 0) -> protocol.StepClock:
    """Probes of a rank stepping every ``STEP_S`` (``jitter_s``: noise on each end time; a step's
    worth or two makes them decide nothing, as on a loaded CPU host)."""
    rng = np.random.default_rng(seed)
    steps = [first_probe + i * PROBE_EVERY for i in range(probes)]
    times = [
        [
            (k + d) * STEP_S + (rng.normal(0.0, jitter_s) if jitter_s else 0.0)
            for d in range(-PROBE_RADIUS, PROBE_RADIUS + 1)
        ]
        for k in steps
    ]
    return protocol.StepClock(probe_steps=steps, times=times, radius=PROBE_RADIUS, wall_minus_mono=0.0)


def offsets(c) -> list:
    return [r["step_clock_offset"] for r in c.status()["ranks"]]


def verified_then_hello(resume: bool):
    """Both ranks' clocks verified on decisive probes; later probes (past rank 1's step ring) are
    all jittery; then rank 1 sends a Hello, resuming its session or as a new process."""
    c, _ = harness()
    for rank in (0, 1):
        beat(c, rank, step=100, epoch=0, clock=clock(32, 2))
    assert offsets(c) == [0, 0]
    for rank in (0, 1):
        beat(c, rank, step=2100, epoch=0, clock=clock(1056, 32, jitter_s=2 * STEP_S, seed=rank))
    assert offsets(c) == [0, 0]  # the verdict stands on the earlier probes
    r1 = c.registry.agents[1]
    if not resume:
        c.router.lose_agent(r1, time.monotonic())  # the old process is gone
    hello = hello_again(
        c, 1, step=2100, resume_session=r1.session if resume else 0, node=r1.node, pid=r1.pid if resume else r1.pid + 1
    )
    c._handle(b"rank-1-reopened", hello)
    assert c.registry.agents[1].identity == b"rank-1-reopened"
    beat(c, 1, step=2110, epoch=0, clock=clock(1056, 32, jitter_s=2 * STEP_S, seed=1))  # its ring: jittery alone
    return c


def test_a_rank_resuming_its_session_keeps_its_verified_step_clock():
    """Before: ``[0, None]``, and planning held back for ``step_clock_grace_s`` (60 s)."""
    c = verified_then_hello(resume=True)
    assert offsets(c) == [0, 0]
    assert c.clock_allows_planning(time.monotonic())


def test_a_rank_declared_dead_and_back_with_its_session_keeps_its_verified_step_clock():
    c, _ = harness()
    for rank in (0, 1):
        beat(c, rank, step=100, epoch=0, clock=clock(32, 2))
    r1 = c.registry.agents[1]
    c.router.lose_agent(r1, time.monotonic())  # silent past the liveness timeout
    c._handle(b"rank-1-back", hello_again(c, 1, step=100, resume_session=r1.session, node=r1.node, pid=r1.pid))
    assert offsets(c) == [0, 0]


def test_a_new_process_in_the_rank_starts_its_step_clock_over():
    """A new process may count from anywhere: its clock is unverified until its own probes decide."""
    c = verified_then_hello(resume=False)
    assert offsets(c) == [0, None]
    assert not c.clock_allows_planning(time.monotonic())


def test_planning_without_the_clock_check_is_warned_about_in_every_unverified_spell(caplog):
    """Before: the warning came once per coordinator; after the clocks were compared again, a
    later spell of unverified clocks planned without the check and without a word."""
    from eplb_service.coordinator.guards import DivergenceGuard
    from eplb_service.logutil import rank_logger
    from eplb_service.step_clock import ClockState

    gauge = SimpleNamespace(labels=lambda rank: SimpleNamespace(set=lambda value: None))
    metrics = SimpleNamespace(step_clock_offset=gauge)
    guard = DivergenceGuard(True, 5.0, metrics=metrics, log=rank_logger("test.guards", "coordinator"))
    offsets = {0: 0, 1: None}
    guard.clock_states = lambda alive: {r: ClockState(rank=r, reference=0, offset=offsets[r]) for r in alive}
    caplog.set_level(logging.INFO, logger="test.guards")
    warned = "could not be compared"
    for spell in range(2):
        t = 100.0 * spell
        guard.clock_verdict([0, 1], complete=True, now=t)
        assert not guard.clock_allows_planning(t + 1)
        assert guard.clock_allows_planning(t + 6)
        assert sum(warned in r.getMessage() for r in caplog.records) == spell + 1
        offsets[1] = 0  # verified: the spell ends
        guard.clock_verdict([0, 1], complete=True, now=t + 7)
        assert guard.clock_allows_planning(t + 7)
        offsets[1] = None
    assert sum("compared again" in r.getMessage() for r in caplog.records) == 2
