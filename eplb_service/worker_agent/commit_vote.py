"""The vote and the commit of a staged plan batch, on the agent's side.

``VoteNow`` arms the serving thread's commit ticket at this rank's entry step ``e``, all-reduces
``(e + F, fail, plan id, digests)`` over the side communicator (``F``: the fence this rank's
ticket keeps), and proposes the outcome to the plan's decision record: ``commit S`` with
``S = max(e_r + F_r)`` over the ranks when every rank was ready and every remote row's
sender and receiver digests agree, ``abort`` otherwise. The record's answer, not the
all-reduce, decides: the serving thread applies the plan iff the record says ``commit``. A
voted plan is never dropped: anything that gives up on it (an abort request, a rebuilt side
communicator, a reset) only proposes ``abort``, and the ticket stays armed until the serving
thread finishes it. The voter then reports: ``Voted`` once the decision is known,
``Committed`` or ``Aborted`` once served.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Protocol

import numpy as np

from eplb_service import protocol
from eplb_service.worker_agent.decision import Decider, Decision, DecisionRecord
from eplb_service.worker_agent.serving_hooks import CommitTicket, ServingHooks
from eplb_service.worker_agent.staging import prepare_commit, warm_commit_kernels
from eplb_service.worker_agent.staging_pipeline import NO_DIGEST, CpuSections, Staged
from eplb_service.worker_agent.transport import Transport, TransportError


def vote_vector(fence_step: int, fail: int, plan_id: int, digests: np.ndarray | None) -> np.ndarray:
    """``[fence_step, fail, plan_id, -plan_id, d_0..d_K-1, -d_0..-d_K-1]`` for the MAX all-reduce.

    ``fence_step`` is ``e + F``: the step this rank never starts without the decision (its
    entry step plus the fence its ticket keeps). Its MAX over the ranks is the commit step,
    at or after every rank's fence even where the ranks' fences differ (a ``Welcome`` with
    another ``fence_steps`` reaching some ranks before their ``VoteNow`` and others after).

    ``d_k`` is this rank's digest of remote op ``k``'s row (sent or received), or a
    sentinel when it took no part. After MAX over ranks, slot ``k`` holds the larger
    of sender's and receiver's digest and slot ``K+k`` minus the smaller: they agree
    exactly when both digests are equal, so every rank learns of any corrupt row.
    """
    head = np.array([fence_step, fail, plan_id, -plan_id], dtype=np.int64)
    digests = digests if digests is not None else np.empty(0, dtype=np.int64)
    negated = np.where(digests == NO_DIGEST, NO_DIGEST, -digests)
    return np.concatenate([head, digests, negated])


def corrupt_ops(result: np.ndarray) -> list[int]:
    """Remote ops whose sender and receiver digests differ, from the all-reduced vote vector."""
    body = result[4:]
    k = body.size // 2
    return np.flatnonzero(body[:k] != -body[k:]).tolist()


def everyone_ready(result: np.ndarray, plan_id: int) -> bool:
    """Every rank entered the vote on ``plan_id`` with its ticket armed in time (the MAX of
    ``fail`` is 0, and the MAX of ``plan_id`` and of ``-plan_id`` agree)."""
    return int(result[1]) == 0 and int(result[2]) == plan_id and int(result[3]) == -plan_id


def proposal_from(result: np.ndarray, plan_id: int, rank: int) -> Decision:
    """What this rank proposes to the record, given the all-reduced vote vector."""
    if not everyone_ready(result, plan_id):
        return Decision.abort(rank, "vote_failed: a rank was not ready", "vote_failed")
    corrupt = corrupt_ops(result)
    if corrupt:
        return Decision.abort(
            rank,
            f"vote_failed: integrity: row digests differ between sender and receiver for remote ops {corrupt[:8]}",
            "integrity",
        )
    return Decision.commit_at(int(result[0]), rank)


DECISIONS_KEPT = 64
"""Decided plans whose record content a rank says again on request (the coordinator asks only
about the plan in flight; a few dozen cover copies held back on the link)."""


class VoterHost(Protocol):
    """What the voter needs of the agent around it."""

    rank: int
    hooks: ServingHooks
    transport: Transport
    decider: Decider
    stats: collections.Counter
    log: logging.LoggerAdapter

    def send(self, message: protocol.Message) -> None: ...

    def keep_alive(self) -> None: ...

    def everyone_past(self, plan_id: int) -> None:
        """Every rank entered the vote on ``plan_id`` ready: none holds an earlier ticket or
        needs an earlier side communicator (rank 0 then deletes their store keys)."""

    @property
    def session(self) -> int: ...

    @property
    def side_ready(self) -> bool: ...


class CommitVoter:
    def __init__(self, host: VoterHost, model) -> None:
        self.host = host
        self.model = model
        self.ticket: CommitTicket | None = None
        self._ticket_generation = -1
        """Side-communicator generation the ticket's vote ran on (torn down after an abort)."""
        self.decided: collections.OrderedDict[int, Decision] = collections.OrderedDict()
        """Plan id -> the record's content, for the last ``DECISIONS_KEPT`` plans this rank voted on:
        a copy of ``VoteNow`` or ``AbortPlan`` is answered with it after the ticket is gone too (the
        coordinator cannot know the outcome otherwise when the ``Voted`` and ``Committed`` were lost)."""

    def vote(
        self,
        msg: protocol.VoteNow,
        plan: protocol.Plan | None,
        rows: np.ndarray | None,
        staged: Staged | None,
        record: DecisionRecord | None,
    ) -> None:
        host = self.host
        ready = (
            plan is not None
            and plan.plan_id == msg.plan_id
            and staged is not None
            and self.ticket is None
            and record is not None
        )
        if not ready:
            # Never join the all-reduce without the plan: the vector's length comes from the
            # staged plan (its digests), and a collective whose size differs between ranks
            # ends the process in gloo (EnforceNotMet, std::terminate). A VoteNow held back
            # past an abort arrives exactly like this, possibly while the others already vote
            # on the next plan. The peers leave their vote when the record says abort (their
            # fence, or the coordinator's AbortPlan after this Aborted), maps untouched.
            if not host.side_ready:
                self._aborted(msg.plan_id, "not_connected", "side communicator not connected at vote")
            else:
                self._aborted(msg.plan_id, "not_staged", "vote arrived for a plan this rank has not staged")
            return
        assert plan is not None and rows is not None and staged is not None and record is not None
        ticket = self._arm(msg.plan_id, plan, rows, staged, record)
        hooks = host.hooks
        entry = ticket.vote_entry_step
        # If the serving thread passed entry+F before it could see the entry, this rank
        # cannot honour the fence: vote "fail" so that no rank commits.
        fence_steps = hooks.ticket_fence_steps(ticket)
        fail = 1 if hooks.steps_done >= entry + fence_steps else 0
        if not host.side_ready:
            ticket.propose_abort("not_connected", "side communicator not connected at the vote")
            return
        cpu = CpuSections(host.stats, "vote")
        try:
            result = self._all_reduce(vote_vector(entry + fence_steps, fail, msg.plan_id, staged.digests), ticket)
            cpu.mark("reduce")
        except TransportError as exc:
            host.log.error("vote for plan %d: %s", msg.plan_id, exc)
            host.transport.abort()  # a pending collective must not meet a later one
            self.propose(Decision.abort(host.rank, f"vote_failed: {exc}", "vote_failed"))
            return
        proposal = proposal_from(result, msg.plan_id, host.rank)
        if everyone_ready(result, msg.plan_id):
            host.everyone_past(msg.plan_id)
        if proposal.code == "integrity":
            host.stats["integrity_failures"] += 1
            host.log.error(
                "plan %d: expert rows corrupted in transit (%s); nobody commits", msg.plan_id, proposal.reason
            )
        self.propose(proposal)

    def _arm(
        self, plan_id: int, plan: protocol.Plan, rows: np.ndarray, staged: Staged, record: DecisionRecord
    ) -> CommitTicket:
        host = self.host
        cpu = CpuSections(host.stats, "vote")
        with host.transport.device_context():  # complete when the vote's all-reduce returns
            action = prepare_commit(self.model, plan_id, list(plan.layers), rows, staged.area)
            warm_commit_kernels(action)  # the first commit of a process must not load kernels on the serving thread
        cpu.mark("prepare")
        ticket = CommitTicket(action=action, layers=list(plan.layers), rows=rows, record=record)
        ticket.propose_abort = lambda code, reason: self.propose(Decision.abort(host.rank, reason, code))
        self._ticket_generation = host.transport.generation
        # The fence first: the serving thread reads it once it sees the entry step.
        ticket.fence_steps = host.hooks.fence_steps
        host.hooks.ticket = ticket
        ticket.vote_entry_step = host.hooks.steps_done
        self.ticket = ticket
        return ticket

    def _all_reduce(self, vector: np.ndarray, ticket: CommitTicket) -> np.ndarray:
        host = self.host
        me = threading.get_ident()

        def keep_alive() -> None:  # called by the transport while the vote is pending
            if threading.get_ident() != me:
                return
            host.keep_alive()  # a slow vote must not get this rank declared dead
            if ticket.is_decided:
                # The record is final (this rank's serving thread, or another rank, got there
                # first): nothing the all-reduce returns can change it.
                raise TransportError(f"left the vote: the decision record already says {ticket.decision.describe()}")

        host.transport.poll_hook = keep_alive
        try:
            return host.transport.max_reduce(vector)
        finally:
            host.transport.poll_hook = None

    def propose(self, proposal: Decision) -> None:
        """To the record the ticket was armed with (never a newer store's): answered on the decider thread."""
        ticket = self.ticket
        if ticket is not None and not ticket.is_decided:
            self.host.decider.submit(ticket, ticket.record, proposal)

    def report(self) -> CommitTicket | None:
        """Tell the coordinator the decision once known, and the outcome once served; returns
        the ticket the serving thread finished (the agent then updates its host maps)."""
        ticket, host = self.ticket, self.host
        if ticket is None:
            return None
        if ticket.is_decided and not ticket.voted_reported:
            ticket.voted_reported = True
            self.decided[ticket.plan_id] = ticket.decision
            while len(self.decided) > DECISIONS_KEPT:
                self.decided.popitem(last=False)
            self._send_voted(ticket.plan_id, ticket.decision)
        if not ticket.finished.is_set():
            return None
        self.ticket = None
        if ticket.outcome == "committed":
            host.stats["committed"] += 1
            host.log.info(
                "committed plan %d at step %d (epoch %d, stall %.1f us)",
                ticket.plan_id,
                ticket.outcome_step,
                host.hooks.epoch,
                ticket.stall_s * 1e6,
            )
            host.send(
                protocol.Committed(
                    rank=host.rank,
                    plan_id=ticket.plan_id,
                    commit_step=ticket.outcome_step,
                    epoch=host.hooks.epoch,
                    stall_s=ticket.stall_s,
                    session=host.session,
                )
            )
            return ticket
        host.stats["aborted"] += 1
        aborted = ticket.outcome == "aborted"
        reason = ticket.reason if aborted else ticket.outcome
        code = ticket.code if aborted and ticket.code else "missed_commit_step"
        host.log.warning(
            "plan %d not committed at step %d: %s; maps untouched", ticket.plan_id, ticket.outcome_step, reason
        )
        # A vote left pending on some rank must never meet a later collective. Not while a new
        # generation is being built (not side_ready): starting that build aborted this one
        # already, and an abort landing as the build completes would tear the new one down.
        if host.side_ready and host.transport.generation == self._ticket_generation:
            host.transport.abort()
        self._aborted(ticket.plan_id, code, reason)
        return ticket

    def voted_again(self, plan_id: int) -> bool:
        """A copy of ``VoteNow``, or an ``AbortPlan``, for a plan this rank voted on: the coordinator
        has no outcome from it (lost, or on its way). Says the record's content again once it is
        known, also after the ticket is finished; before, the ``Voted`` goes out when it is.
        Returns whether it was sent."""
        decision = self.decided.get(plan_id)
        if decision is None:
            return False
        self._send_voted(plan_id, decision)
        return True

    def last_decided(self) -> tuple[int, Decision] | None:
        """The newest plan whose record this rank read, and what it says (heartbeats carry it: the
        coordinator learns the outcome from them when every ``Voted`` and ``Committed`` was lost)."""
        return next(reversed(self.decided.items()), None)

    def _send_voted(self, plan_id: int, decision: Decision) -> None:
        host = self.host
        host.send(
            protocol.Voted(
                rank=host.rank,
                plan_id=plan_id,
                commit_step=max(decision.commit_step, 0),
                ok=decision.commit,
                session=host.session,
            )
        )

    def _aborted(self, plan_id: int, code: str, reason: str) -> None:
        host = self.host
        host.send(protocol.Aborted(rank=host.rank, plan_id=plan_id, reason=reason, session=host.session, code=code))
