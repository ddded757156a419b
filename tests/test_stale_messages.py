"""Messages that arrive late, twice, or behind newer ones never set a rank's epoch or step back.

A rank's placement epoch only grows while it is registered (it counts commits; a restarted
process registers anew with its own). ZeroMQ keeps order on one connection, but a link that
duplicates or reorders (the fault proxy does both) could deliver a rank's heartbeat or
``Committed`` of an older epoch after a newer one. Filed as the rank's epoch, that set the
deployment's agreed epoch back (every rank's stale report arriving so made the book agree on
the older epoch, and the next plan was built on a placement nobody served), and one older than
the book's history got the rank declared dead as "unknown epoch". A rank's step only grows while
it is registered too (a new process's ``Hello`` sets it afresh), so a heartbeat of a lower step
than one already taken is such a late copy, and nothing in it is newer than what is held.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import numpy as np
from conftest import send_load_report
from plan_harness import beat, commit_plan, harness, hello_again, start_plan

from eplb_service import protocol
from eplb_service.coordinator.placement_book import HISTORY_EPOCHS
from eplb_service.coordinator.status_doc import status_json


def shown(c) -> dict:
    """The status document as it leaves the process (strict JSON)."""
    return json.loads(status_json(c.status()))


def test_heartbeats_of_the_old_epoch_arriving_after_the_commit_do_not_set_the_epoch_back():
    """Before: each rank's epoch became 0 again and the book agreed on epoch 0 (``every rank reports
    placement epoch 0``), so the next plan named base epoch 0 while every rank served epoch 1."""
    c, _ = harness()
    commit_plan(c, step=50)
    for rank in (0, 1):  # sent at step 40, before the commit, held back behind the Committed
        beat(c, rank, step=40, epoch=0)
    assert [r.epoch for r in c.registry.alive] == [1, 1]
    assert c.epoch == 1 and c.epochs_agree()
    start_plan(c)
    assert c.plans.plan.base_epoch == 1


def test_a_committed_of_an_earlier_plan_delivered_again_leaves_the_epoch_where_it_is():
    c, _ = harness()
    first = commit_plan(c, step=50)
    commit_plan(c, step=120)
    r = c.registry.agents[1]
    c._handle(  # the first plan's Committed, duplicated by the link and delivered late
        r.identity,
        protocol.Committed(rank=1, plan_id=first, commit_step=50, epoch=1, stall_s=0.0, session=r.session),
    )
    assert r.epoch == 2 and c.epoch == 2 and c.epochs_agree()


def test_a_heartbeat_older_than_the_book_s_history_is_not_an_unknown_epoch():
    """Before: the book no longer held epoch 0, so the late heartbeat read as a placement this
    coordinator never saw: rank 1 was told to register again and declared dead."""
    c, sent = harness()
    for k in range(HISTORY_EPOCHS + 1):
        commit_plan(c, step=50 + 70 * k)
    assert 0 not in c.placements
    sent.clear()
    beat(c, 1, step=40, epoch=0)
    assert [type(m).__name__ for _, m in sent] == ["HeartbeatAck"]
    assert [r.rank for r in c.registry.alive] == [0, 1] and c.registry.agents[1].epoch == HISTORY_EPOCHS + 1


def test_a_newer_epoch_is_still_taken_from_a_heartbeat():
    """The guard is one way: a rank that committed (its Committed lost) is at the new epoch."""
    c, _ = harness()
    plan = start_plan(c)
    for r in c.registry.alive:
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=30, ok=True, session=r.session)
        )
    beat(c, 0, step=31, epoch=1)
    beat(c, 1, step=31, epoch=1)
    assert [r.epoch for r in c.registry.alive] == [1, 1] and c.epoch == 1
    assert np.array_equal(c.placements[1][[0]], plan.rows)


def test_a_committed_delivered_twice_observes_its_commit_stall_once():
    """Before: each copy was observed, so ``eplb_commit_stall_seconds{rank="1"}`` counted 2 commits
    of 0.25 s for the one commit rank 1 made (the sum and the high buckets doubled with it)."""
    c, _ = harness()
    plan = start_plan(c)
    for r in c.registry.alive:
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=30, ok=True, session=r.session)
        )
    r = c.registry.agents[1]
    committed = protocol.Committed(
        rank=1, plan_id=plan.plan_id, commit_step=30, epoch=1, stall_s=0.25, session=r.session
    )
    c._handle(r.identity, committed)
    c._handle(r.identity, committed)  # the link's copy
    stall = c.metrics.commit_stall.labels("1")
    assert (stall._sum.get(), sum(b.get() for b in stall._buckets)) == (0.25, 1)


def test_a_late_heartbeat_copy_leaves_the_recorded_step_and_the_planning_interval_alone():
    """Before: rank 1's copy of its step-590 heartbeat, delivered after its step-600 one, set its
    recorded step to 590: the status said 590, and the plan booked then counted the next planning
    interval from step 590, so the next plan was due 10 steps early."""
    c, _ = harness()
    for rank in (0, 1):
        beat(c, rank, step=600, epoch=0)
    beat(c, 1, step=590, epoch=0)
    assert [r["step"] for r in c.status()["ranks"]] == [600, 600] and c.registry.min_step() == 600
    commit_plan(c, step=650)
    assert c.plans.last_plan_end_step == 600


def test_a_late_heartbeat_copy_does_not_undo_a_built_side_communicator():
    """Before: the copy of a heartbeat sent before rank 1 built the communicator (generation -1)
    made the deployment read as not ready (no plan could start) and ``CommInit`` due again."""
    c, _ = harness()
    for rank in (0, 1):
        beat(c, rank, step=100, epoch=0)
    assert c.comm_ready()
    beat(c, 1, step=90, epoch=0, comm_generation=-1)
    assert c.comm_ready() and c.registry.agents[1].comm_generation == c.side_comm.generation


def test_agent_counters_exported_never_go_down_on_a_late_copy():
    """Before: each heartbeat's counters replaced the last ones, so a late copy made
    ``eplb_agent_events_total`` go from 5 down to 3 (read by Prometheus as a counter reset).
    A copy at the same step (an idle engine's heartbeats all carry one) is merged by maximum."""
    c, _ = harness()
    sample = {"rank": "1", "event": "duplicate_messages"}
    beat(c, 1, step=100, epoch=0, counters={"duplicate_messages": 5})
    beat(c, 1, step=90, epoch=0, counters={"duplicate_messages": 3})
    beat(c, 1, step=100, epoch=0, counters={"duplicate_messages": 4})
    assert c.metrics.registry.get_sample_value("eplb_agent_events_total", sample) == 5
    beat(c, 1, step=110, epoch=0, counters={"duplicate_messages": 6, "send_dropped": 1})
    assert c.metrics.registry.get_sample_value("eplb_agent_events_total", sample) == 6


def _probe(wall_minus_mono: float) -> protocol.StepClock:
    """One probe at step 64: steps 61..67 ended 10 ms apart (monotonic time)."""
    times = [[1.0 + 0.01 * j for j in range(protocol.CLOCK_PROBE_LEN)]]
    return protocol.StepClock(
        probe_steps=[64], times=times, radius=protocol.CLOCK_PROBE_RADIUS, wall_minus_mono=wall_minus_mono
    )


def test_the_watches_are_not_fed_a_late_copy():
    """Before: the copy's (epoch, step) became the rank's latest heartbeat in the divergence guard,
    and its probes replaced the newer ones, timed with the older wall-clock offset it was sent with."""
    c, _ = harness()
    beat(c, 1, step=100, epoch=0, clock=_probe(1000.0))
    beat(c, 1, step=90, epoch=0, clock=_probe(0.0))
    assert c.guard.beats[1] == (0, 100)
    assert c.guard.step_clock.clocks[1].probes[64][0] == 1001.0


def test_a_new_process_in_the_rank_counts_from_its_hello_step():
    """The floor is the registration's: a worker that restarted reports low steps, and they are taken."""
    c, _ = harness()
    for rank in (0, 1):
        beat(c, rank, step=600, epoch=0)
    c.router.lose_agent(c.registry.agents[1], 0.0)
    c._handle(b"rank-1-new", hello_again(c, 1, step=5, node="other-host", pid=4242))
    assert c.registry.agents[1].step == 5
    beat(c, 1, step=7, epoch=0)
    assert c.registry.agents[1].step == 7 and c.guard.beats[1] == (0, 7)


def test_a_late_staged_or_committed_of_an_earlier_plan_does_not_count_for_the_plan_in_flight():
    """A duplicating link may deliver plan 1's ``Staged`` or ``Committed`` again while plan 2 is in
    flight. Counted for plan 2, the ``Staged`` would start its vote before the rank staged it (the
    rank answers ``not_staged``: a needless abort), and the ``Committed`` next to that rank's own
    ``Aborted`` of plan 2 would read as a divergence and halt rebalancing."""
    c, _ = harness()
    first = commit_plan(c, step=50)
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    plan = c.plans.plan
    r0, r1 = c.registry.agents[0], c.registry.agents[1]
    c._handle(r1.identity, protocol.Staged(rank=1, plan_id=first, bytes_received=0, duration_s=0.0, session=r1.session))
    assert plan.staged == {}
    for r in (r0, r1):
        c._handle(
            r.identity,
            protocol.Staged(rank=r.rank, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0, session=r.session),
        )
    assert plan.phase.value == "voting"
    c._handle(
        r1.identity,
        protocol.Committed(rank=1, plan_id=first, commit_step=50, epoch=1, stall_s=0.0, session=r1.session),
    )
    assert plan.committed == {}
    for r in (r0, r1):
        c._handle(
            r.identity,
            protocol.Aborted(
                rank=r.rank, plan_id=plan.plan_id, reason="fence_timeout: test", session=r.session, code="fence_timeout"
            ),
        )
    assert c.plans.outcomes[-1].phase == "aborted" and c.halted_reason is None and c.epoch == 1


def test_a_late_load_report_copy_leaves_the_rank_s_reported_step_alone():
    """A load report of steps 0..10 delivered after the one of 10..20: the rank has reported up to
    step 20 (status ``load_reported_to_step``, and the watch for a rank whose reports stopped)."""
    c, _ = harness()
    r = c.registry.agents[1]
    counts = protocol.NDArray.from_numpy(np.ones((2, 8), dtype=np.int64))
    for begin, end in ((10, 20), (0, 10)):
        c._handle(
            r.identity,
            protocol.LoadReport(rank=1, epoch=0, step_begin=begin, step_end=end, slot_load=counts, session=r.session),
        )
    assert c.registry.agents[1].load_reported_to == 20
    assert c.book.window.reports == 2


def test_ranks_at_the_next_epoch_before_any_vote_do_not_make_it_the_agreed_epoch(caplog):
    """The book agrees only on an epoch whose placement it holds. Every rank reporting the epoch
    of the plan in flight while it is still staging (no vote, so no commit: an agent that moved
    early, a third-party client) leaves the agreed epoch where it is. Agreed on it anyway, the book
    named an epoch without a placement: the status lost its balancedness, and once the plan
    aborted the next policy run failed on the missing placement (``KeyError``)."""
    caplog.set_level(logging.INFO)
    c, _ = harness()
    for step in (10, 20, 30):
        for rank in (0, 1):
            send_load_report(c, rank, step, np.arange(16, dtype=np.int64).reshape(2, 8) * (rank + 1))
    rows = c.placements[0][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    plan = c.plans.plan
    for rank in (0, 1):
        beat(c, rank, step=40, epoch=1)
    assert [r.epoch for r in c.registry.alive] == [1, 1] and 1 not in c.placements
    assert c.epoch == 0 and shown(c)["epoch"] == 0 and shown(c)["balancedness"] is not None
    r = c.registry.agents[0]
    c._handle(r.identity, protocol.Failed(rank=0, plan_id=plan.plan_id, reason="no memory", session=r.session))
    assert c.plans.plan is None and c.epoch == 0
    asyncio.run(c.plans.run_policy())
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
    assert "rebalance: balancedness" in caplog.text, caplog.text  # planned from epoch 0's placement
