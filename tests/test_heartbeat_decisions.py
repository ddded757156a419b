"""Heartbeats carry the newest decision their rank read, and the coordinator books it as a ``Voted``.

A link that loses every ``Voted`` and ``Committed`` of a plan while heartbeats get through, or
an engine idle short of ``S``, left the plan "outcome unknown": a record that says abort never
moves any rank's epoch, so no heartbeat settled it, and no plan started again.
"""

from __future__ import annotations

import collections
import time

import msgspec
import numpy as np
from conftest import make_model
from plan_harness import beat, harness, hello_again, start_plan

from eplb_service import protocol
from eplb_service.worker_agent.agent import heartbeat_message
from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.serving_hooks import ServingHooks


def silent_vote(c):
    """A plan in its vote whose every ``Voted`` was lost, past twice the voting timeout: outcome unknown."""
    plan = start_plan(c)
    timeout = c.cfg.voting_timeout_s
    c.plans.tick(time.monotonic() + timeout + 0.5)  # AbortPlan: its answers lost as well
    c.plans.tick(time.monotonic() + 2 * timeout + 1)
    assert c.plans.plan is plan and plan.outcome_unknown
    return plan


def test_a_heartbeat_saying_the_record_says_abort_books_the_plan_aborted():
    """Before: the plan stayed in flight, outcome unknown, for as long as the answers were lost
    (every rank stays at the base epoch, which says nothing without a commit step)."""
    c, _ = harness()
    plan = silent_vote(c)
    for rank in (0, 1):
        beat(c, rank, step=10, epoch=0, decided_plan=plan.plan_id, decided_commit=False)
    assert c.plans.plan is None, c.status()["plan_in_flight"]
    assert [(o.plan_id, o.phase) for o in c.plans.outcomes] == [(plan.plan_id, "aborted")]
    assert "the decision record says abort" in c.plans.outcomes[0].reason
    assert c.epoch == 0 and c.halted_reason is None


def test_a_heartbeat_saying_the_record_says_commit_makes_the_outcome_known(caplog):
    c, _ = harness()
    plan = silent_vote(c)
    with caplog.at_level("INFO"):
        beat(c, 1, step=10, epoch=0, decided_plan=plan.plan_id, decided_commit=True, decided_commit_step=40)
    assert c.status()["plan_in_flight"]["outcome_unknown"] is False
    assert c.status()["plan_in_flight"]["decided"] == {"commit": True, "commit_step": 40}
    assert "the decision record says commit at step 40 (rank 1's heartbeat)" in caplog.text
    beat(c, 0, step=39, epoch=0, decided_plan=plan.plan_id, decided_commit=True, decided_commit_step=40)
    assert c.plans.plan is plan  # serving short of S: it commits there
    for rank in (0, 1):
        beat(c, rank, step=41, epoch=1, decided_plan=plan.plan_id, decided_commit=True, decided_commit_step=40)
    assert [(o.phase, o.commit_step) for o in c.plans.outcomes] == [("committed", 40)]
    assert c.epoch == 1


def test_a_decision_of_another_plan_changes_nothing():
    """The newest decision a rank read stays in its heartbeats after the plan is booked; the next
    plan is not that one."""
    c, _ = harness()
    plan = silent_vote(c)
    beat(c, 0, step=10, epoch=0, decided_plan=plan.plan_id - 1, decided_commit=False)
    assert c.plans.plan is plan and plan.outcome_unknown and plan.decision is None


def test_a_commit_known_only_from_heartbeats_still_catches_a_rank_past_s_at_the_old_epoch():
    """Before: only a ``Committed`` told the epoch watch a commit step. With every ``Committed`` lost
    the plan settled on the heartbeats at the new epoch, and a rank it no longer tracked (declared
    dead in the vote, back with its session) serving the old maps past ``S`` was never caught: no
    halt, and no plan ever again (the ranks' epochs never agree)."""
    c, _ = harness()
    plan = start_plan(c)
    rank1 = c.registry.agents[1]
    c.router.lose_agent(rank1, time.monotonic())  # frozen in the vote past the liveness timeout
    beat(c, 0, step=55, epoch=1, decided_plan=plan.plan_id, decided_commit=True, decided_commit_step=50)
    assert [(o.phase, o.commit_step) for o in c.plans.outcomes] == [("committed", 50)] and c.epoch == 1
    assert c.epoch_watch.commit_steps[1] == (50, 0)
    c._handle(b"rank-1-back", hello_again(c, 1, step=60, resume_session=rank1.session))
    assert c.registry.agents[1].alive and c.halted_reason is None
    beat(c, 1, step=61, epoch=0)
    assert c.halted_reason is not None, c.status()["halted"]
    assert "rank 1 is at step 61 with epoch 0, but epoch 1 was committed at step 50 (reported by rank 0)" in (
        c.halted_reason
    )


def test_a_voted_commit_feeds_the_epoch_watch_too():
    c, _ = harness()
    plan = start_plan(c)
    r = c.registry.agents[1]
    c._handle(r.identity, protocol.Voted(rank=1, plan_id=plan.plan_id, commit_step=70, ok=True, session=r.session))
    assert c.epoch_watch.commit_steps[1] == (70, 1)
    c._handle(r.identity, protocol.Voted(rank=1, plan_id=plan.plan_id + 1, commit_step=90, ok=True, session=r.session))
    assert c.epoch_watch.commit_steps == {1: (70, 1)}  # not the plan in flight: no epoch to file it under


def test_an_abort_known_from_a_heartbeat_keeps_the_reason_a_rank_reported():
    """The record says abort because rank 1's vote found rows corrupted in transit. Rank 0's
    heartbeat names the decision before its serving thread finished the ticket (its ``Aborted``
    still to come), then rank 1's ``Aborted`` says why. Before: the plan was booked on rank 0's
    inferred abort, ``other: rank 0: the decision record says abort``, and the integrity failure
    never showed in the outcome or in ``eplb_plans_aborted_total{reason}``."""
    c, _ = harness()
    plan = start_plan(c)
    r0, r1 = c.registry.agents[0], c.registry.agents[1]
    for r in (r0, r1):
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=0, ok=False, session=r.session)
        )
    beat(c, 0, step=12, epoch=0, decided_plan=plan.plan_id, decided_commit=False)
    assert c.plans.plan is plan  # rank 1 has said nothing of its own yet
    reason = "vote_failed: integrity: rows of remote op 3 differ"
    c._handle(
        r1.identity, protocol.Aborted(rank=1, plan_id=plan.plan_id, reason=reason, code="integrity", session=r1.session)
    )
    assert [(o.phase, o.code, o.reason) for o in c.plans.outcomes] == [("aborted", "integrity", f"rank 1: {reason}")]


def test_no_abortplan_copies_once_the_record_is_known_to_say_commit():
    """The outcome was unknown (``AbortPlan`` sent to every rank), then a heartbeat says the record
    says commit at 40 while the engine idles short of it. Before: ``AbortPlan`` went on to both
    ranks every 2 s for as long as serving stood short of ``S`` (14 copies in 15 s, each logged
    and answered by the same ``Voted``), though every rank had voted and nothing was to be drawn."""
    c, sent = harness()
    plan = silent_vote(c)
    beat(c, 1, step=10, epoch=0, decided_plan=plan.plan_id, decided_commit=True, decided_commit_step=40)
    resent = c.plans.resent["AbortPlan"]
    sent.clear()
    for k in range(5):
        c.plans.tick(time.monotonic() + 2 * c.cfg.voting_timeout_s + 5 + 3 * k)
    assert [type(m).__name__ for _, m in sent] == [] and c.plans.resent["AbortPlan"] == resent
    assert c.plans.plan is plan and plan.decision == (40, True)


def test_an_abort_settled_on_heartbeats_alone_is_booked_under_the_record_s_code():
    """The record says abort because rank 1's vote found rows corrupted in transit; both ranks'
    ``Voted`` and then heartbeats say so before either serving thread reaches a step boundary (an
    idle engine), so no ``Aborted`` is in when the plan settles. Before: it was booked ``other``
    (``eplb_plans_aborted_total{reason="other"}``, the status's outcome), though every rank knew
    the record's code; the ``Aborted`` that said ``integrity`` came after the plan was booked and
    was dropped."""
    c, _ = harness()
    plan = start_plan(c)
    for r in c.registry.alive:
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=0, ok=False, session=r.session)
        )
    for rank in (0, 1):
        beat(c, rank, step=12, epoch=0, decided_plan=plan.plan_id, decided_commit=False, decided_code="integrity")
    assert [(o.phase, o.code) for o in c.plans.outcomes] == [("aborted", "integrity")]
    assert "the decision record says abort (integrity)" in c.plans.outcomes[0].reason
    r1 = c.registry.agents[1]
    c._handle(  # the rank's own Aborted, once its engine steps again: nothing more to book
        r1.identity,
        protocol.Aborted(rank=1, plan_id=plan.plan_id, reason="rows differ", code="integrity", session=r1.session),
    )
    aborted = c.metrics.registry.get_sample_value
    assert aborted("eplb_plans_aborted_total", {"reason": "integrity"}) == 1
    assert aborted("eplb_plans_aborted_total", {"reason": "other"}) is None
    assert c.status()["last_plans"][-1]["code"] == "integrity"


def test_an_abort_the_coordinator_asked_for_keeps_the_coordinator_s_code():
    """The vote timed out and the coordinator asked for abort: the record's code
    (``aborted_by_coordinator``) only echoes that request, and the request's code says why."""
    c, _ = harness()
    plan = silent_vote(c)
    for rank in (0, 1):
        beat(c, rank, step=10, epoch=0, decided_plan=plan.plan_id, decided_code="aborted_by_coordinator")
    assert [(o.phase, o.code) for o in c.plans.outcomes] == [("aborted", "voting_timeout")]


def test_an_agent_s_heartbeat_names_the_record_s_abort_code(small_shape):
    hooks = ServingHooks(make_model(0, small_shape), report_interval_steps=4, fence_steps=3, fence_timeout_s=0.3)

    def sent(decision: Decision) -> protocol.Heartbeat:
        beat = heartbeat_message(0, 5, hooks, 1, collections.Counter(), decided=(7, decision))
        return protocol.decode(protocol.encode(beat))

    assert sent(Decision.abort(1, "rows of remote op 3 differ", "integrity")).decided_code == "integrity"
    assert sent(Decision.commit_at(40, 0)).decided_code == "other"
    # a record is text any process may write: a code the wire does not name must not get every heartbeat refused
    assert sent(Decision.abort(1, "?", "a_code_of_a_newer_agent")).decided_code == "other"


def test_a_heartbeat_without_the_abort_code_still_decodes():
    """An agent that leaves ``decided_code`` out (every field with a default may be left out)."""
    frame = msgspec.msgpack.encode({"type": "Heartbeat", "rank": 0, "step": 3, "epoch": 0, "decided_plan": 9})
    assert protocol.decode(frame).decided_code == "other"


class CommitBoundaryHooks:
    """Serving hooks whose serving thread crosses a commit step between the agent's first and
    second read: the epoch goes up at the boundary, then the step count passes ``S``."""

    def __init__(self, step: int, epoch: int) -> None:
        self._step, self._epoch, self._reads = step, epoch, 0
        self.step_end_times = np.zeros(ServingHooks.STEP_RING)
        self.dropped_windows = 0

    def _read(self) -> None:
        self._reads += 1
        if self._reads == 2:  # the serving thread runs between the two reads
            self._epoch += 1
            self._step += 1

    @property
    def steps_done(self) -> int:
        self._read()
        return self._step

    @property
    def epoch(self) -> int:
        self._read()
        return self._epoch


def test_a_heartbeat_taken_across_a_commit_boundary_never_pairs_a_step_past_s_with_the_old_epoch():
    """The coordinator takes (step > S, old epoch) as proof that a rank missed the commit. The
    heartbeat reads the step first: a commit landing between the reads can only pair the old step
    with the new epoch. Read the other way round, the pair (S + 1, old epoch) of a rank that did
    commit would be booked as a missed commit."""
    hooks = CommitBoundaryHooks(step=10, epoch=3)
    beat = heartbeat_message(0, 5, hooks, 1, collections.Counter())  # type: ignore[arg-type]
    assert (beat.step, beat.epoch) == (10, 4), (beat.step, beat.epoch)
