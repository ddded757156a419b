"""Everything the serving thread runs. Nothing else of the agent ever runs there.

Cost per step, by construction: one in-place ``add_`` of the step's load into a device
accumulator and an integer increment; every ``report_interval_steps`` steps one
non-blocking device→host copy into a free pre-allocated (pinned on CUDA) buffer plus an
event record and a ``zero_``. No host/device synchronisation, no collective, no tensor
allocation, no lock. The only wait is the bounded fence (see ``before_step``). Each step
also writes its end time into a fixed ring (one float store): the step-clock probes.

Hand-off with the agent thread is lock-free: every field below has exactly one writer,
and a :class:`CommitTicket` moves through its states in one direction. CPython's GIL
makes each attribute read and write atomic and ordered.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.expert_model import ExpertModel


class UndecidedCommit(RuntimeError):
    """The serving thread could not learn a plan's decision within its bound.

    It cannot guess: applying or skipping the plan could each differ from what the other
    ranks do. Raised from ``before_step`` so the worker stops (fail-stop) instead.
    """


@dataclass
class CommitAction:
    """Prepared off the serving path; applying it is a handful of in-place copies."""

    plan_id: int
    weight_copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """``(live [spr, ...], dst_rows [n] int64, staged [n, ...])``: ``live[dst_rows] = staged``."""
    layer_index: torch.Tensor
    phy2log_rows: torch.Tensor
    log2phy_rows: torch.Tensor
    logcnt_rows: torch.Tensor


@dataclass
class CommitTicket:
    """One plan batch on its way through the vote and the commit.

    Writers: the agent thread sets ``vote_entry_step``; the decider thread sets ``decision``
    once, from the plan's decision record, followed by ``decided.set()``; the serving thread
    sets ``outcome`` (and the step and stall) followed by ``finished.set()``. The ticket stays
    armed until the serving thread finishes it: nothing else may drop a voted plan, because
    only the record says whether the other ranks apply it.
    """

    action: CommitAction
    layers: list[int] = field(default_factory=list)
    rows: np.ndarray | None = None
    """The plan's new ``phy2log`` rows ``[len(layers), P]``, for the agent's host copy."""
    record: object | None = None
    """The ``decision.DecisionRecord`` this plan's decision lives in (fixed when armed)."""
    vote_entry_step: int | None = None
    fence_steps: int | None = None
    """The fence ``F`` this rank's vote promised (set with ``vote_entry_step``): the rank never
    starts step ``vote_entry_step + F`` undecided, and it contributes ``entry + F`` to the vote,
    whose MAX over the ranks is ``S``. Fixed
    for the ticket's life, because a ``Welcome`` with another ``fence_steps`` (a coordinator
    restarted with new flags) may arrive mid-vote; ``None``: the hooks' current fence."""
    decision: Decision | None = None
    decided: threading.Event = field(default_factory=threading.Event)
    propose_abort: Callable[[str, str], None] | None = None
    """Asks for ``abort`` in the decision record (never blocks); the serving thread calls it
    when it gives up at the fence, and learns the record's answer through ``decided``."""
    outcome: str | None = None
    """``committed``, ``aborted`` (see ``reason``, ``code``) or ``missed_commit_step``."""
    reason: str = ""
    code: str = ""
    outcome_step: int = -1
    stall_s: float = 0.0
    fence_wait_s: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)
    voted_reported: bool = False
    """The agent thread has told the coordinator the decision (``Voted``)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def plan_id(self) -> int:
        return self.action.plan_id

    @property
    def is_decided(self) -> bool:
        return self.decided.is_set()

    def resolve(self, decision: Decision) -> bool:
        """Record the decision once; later calls (the same record's answer again) are ignored."""
        with self._lock:
            if self.decision is not None:
                return False
            self.decision = decision
        self.decided.set()
        return True


@dataclass
class LoadSnapshot:
    buffer_index: int
    epoch: int
    step_begin: int
    step_end: int
    event: object | None


class ServingHooks:
    """The per-step hooks called from the serving loop (``before_step``, ``after_step``)."""

    STEP_RING = 1024
    """Steps whose end time is kept (a power of two): probes are read from here."""

    def __init__(
        self,
        model: ExpertModel,
        report_interval_steps: int = 10,
        fence_steps: int = 8,
        fence_timeout_s: float = 5.0,
        num_host_buffers: int = 4,
        decision_timeout_s: float = 60.0,
    ) -> None:
        if report_interval_steps <= 0 or fence_steps <= 0 or fence_timeout_s <= 0 or decision_timeout_s <= 0:
            raise ValueError(
                f"report_interval_steps={report_interval_steps}, fence_steps={fence_steps}, "
                f"fence_timeout_s={fence_timeout_s} and decision_timeout_s={decision_timeout_s} must all be positive"
            )
        self.model = model
        self.report_interval_steps = report_interval_steps
        self.fence_steps = fence_steps
        self.fence_timeout_s = fence_timeout_s
        self.decision_timeout_s = decision_timeout_s
        self.step_end_times = np.zeros(self.STEP_RING, dtype=np.float64)
        """``step_end_times[k % STEP_RING]``: monotonic time at which step ``k`` ended."""
        self.steps_done = 0
        """Non-profile steps completed: the deployment-wide step clock."""
        self.epoch = 0
        """Placement epoch: commits applied on this rank."""
        self.ticket: CommitTicket | None = None
        device = model.device
        self.load_acc = torch.zeros(tuple(model.phy2log.shape), dtype=torch.int64, device=device)
        pinned = device.type == "cuda"
        self.host_buffers = [
            torch.zeros(tuple(model.phy2log.shape), dtype=torch.int64, pin_memory=pinned)
            for _ in range(num_host_buffers)
        ]
        self._events = [torch.cuda.Event() if pinned else None for _ in range(num_host_buffers)]
        self.free_buffers: collections.deque[int] = collections.deque(range(num_host_buffers))
        self.snapshots: collections.deque[LoadSnapshot] = collections.deque()
        self._acc_begin = 0
        self.dropped_windows = 0
        self.last_stall_s = 0.0
        self.max_stall_s = 0.0
        self.commit_log: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        """``(plan_id, commit_step)`` of the latest commits, for tests and status."""

    # -- the two hooks -------------------------------------------------------------

    def before_step(self) -> None:
        """At the boundary before step ``steps_done``: fence, then commit if it is step S.

        A rank that entered the vote at step ``e`` never starts step ``e + F`` without the
        decision: the commit step is ``max(e_r + F_r) >= e + F``, so knowing it there is knowing
        it in time. After ``fence_timeout_s`` it asks for ``abort`` in the decision record
        and keeps waiting for the record's answer (which may still be ``commit``, written
        first by another rank), at most ``decision_timeout_s`` more.
        """
        ticket = self.ticket
        if ticket is None or ticket.vote_entry_step is None:
            return
        step = self.steps_done
        if not ticket.decided.is_set():
            if step < ticket.vote_entry_step + self.ticket_fence_steps(ticket):
                return
            self._wait_for_decision(ticket, step)
        decision = ticket.decision
        if not decision.commit:
            ticket.reason, ticket.code = decision.reason, decision.code
            self._finish(ticket, "aborted", step)
        elif step == decision.commit_step:
            t0 = time.perf_counter()
            self._apply(ticket.action)
            ticket.stall_s = self.last_stall_s = time.perf_counter() - t0
            self.max_stall_s = max(self.max_stall_s, ticket.stall_s)
            self.commit_log.append((ticket.action.plan_id, step))
            self._finish(ticket, "committed", step)
        elif step > decision.commit_step:  # cannot happen while the fence holds; never apply late
            self._finish(ticket, "missed_commit_step", step)

    def ticket_fence_steps(self, ticket: CommitTicket) -> int:
        """The fence ``ticket``'s vote promised (see ``CommitTicket.fence_steps``)."""
        return self.fence_steps if ticket.fence_steps is None else ticket.fence_steps

    def after_step(self, load_pass: torch.Tensor | None) -> None:
        """After a non-profile step: fold in its load ``[L, P]`` and advance the clock."""
        if load_pass is not None:
            self.load_acc.add_(load_pass)
        self.step_end_times[self.steps_done & (self.STEP_RING - 1)] = time.monotonic()
        self.steps_done += 1
        if self.steps_done - self._acc_begin >= self.report_interval_steps:
            self._snapshot()

    # -- the agent thread's side --------------------------------------------------------

    def take_load_windows(self) -> list[tuple[LoadSnapshot, "np.ndarray"]]:
        """Load windows whose device-to-host copy has finished, oldest first, with their counts
        ``[L, P]``; their host buffers go back to the serving thread. Runs on the agent thread."""
        ready = []
        while self.snapshots:
            snap = self.snapshots[0]
            if snap.event is not None and not snap.event.query():
                break
            self.snapshots.popleft()
            ready.append((snap, self.host_buffers[snap.buffer_index].numpy().copy()))
            self.free_buffers.append(snap.buffer_index)
        return ready

    # -- internals (serving thread) --------------------------------------------------

    def _wait_for_decision(self, ticket: CommitTicket, step: int) -> None:
        t0 = time.perf_counter()
        if not ticket.decided.wait(self.fence_timeout_s):
            if ticket.propose_abort is not None:
                ticket.propose_abort(
                    "fence_timeout",
                    f"fence_timeout: rank {self.model.rank} waited {self.fence_timeout_s}s at step {step}",
                )
            if not ticket.decided.wait(self.decision_timeout_s):
                raise UndecidedCommit(
                    f"rank {self.model.rank}: plan {ticket.plan_id}'s decision record did not answer within "
                    f"fence_timeout_s={self.fence_timeout_s} + decision_timeout_s={self.decision_timeout_s} at step "
                    f"{step}; applying or skipping it could each split the ranks, so this worker stops"
                )
        ticket.fence_wait_s = time.perf_counter() - t0

    def _finish(self, ticket: CommitTicket, outcome: str, step: int) -> None:
        ticket.outcome = outcome
        ticket.outcome_step = step
        self.ticket = None
        ticket.finished.set()

    def _snapshot(self) -> None:
        if self.steps_done == self._acc_begin:
            return
        if not self.free_buffers:
            self.dropped_windows += 1  # agent thread is behind: keep accumulating
            return
        index = self.free_buffers.popleft()
        self.host_buffers[index].copy_(self.load_acc, non_blocking=True)
        event = self._events[index]
        if event is not None:
            event.record()
        self.load_acc.zero_()
        self.snapshots.append(LoadSnapshot(index, self.epoch, self._acc_begin, self.steps_done, event))
        self._acc_begin = self.steps_done

    def _apply(self, action: CommitAction) -> None:
        # Load counted under the old placement must be reported under the old epoch.
        self._snapshot()
        if self._acc_begin != self.steps_done:
            self.load_acc.zero_()
            self._acc_begin = self.steps_done
            self.dropped_windows += 1
        for live, rows, staged in action.weight_copies:
            live.index_copy_(0, rows, staged)
        model = self.model
        model.phy2log.index_copy_(0, action.layer_index, action.phy2log_rows)
        model.log2phy.index_copy_(0, action.layer_index, action.log2phy_rows)
        model.logcnt.index_copy_(0, action.layer_index, action.logcnt_rows)
        self.epoch += 1
