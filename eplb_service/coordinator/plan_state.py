"""The plan state machine: staging → voting → committed | aborted (| diverged).

Pure: events go in (with the time), decisions come out; the server does the I/O. Every
phase has a deadline, so no plan can wait forever on a silent agent.

- ``staging``: the batch was sent; waiting for ``Staged`` from every rank. Any
  ``Failed``/``Aborted``, a lost agent or the deadline aborts the batch.
- ``voting``: ``VoteNow`` was sent; the agents vote and write the outcome into the plan's
  decision record (first writer wins), report it (``Voted``), and then ``Committed`` or
  ``Aborted``. All committed → ``committed``. All aborted → ``aborted``. Past the voting
  timeout with no decision known, the coordinator asks for an abort (``AbortPlan``: ranks
  in their vote record ``abort`` unless ``commit`` is there already) and waits as long
  again for the answers. A mix of ``Committed`` and ``Aborted`` cannot come from the record;
  if it is ever seen it is reported as ``diverged``, which halts rebalancing loudly.

The outcome is the decision record's, never the coordinator's: a plan is booked only on
evidence of what the record says (a rank's ``Committed``, ``Aborted`` or ``Voted``, a
heartbeat at ``base_epoch + 1``, a step past ``S`` at ``base_epoch``, or every silent rank
lost; every heartbeat carries the newest decision its rank read, so a link that loses every
``Voted`` and ``Committed`` but passes heartbeats still tells it). Past twice the voting
timeout with none of it, the plan stays in ``voting`` with
``outcome_unknown`` set: booking it aborted would be a guess, and if the record said commit
(every ``Voted``/``Committed`` lost, serving idle short of ``S``) every rank would later move
to ``base_epoch + 1`` under a book that says they did not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from eplb_service.coordinator.resend import (
    ABORT_FIRST_S,
    ABORT_MAX_S,
    PLAN_FIRST_S,
    PLAN_MAX_S,
    VOTE_FIRST_S,
    VOTE_MAX_S,
    ResendSchedule,
)


class Phase(str, enum.Enum):
    STAGING = "staging"
    VOTING = "voting"
    COMMITTED = "committed"
    ABORTED = "aborted"
    DIVERGED = "diverged"

    @property
    def final(self) -> bool:
        return self in (Phase.COMMITTED, Phase.ABORTED, Phase.DIVERGED)


@dataclass
class PlanRun:
    """One batch of layers on its way to every rank."""

    plan_id: int
    base_epoch: int
    layers: list[int]
    rows: np.ndarray
    world_size: int
    staging_timeout_s: float
    voting_timeout_s: float
    started_at: float
    bytes_moved: int = 0
    phase: Phase = Phase.STAGING
    phase_started_at: float = 0.0
    staged: dict[int, float] = field(default_factory=dict)
    committed: dict[int, tuple[int, float]] = field(default_factory=dict)
    aborted: dict[int, str] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    decision: tuple[int, bool] | None = None
    """``(commit_step, ok)`` once any rank reported the decision record's content."""
    decision_code: str = ""
    """The abort code the record names, once a rank's heartbeat said it (``Voted`` does not carry
    it; "" while unknown, and for a record whose code says nothing: ``other``)."""
    vote_sent: bool = False
    abort_requested: bool = False
    """The vote timed out undecided: ask the ranks to record ``abort``."""
    abort_sent: bool = False
    abort_sent_at: float = 0.0
    reason: str = ""
    code: str = ""
    """``protocol.AbortCode`` of an aborted plan (the metric label)."""
    aborted_codes: dict[int, str] = field(default_factory=dict)
    inferred_aborts: set[int] = field(default_factory=set)
    """Ranks in ``aborted`` on a heartbeat alone (the record says abort, their own ``Aborted`` not
    in yet): the outcome's reason and code are a reporting rank's where there is one, since the
    record's own reason travels only in ``Aborted``; its code (``integrity``, ``fence_timeout``
    ...) travels in heartbeats too (:attr:`decision_code`), and an inferred abort carries it."""
    staging_s: float = 0.0
    voting_s: float = 0.0
    received_bytes: int = 0
    """Bytes the ranks received over the side communicator (their ``Staged`` reports, summed)."""
    slowest_staging_s: float = 0.0
    """The longest staging any rank reported (its own clock, from Plan to Staged)."""
    vote_first_s: float = VOTE_FIRST_S
    """First re-send of ``VoteNow`` to a rank still missing (the runner fits it to the fence timeout)."""
    plan_resends: ResendSchedule | None = None
    vote_resends: ResendSchedule | None = None
    staging_now: set[int] = field(default_factory=set)
    """Ranks whose last heartbeat says they stage this plan (no copy of the ``Plan`` for them)."""
    abort_resends: ResendSchedule | None = None
    outcome_unknown: bool = False
    """Past twice the voting timeout with no evidence of the record's content: kept undecided
    (no new plan starts) until a rank's answer or heartbeat shows it."""

    def __post_init__(self) -> None:
        self.phase_started_at = self.started_at

    # Each handler returns True when the phase changed (the server then acts on it).

    def on_staged(self, rank: int, now: float, received_bytes: int = 0, duration_s: float = 0.0) -> bool:
        # A rank answers every copy of the Plan with the Staged it sent (``resend``): count it once.
        if self.phase is not Phase.STAGING or rank in self.staged:
            return False
        self.staged[rank] = now
        self.received_bytes += received_bytes
        self.slowest_staging_s = max(self.slowest_staging_s, duration_s)
        if len(self.staged) == self.world_size:
            self.staging_s = now - self.phase_started_at
            self.phase, self.phase_started_at = Phase.VOTING, now
            return True
        return False

    def on_failed(self, rank: int, reason: str, now: float, code: str = "other") -> bool:
        self.aborted[rank] = reason
        self.aborted_codes[rank] = code
        self.inferred_aborts.discard(rank)
        if self.phase is Phase.STAGING:
            return self._abort(f"rank {rank}: {reason}", now, code)
        if self.phase is Phase.VOTING:
            return self._maybe_settle(now)
        return False

    def on_committed(self, rank: int, step: int, stall_s: float, now: float) -> bool:
        if self.phase is not Phase.VOTING:
            if self.phase is Phase.ABORTED:  # a late commit after an abort: the maps diverged
                self.committed[rank] = (step, stall_s)
                self.phase, self.reason = (
                    Phase.DIVERGED,
                    f"rank {rank} committed plan {self.plan_id} after it was aborted ({self.reason})",
                )
                return True
            return False
        self.committed[rank] = (step, stall_s)
        return self._maybe_settle(now)

    def on_voted(self, commit_step: int, ok: bool, code: str = "") -> bool:
        """A rank read the decision record (its ``Voted``, or the decision its heartbeats carry, with
        the record's abort ``code``): every rank reads the same. Returns whether this is news (the
        first report of it)."""
        if self.phase is not Phase.VOTING:
            return False
        if not ok and code not in ("", "other"):  # a Voted came first, without it: learnt from a heartbeat
            self.decision_code = code
        if self.decision is not None:
            return False
        self.decision = (commit_step, ok)
        self.outcome_unknown = False  # known now: a commit settles at S, an abort on the next heartbeats
        return True

    def on_heartbeat(self, rank: int, step: int, epoch: int, now: float) -> bool:
        """Infer a rank's outcome when its Committed/Aborted was lost.

        A rank at ``base_epoch + 1`` committed this plan (nothing else can move it there). A
        rank past the commit step still at ``base_epoch`` did not commit, nor does any rank at
        ``base_epoch`` once the record is known to say abort.
        """
        if self.phase is not Phase.VOTING or rank in self.committed or rank in self.aborted or rank in self.lost:
            # A lost rank's heartbeats may be a restarted process's, which never held this plan:
            # its old epoch past S says nothing about the vote (the record decided for every rank).
            return False
        if epoch == self.base_epoch + 1:
            self.committed[rank] = (self.decision[0] if self.decision else -1, 0.0)
            return self._maybe_settle(now)
        if self.decision is not None and not self.decision[1] and epoch == self.base_epoch:
            code = self.decision_code
            if code in ("", "aborted_by_coordinator") and self.code:  # the record echoes the request: ours says why
                code = self.code
            code = code or "other"
            return self._infer_abort(rank, f"the decision record says abort ({code})", code, now)
        if self.decision is not None and epoch == self.base_epoch and step > self.decision[0] + 2:
            why = f"still at epoch {epoch} at step {step}, past the commit step {self.decision[0]}"
            return self._infer_abort(rank, why, "missed_commit_step", now)
        return False

    def on_agent_lost(self, rank: int, now: float) -> bool:
        if self.phase.final:
            return False
        self.lost.add(rank)
        if self.phase is Phase.STAGING:
            return self._abort(f"rank {rank} lost during staging", now, "agent_lost")
        return self._maybe_settle(now)

    def on_rank_resumed(self, rank: int, now: float) -> None:
        """``rank``'s own process registered again on a new socket (it resumed its session): it keeps
        its place in this plan, and its copy of this phase's message is due at once.

        Messages in flight on its old socket may be lost both ways: the ``Plan``, ``VoteNow`` or
        ``AbortPlan`` sent to it, its ``Staged``, ``Voted`` or outcome. A copy draws the answer it
        gave again (or ``Aborted`` where it dropped the plan meanwhile). Its old ``staging_plan``
        no longer holds the copy back: its next heartbeat says again whether it still stages."""
        if self.phase.final:
            return
        self.staging_now.discard(rank)
        if self.phase is Phase.STAGING:
            self._plan_schedule().due_now(rank, now)
        elif self.abort_sent:
            self._abort_schedule().due_now(rank, now)
        elif self.vote_sent:
            self._vote_schedule().due_now(rank, now)

    def on_tick(self, now: float) -> bool:
        if self.phase is Phase.STAGING and now - self.phase_started_at > self.staging_timeout_s:
            missing = sorted(set(range(self.world_size)) - set(self.staged))
            return self._abort(
                f"staging timed out after {self.staging_timeout_s}s waiting for ranks {missing}", now, "staging_timeout"
            )
        # Once the record says "commit", ranks commit at step S whenever serving reaches it
        # (an idle engine may take long): no wall-clock timeout then, heartbeats settle it.
        decided_commit = self.decision is not None and self.decision[1]
        if self.phase is not Phase.VOTING or decided_commit:
            return False
        waited = now - self.phase_started_at
        missing = sorted(set(range(self.world_size)) - set(self.committed) - set(self.aborted) - self.lost)
        if not self.abort_requested and waited > self.voting_timeout_s:
            self.abort_requested = True
            self.reason = f"vote timed out after {self.voting_timeout_s}s waiting for ranks {missing}"
            self.code = "voting_timeout"
            return True
        if self.abort_requested and waited > 2 * self.voting_timeout_s:
            if self.committed:  # the record said commit (only it can): the silent ranks commit or are gone
                self.phase = Phase.COMMITTED
                self.voting_s = waited
                self.reason = f"committed; ranks {missing} never reported"
                return True
            # A rank that aborted never applies the plan, so by the invariant none does; a decided
            # "abort" says so outright. Without either, "commit" may be in the record: keep waiting.
            if self.aborted or self.decision is not None:
                return self._abort(
                    f"vote timed out after {self.voting_timeout_s}s waiting for ranks {missing}", now, "voting_timeout"
                )
            if not self.outcome_unknown:
                self.outcome_unknown = True
                self.reason = (
                    f"outcome unknown after {2 * self.voting_timeout_s:g}s: no rank reported the decision "
                    f"record's content (ranks {missing} silent); kept undecided until a rank's answer or a "
                    f"heartbeat at epoch {self.base_epoch + 1} or past the commit step shows it"
                )
                return True
        return False

    def note_staging(self, rank: int, staging_plan: int) -> None:
        """A heartbeat's ``staging_plan``: while it names this plan, the rank has the ``Plan`` and
        needs no copy; once it no longer does and no answer came, the answer was lost and a copy
        draws it again."""
        if staging_plan and staging_plan == self.plan_id:  # 0 says "none", whatever the plan's id
            self.staging_now.add(rank)
        else:
            self.staging_now.discard(rank)

    def resend_due(self, now: float) -> list[int]:
        """Ranks due another copy of this phase's message (see ``resend``).

        Staging: ``Plan`` to the ranks with no ``Staged`` yet whose heartbeat does not say they
        stage it (``note_staging``). Voting: ``VoteNow`` to the ranks
        with no outcome, while no rank has reported the decision and no abort was asked for
        (a decision means every rank's vote has ended: commit needs all of them in it, and after
        an abort a latecomer would only wait at its own fence for nothing). Once an abort was asked
        for in the vote: ``AbortPlan`` to the ranks with no outcome yet (a rank that never voted
        answers it with ``Aborted`` at once, instead of at its ``staged_timeout_s``), until a rank
        reports that the record says commit: every rank voted then, and each copy only drew the
        same ``Voted`` back, every 2 s, for as long as serving stood short of ``S``.
        """
        alive = [r for r in range(self.world_size) if r not in self.lost and r not in self.aborted]
        if self.phase is Phase.STAGING:
            waiting = [r for r in alive if r not in self.staged and r not in self.staging_now]
            return self._plan_schedule().due(now, waiting)
        if self.phase is Phase.VOTING and self.vote_sent and self.decision is None and not self.abort_requested:
            return self._vote_schedule().due(now, [r for r in alive if r not in self.committed])
        decided_commit = self.decision is not None and self.decision[1]
        if self.phase is Phase.VOTING and self.abort_sent and not decided_commit:
            return self._abort_schedule().due(now, [r for r in alive if r not in self.committed])
        return []

    def _plan_schedule(self) -> ResendSchedule:
        if self.plan_resends is None:
            self.plan_resends = ResendSchedule(self.phase_started_at, PLAN_FIRST_S, PLAN_MAX_S)
        return self.plan_resends

    def _vote_schedule(self) -> ResendSchedule:
        if self.vote_resends is None:
            self.vote_resends = ResendSchedule(self.phase_started_at, self.vote_first_s, VOTE_MAX_S)
        return self.vote_resends

    def _abort_schedule(self) -> ResendSchedule:
        if self.abort_resends is None:
            self.abort_resends = ResendSchedule(self.abort_sent_at, ABORT_FIRST_S, ABORT_MAX_S)
        return self.abort_resends

    # -- internals ----------------------------------------------------------------------

    def _infer_abort(self, rank: int, reason: str, code: str, now: float) -> bool:
        """``rank`` did not commit, on its heartbeat alone (see :attr:`inferred_aborts`)."""
        self.aborted[rank] = reason
        self.aborted_codes[rank] = code
        self.inferred_aborts.add(rank)
        return self._maybe_settle(now)

    def _abort(self, reason: str, now: float, code: str = "other") -> bool:
        if self.phase.final:
            return False
        if self.phase is Phase.VOTING:
            self.voting_s = now - self.phase_started_at
        else:
            self.staging_s = now - self.phase_started_at
        self.phase, self.reason, self.code = Phase.ABORTED, reason, code
        return True

    def _maybe_settle(self, now: float) -> bool:
        reported = set(self.committed) | set(self.aborted) | self.lost
        if len(reported) < self.world_size:
            return False
        self.voting_s = now - self.phase_started_at
        if self.committed and not self.aborted:
            self.phase = Phase.COMMITTED
            # not the abort request's or the unknown outcome's reason: the record said commit
            self.reason = f"committed on every live rank; ranks {sorted(self.lost)} were lost" if self.lost else ""
        elif not self.committed:
            reported = set(self.aborted) - self.inferred_aborts
            first = min(reported or self.aborted) if self.aborted else min(self.lost)
            self.phase, self.reason = Phase.ABORTED, f"rank {first}: {self.aborted.get(first, 'agent lost')}"
            self.code = self.aborted_codes.get(first, "agent_lost")
            if self.lost:
                self.reason += f" (rank {', rank '.join(map(str, sorted(self.lost)))} lost)"
        else:
            self.phase = Phase.DIVERGED
            self.reason = (
                f"ranks {sorted(self.committed)} committed, ranks {sorted(self.aborted)} aborted: {self.aborted}"
            )
        return True
