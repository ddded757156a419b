"""Child-process side of the multi-process tests: a real agent on a stepping loop.

No serving collectives here (the simulation tests cover those); each process steps its
own clock, computes the step's expert load from its *live* maps and a popularity that
can switch mid-run, and reports what happened. Faults are injected by subclassing the
agent: a real process exits, a real thread stalls.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from child_context import CTX
from conftest import make_model, rows_match_maps

from eplb_service import protocol
from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport


@dataclass(frozen=True)
class AgentSpec:
    rank: int
    endpoint: str
    shape: PlacementShape
    steps: int
    step_sleep_s: float = 0.005
    fault: str | None = None
    staged_timeout_s: float = 60.0
    switch_hot_at_step: int | None = None
    exit_after_s: float | None = None
    switch_every_steps: int | None = None
    """Soak runs: the hot expert moves on every this many steps."""
    transport: str = "gloo"
    """``gloo``, or ``copy-engine`` (the CPU stand-in of the copy-engine transport)."""
    deployment: str = ""
    """The agent's deployment id (``Hello.deployment``)."""
    refused_retry_s: float = protocol.REFUSED_RETRY_S


class ExitBeforeVoteAgent(WorkerAgent):
    def _on_vote(self, msg):
        os._exit(3)


class ExitWhileStagingAgent(WorkerAgent):
    def _stage(self, plan, rows):
        os._exit(4)


class StallBeforeVoteAgent(WorkerAgent):
    def _on_vote(self, msg):
        time.sleep(4.0)  # the agent thread is stuck; serving threads must not be
        super()._on_vote(msg)


class SlowStagingAgent(WorkerAgent):
    def _stage(self, plan, rows):
        time.sleep(1.5)  # a slow rank: its peers wait in the exchange, nobody waits in serving
        return super()._stage(plan, rows)


class ExitWhileApplyingAgent(WorkerAgent):
    """Dies on the serving thread in the middle of applying a decided commit: one weight copy done,
    maps not yet swapped (a kill or a crash at the worst moment of the commit step)."""

    def start(self) -> "WorkerAgent":
        agent = super().start()

        def apply(action) -> None:
            for live, rows, staged in action.weight_copies[:1]:
                live.index_copy_(0, rows, staged)
            os._exit(6)

        self.hooks._apply = apply
        return agent


class CorruptRowAgent(WorkerAgent):
    """Changes one byte of the first block received from a peer, as a bad link or a buggy copy would."""

    def _stage(self, plan, rows):
        transport = self.transport
        real = transport.exchange
        corrupted = []

        def exchange(ops, pace_s=0.0):
            real(ops, pace_s)
            for op in ops:
                if not op.is_send and not corrupted:
                    op.tensor.view(-1)[0] += 1
                    corrupted.append(op)

        transport.exchange = exchange
        try:
            return super()._stage(plan, rows)
        finally:
            del transport.exchange


class StepBudget:
    """A run length the test can cut short once it has seen what it waits for.

    Each rank steps on its own clock up to ``AgentSpec.steps`` and stops at that step number:
    a plan whose commit step lies beyond it is applied on no rank. :meth:`end_soon` lowers that
    shared last step to a few steps past the furthest rank, so every rank still stops at the same
    step number (as if the test had asked for fewer steps up front), without the test waiting
    for steps it has no use for. Shared memory from the children's start method: pass one to
    every agent of a run.
    """

    def __init__(self, world: int, steps: int) -> None:
        self.limit = CTX.Value("q", steps)
        self.done = CTX.Array("q", world)

    def end_soon(self, margin_steps: int = 50) -> int:
        """Lower the last step to ``margin_steps`` past the furthest rank (never raise it); returns it."""
        with self.limit.get_lock():
            self.limit.value = min(self.limit.value, max(self.done[:]) + margin_steps)
            return int(self.limit.value)


FAULTS = {
    None: WorkerAgent,
    "slow_staging": SlowStagingAgent,
    "corrupt_row": CorruptRowAgent,
    "exit_before_vote": ExitBeforeVoteAgent,
    "exit_while_staging": ExitWhileStagingAgent,
    "exit_while_applying": ExitWhileApplyingAgent,
    "stall_before_vote": StallBeforeVoteAgent,
}


def slot_load(model, hot: int) -> torch.Tensor:
    """Load [L, P] of one step: expert ``hot`` takes half, the rest spread; split over replicas."""
    phy2log = model.phy2log.numpy()
    num_logical = model.logcnt.shape[1]
    weights = np.full(num_logical, 10.0)
    weights[hot] = 10.0 * num_logical
    counts = model.logcnt.numpy()
    per_slot = np.take_along_axis(weights[None, :] / counts, phy2log, axis=1)
    return torch.from_numpy(np.rint(per_slot).astype(np.int64))


def make_transport(name: str):
    if name == "copy-engine":
        from eplb_service.worker_agent.memory_mover import HostMemoryMover
        from eplb_service.worker_agent.transport_copy_engine import CopyEngineTransport

        return CopyEngineTransport(HostMemoryMover(), window_bytes=4096)  # small: rows move in several pieces
    return GlooTransport()


def agent_main(spec: AgentSpec, out, budget: StepBudget | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    model = make_model(spec.rank, spec.shape)
    agent = FAULTS[spec.fault](
        model,
        spec.endpoint,
        make_transport(spec.transport),
        staged_timeout_s=spec.staged_timeout_s,
        deployment=spec.deployment,
        refused_retry_s=spec.refused_retry_s,
    ).start()
    hooks = agent.hooks
    step_times = []
    t_start = time.monotonic()
    for step in range(spec.steps):
        if budget is not None:
            if step >= budget.limit.value:
                break
            budget.done[spec.rank] = step
        if spec.switch_every_steps:
            hot = 2 + (step // spec.switch_every_steps) % (spec.shape.num_logical - 2)
        else:
            hot = 2 if spec.switch_hot_at_step is None or step < spec.switch_hot_at_step else 3
        t0 = time.perf_counter()
        hooks.before_step()
        load = slot_load(model, hot)
        hooks.after_step(load)
        step_times.append(time.perf_counter() - t0)
        time.sleep(spec.step_sleep_s)
        if spec.exit_after_s is not None and time.monotonic() - t_start > spec.exit_after_s:
            os._exit(5)
    time.sleep(0.3)  # let the agent thread flush its last messages
    agent.stop()
    out.put(
        {
            "rank": spec.rank,
            "epoch": hooks.epoch,
            "commits": list(hooks.commit_log),
            "phy2log": model.phy2log.tolist(),
            "rows_match_maps": rows_match_maps(model),
            "max_step_s": max(step_times),
            "stats": dict(agent.stats),
            "steps": hooks.steps_done,
        }
    )
