"""Heartbeats carry the newest decision their rank read, and the coordinator books it as a ``Voted``.

A link that loses every ``Voted`` and ``Committed`` of a plan while heartbeats get through, or
an engine idle short of ``S``, left the plan "outcome unknown": a record that says abort never
moves any rank's epoch, so no heartbeat settled it, and no plan started again.
"""

from __future__ import annotations

import time

from plan_harness import beat, harness, start_plan


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
