"""When to stop rebalancing: ranks that no longer serve the same placement, or count steps apart.

Two watches, both fed by heartbeats: the epoch watch (a rank past a commit step at the
older epoch went on with the old maps) and the step clock (a rank whose step ``k`` is not
the others' step ``k``). Either one halts rebalancing with a reason that names the rank;
planning also waits until every rank's clock has been seen to match.
"""

from __future__ import annotations

import logging

from eplb_service.coordinator.epoch_watch import EpochLagWatch
from eplb_service.coordinator.registry import SESSIONS_KEPT
from eplb_service.step_clock import ClockState, StepClockWatch


class DivergenceGuard:
    def __init__(self, check_step_clock: bool, step_clock_grace_s: float, metrics, log: logging.LoggerAdapter) -> None:
        self.check_step_clock = check_step_clock
        self.step_clock_grace_s = step_clock_grace_s
        self.metrics = metrics
        self.log = log
        self.halted_reason: str | None = None
        self.clock_halt = False
        """The halt is the step clocks' (it lifts once they agree again, see :meth:`clocks_agree_again`)."""
        self.epoch_watch = EpochLagWatch()
        self.step_clock = StepClockWatch()
        self.beats: dict[int, tuple[int, int]] = {}
        """Rank -> (epoch, step) of its latest heartbeat: one report, so the pair is consistent
        (the registry's step also moves with load reports, its epoch with Committed)."""
        self._clock_unverified_since: float | None = None
        self._clock_warned = False
        self._exported: dict[int, int | None] = {}
        """Rank -> the offset last written to ``eplb_step_clock_offset_steps`` (only changes are written)."""
        self._sessions: dict[int, tuple[int, ...]] = {}
        """Rank -> the sessions its process registered under here, newest last (at most
        ``SESSIONS_KEPT``): a Hello resuming one of them is the same process."""

    def reset(self) -> None:
        """A new deployment: the commit steps, step clocks and heartbeats (and a halt) were the
        previous one's. Its processes restarted from epoch 0 and step 0, so the old commit steps
        would read as every rank lagging them."""
        self.halted_reason = None
        self.clock_halt = False
        self.epoch_watch = EpochLagWatch()
        self.step_clock = StepClockWatch()
        self.beats = {}
        self._clock_unverified_since = None
        self._clock_warned = False
        for rank in self._exported:  # the old processes' offsets: the new ones are not verified yet
            self.metrics.step_clock_offset.labels(str(rank)).set(float("nan"))
        self._exported = {}
        self._sessions = {}

    def forget(self, rank: int) -> None:
        """A new process took the rank: the old one's reports say nothing about it."""
        self.beats.pop(rank, None)
        self.step_clock.forget(rank)

    def registered(self, rank: int, resume_session: int, session: int) -> None:
        """``rank`` registered under ``session``; ``resume_session`` is the session its Hello resumes
        (0: none). The process that held that session (an agent that reopened its socket, or came
        back after being declared dead) counts the same steps: its probes and verdicts still hold.
        That may be an earlier session of the process than its latest, when it missed the latest
        ``Welcome``. Forgotten, its clock read unverified (``step_clock_offset`` None) until a new
        probe decided, the watch was blind to it meanwhile, and planning waited ``step_clock_grace_s``."""
        sessions = self._sessions.get(rank, ())
        if not resume_session or resume_session not in sessions:
            self.forget(rank)
            sessions = ()
        self._sessions[rank] = (*sessions, session)[-SESSIONS_KEPT:]

    def heartbeat(self, rank: int, epoch: int, step: int, clock) -> None:
        self.beats[rank] = (epoch, step)
        if clock is not None:
            self.step_clock.observe(rank, clock.probe_steps, clock.times, clock.wall_minus_mono)

    def epoch_verdict(self, alive: list[int]) -> str | None:
        """Why the placements diverged, if a live rank is past a commit at the older epoch."""
        why = self.epoch_watch.observe({rank: self.beats[rank] for rank in alive if rank in self.beats})
        return None if why is None else f"placements diverged: {why}"

    def clock_states(self, alive: list[int]) -> dict[int, ClockState]:
        return self.step_clock.states(sorted(alive)) if self.check_step_clock else {}

    def clock_verdict(self, alive: list[int], complete: bool, now: float) -> str | None:
        """Why the step clocks disagree, if they do; also tracks how long a clock went unverified."""
        if not self.check_step_clock:
            return None
        states = self.clock_states(alive)
        for state in states.values():
            if state.rank not in self._exported or self._exported[state.rank] != state.offset:
                self._exported[state.rank] = state.offset
                self.metrics.step_clock_offset.labels(str(state.rank)).set(
                    float("nan") if state.offset is None else state.offset
                )
            if state.offset:
                self.clock_halt = True
                return (
                    f"step clocks disagree: rank {state.rank} counts {state.offset:+d} step(s) against rank "
                    f"{state.reference} (probes at steps {list(state.probes)}); a commit at step S would land "
                    f"on different forward passes"
                )
        if complete and any(s.offset is None for s in states.values()):
            self._clock_unverified_since = self._clock_unverified_since or now
        else:
            self._clock_unverified_since = None
            if self._clock_warned:  # a later unverified spell is news again, and warned about again
                self._clock_warned = False
                self.log.info("step clocks of every rank compared again: plans wait for that check again")
        return None

    def clocks_agree_again(self, alive: list[int], world_size: int) -> bool:
        """A step-clock halt whose ranks now count the same steps again, each confirmed by as many
        decisive probes as the offset was, with every one of the deployment's ``world_size`` ranks
        alive to show it.

        Across hosts the probes compare wall times, so a host whose clock was off by a step or more
        (NTP stepping it, a migrated VM) reads as a rank counting steps apart until its clock is
        right again; that halt lasted until the workers restarted. A rank that really counts an
        extra step stays apart, and its halt stays. No plan was committed while halted, so once
        the counts agree a commit step is the same forward pass everywhere again.

        A rank that is away (it said goodbye, or was declared dead) has not been seen to agree:
        the ranks left agreeing among themselves said nothing about the one that counted apart,
        which lifted the halt while that rank was away (seen at the end of the fault scenario of a
        rank counting one extra step, as its ranks left one by one)."""
        ranks = sorted(set(alive))
        return (
            self.clock_halt
            and self.check_step_clock
            and len(ranks) == world_size
            and self.step_clock.aligned_again(ranks)
        )

    def lift_clock_halt(self) -> str:
        """End a step-clock halt; returns the reason it had."""
        reason, self.halted_reason, self.clock_halt = self.halted_reason or "", None, False
        return reason

    def clock_allows_planning(self, now: float) -> bool:
        """Plans wait until every rank's step clock is seen to match, up to ``step_clock_grace_s``."""
        if not self.check_step_clock or self._clock_unverified_since is None:
            return True
        waited = now - self._clock_unverified_since
        if waited < self.step_clock_grace_s:
            return False
        if not self._clock_warned:
            self._clock_warned = True
            self.log.warning(
                "step clocks of some ranks could not be compared for %.0fs (ranks not stepping together, or "
                "jitter as large as a step): planning without that check",
                waited,
            )
        return True
