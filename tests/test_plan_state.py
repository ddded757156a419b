"""The coordinator's plan state machine, event by event."""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.plan_state import Phase, PlanRun


def run(world=3, **kw) -> PlanRun:
    return PlanRun(
        plan_id=1,
        base_epoch=0,
        layers=[0],
        rows=np.zeros((1, 4), dtype=np.int64),
        world_size=world,
        staging_timeout_s=kw.get("staging", 10.0),
        voting_timeout_s=kw.get("voting", 10.0),
        started_at=0.0,
    )


def test_all_staged_then_all_committed():
    p = run()
    assert not p.on_staged(0, 1.0) and not p.on_staged(1, 1.0)
    assert p.on_staged(2, 2.0) and p.phase is Phase.VOTING and p.staging_s == 2.0
    assert not p.on_committed(0, 50, 1e-5, 3.0) and not p.on_committed(1, 50, 1e-5, 3.0)
    assert p.on_committed(2, 50, 1e-5, 3.5) and p.phase is Phase.COMMITTED and p.voting_s == 1.5


def test_failure_during_staging_aborts_at_once_naming_the_rank():
    p = run()
    p.on_staged(0, 1.0)
    assert p.on_failed(1, "busy with plan 0", 1.5)
    assert p.phase is Phase.ABORTED and "rank 1: busy" in p.reason


def test_all_aborted_in_vote_is_a_clean_abort():
    p = run(world=2)
    p.on_staged(0, 0.1), p.on_staged(1, 0.1)
    assert not p.on_failed(0, "fence_timeout", 1.0)
    assert p.on_failed(1, "vote_failed", 1.0) and p.phase is Phase.ABORTED


def test_mixed_outcome_is_divergence():
    p = run(world=2)
    p.on_staged(0, 0.1), p.on_staged(1, 0.1)
    p.on_committed(0, 9, 0.0, 1.0)
    assert p.on_failed(1, "fence_timeout", 1.0) and p.phase is Phase.DIVERGED
    assert "ranks [0] committed" in p.reason


def test_timeouts_in_every_phase():
    p = run(staging=1.0)
    p.on_staged(0, 0.5)
    assert not p.on_tick(0.9)
    assert p.on_tick(1.1) and p.phase is Phase.ABORTED and "[1, 2]" in p.reason
    q = run(world=1, voting=1.0)
    q.on_staged(0, 0.0)
    # past the timeout undecided: ask the ranks to record "abort" (only the record decides) ...
    assert q.on_tick(1.5) and q.phase is Phase.VOTING and q.abort_requested and "vote timed out" in q.reason
    assert not q.on_tick(1.9)
    # ... and once nobody answered that either, it is not booked as anything: the record decides
    assert q.on_tick(2.5) and q.phase is Phase.VOTING and q.outcome_unknown and "outcome unknown" in q.reason
    assert q.on_failed(0, "aborted by the coordinator", 2.6) and q.phase is Phase.ABORTED


def test_a_vote_nobody_reported_is_kept_undecided_past_twice_the_timeout_not_booked_aborted():
    """Before: at 2 x voting_timeout_s with no rank's outcome known, the plan was booked aborted.
    If the record said commit and every Voted/Committed was lost while serving stood short of S,
    every rank later committed at S under a book saying "aborted, maps untouched"."""
    p = run(world=2, voting=1.0)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.vote_sent = True
    assert p.on_tick(1.5) and p.abort_requested
    p.abort_sent, p.abort_sent_at = True, 1.5
    assert p.on_tick(2.5) and p.phase is Phase.VOTING and p.outcome_unknown
    assert not p.on_tick(100.0) and p.phase is Phase.VOTING  # said once; still waiting for evidence
    assert p.resend_due(100.0) == [0, 1]  # the AbortPlan copies go on: their answers carry the record
    # serving resumes: the ranks reach S and heartbeat at base_epoch + 1
    assert not p.on_heartbeat(0, 120, 1, 101.0)
    assert p.on_heartbeat(1, 120, 1, 101.0) and p.phase is Phase.COMMITTED and p.reason == ""


def test_an_unknown_outcome_settles_on_the_record_content_an_answer_carries():
    p = run(world=2, voting=1.0)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.on_tick(1.5), p.on_tick(2.5)
    assert p.outcome_unknown
    p.on_voted(40, True)  # a rank's answer to an AbortPlan copy: the record says commit at 40
    assert not p.on_tick(50.0) and p.phase is Phase.VOTING  # serving idle short of 40: wait
    assert not p.on_heartbeat(0, 39, 0, 51.0)
    p.on_committed(0, 40, 0.0, 52.0)
    assert p.on_heartbeat(1, 41, 1, 52.0) and p.phase is Phase.COMMITTED
    q = run(world=2, voting=1.0)
    q.on_staged(0, 0.0), q.on_staged(1, 0.0)
    q.on_tick(1.5), q.on_tick(2.5)
    q.on_voted(40, False)  # the record says abort: no rank applies it, booking it aborted is known
    assert q.on_tick(2.6) and q.phase is Phase.ABORTED
    r = run(world=2, voting=1.0)  # a dead rank still settles it
    r.on_staged(0, 0.0), r.on_staged(1, 0.0)
    r.on_tick(1.5), r.on_tick(2.5)
    assert not r.on_agent_lost(1, 3.0)
    assert r.on_failed(0, "vote_failed", 3.1) and r.phase is Phase.ABORTED


def test_commit_reported_after_the_abort_request_is_a_commit_not_a_divergence():
    p = run(world=2, voting=1.0)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    assert p.on_tick(1.5) and p.abort_requested
    p.on_voted(40, True)  # the record said commit before the abort request reached it
    assert not p.on_tick(5.0) and p.phase is Phase.VOTING
    p.on_committed(0, 40, 0.0, 5.1)
    assert p.on_committed(1, 40, 0.0, 5.2) and p.phase is Phase.COMMITTED


def test_silent_ranks_after_some_committed_settle_as_committed_at_twice_the_timeout():
    p = run(world=2, voting=1.0)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.on_committed(0, 40, 0.0, 0.5)  # its Voted was lost; rank 1 is silent
    assert p.on_tick(1.5) and p.phase is Phase.VOTING
    assert p.on_tick(2.5) and p.phase is Phase.COMMITTED and "[1] never reported" in p.reason


def test_lost_agent_aborts_staging_and_late_commit_after_abort_is_divergence():
    p = run(world=2)
    assert p.on_agent_lost(1, 0.5) and p.phase is Phase.ABORTED
    assert p.on_committed(0, 5, 0.0, 1.0) and p.phase is Phase.DIVERGED


def test_lost_agent_during_vote_waits_for_the_others():
    p = run(world=3)
    for r in range(3):
        p.on_staged(r, 0.1)
    assert not p.on_agent_lost(2, 0.2)
    assert not p.on_failed(0, "vote_failed", 0.3)
    assert p.on_failed(1, "vote_failed", 0.3) and p.phase is Phase.ABORTED


def test_lost_committed_is_inferred_from_the_epoch_in_heartbeats():
    p = run(world=2)
    p.on_staged(0, 0.1), p.on_staged(1, 0.1)
    p.on_voted(40, True)
    p.on_committed(0, 40, 0.0, 0.5)
    assert not p.on_heartbeat(1, 39, 0, 0.6)  # not at S yet: wait
    assert p.on_heartbeat(1, 45, 1, 0.7) and p.phase is Phase.COMMITTED


def test_decided_commit_waits_past_the_wall_clock_timeout_for_an_idle_engine():
    p = run(world=2, voting=1.0)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.on_voted(40, True)
    assert not p.on_tick(100.0) and p.phase is Phase.VOTING  # steps stand still: no abort
    assert not p.on_heartbeat(0, 38, 0, 100.0)


def test_rank_past_the_commit_step_at_the_old_epoch_did_not_commit():
    p = run(world=2)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.on_voted(40, True)
    p.on_committed(0, 40, 0.0, 0.5)
    assert p.on_heartbeat(1, 60, 0, 0.6) and p.phase is Phase.DIVERGED


def test_plan_and_vote_go_again_only_to_the_ranks_that_have_not_answered():
    """A lost ``Plan`` or ``VoteNow`` costs one re-send, not the plan: before, each went out once,
    and one lost copy of N aborted the batch (staging timeout, or the others' fence timeout)."""
    p = run(world=3)
    assert p.resend_due(0.1) == []  # too early: the answers may be on their way
    p.on_staged(0, 0.2)
    assert p.resend_due(0.26) == [1, 2]
    assert p.resend_due(0.5) == []  # the interval doubles: 0.25, 0.5, 1, 2 (cap)
    assert p.resend_due(0.77) == [1, 2]
    p.on_staged(1, 0.8)
    assert p.resend_due(1.8) == [2]
    assert p.on_staged(2, 2.0) and p.phase is Phase.VOTING
    p.vote_sent, p.vote_first_s = True, 0.25
    assert p.resend_due(2.1) == []
    assert p.resend_due(2.3) == [0, 1, 2]
    p.on_committed(0, 50, 1e-5, 2.4)  # the decision was commit: every rank is in the vote
    assert p.resend_due(2.9) == [1, 2]
    p.on_voted(50, True)
    assert p.resend_due(10.0) == []


def test_no_copy_of_the_plan_goes_to_a_rank_whose_heartbeat_says_it_stages_it():
    """Before: every rank still staging got the whole Plan (``layers x P`` rows) again every 2 s
    for as long as it staged, seconds on GPUs with large plans, with a log line each time. Once
    its heartbeat stops naming the plan and no answer came, the answer was lost: a copy draws it."""
    p = run(world=2)
    p.note_staging(0, p.plan_id)
    p.note_staging(1, p.plan_id + 1)  # another plan: says nothing of this one
    assert p.resend_due(0.26) == [1]
    assert p.resend_due(0.77) == [1]
    assert p.resend_due(5.0) == [1]
    p.note_staging(0, 0)  # staged, but its Staged never arrived
    assert p.resend_due(7.0) == [0, 1]


def test_no_vote_goes_again_once_an_abort_is_asked_for_or_a_rank_is_lost():
    p = run(world=3, voting=1.0)
    for rank in range(3):
        p.on_staged(rank, 0.0)
    p.vote_sent = True
    p.on_agent_lost(2, 0.1)
    assert p.resend_due(0.3) == [0, 1]
    assert p.on_tick(1.5) and p.abort_requested
    assert p.resend_due(5.0) == []
    q = run(world=2)
    q.on_failed(1, "busy", 0.1)
    assert q.phase is Phase.ABORTED and q.resend_due(1.0) == []


def test_an_abort_asked_for_in_the_vote_goes_again_to_the_ranks_with_no_outcome():
    """Before, ``AbortPlan`` went out once: a rank that lost it and never got its ``VoteNow`` held
    the staged plan until its own ``staged_timeout_s``, and the plan could not settle before."""
    p = run(world=3, voting=1.0)
    for rank in range(3):
        p.on_staged(rank, 0.0)
    p.vote_sent = True
    assert p.on_tick(1.5) and p.abort_requested
    p.abort_sent, p.abort_sent_at = True, 1.5
    assert p.resend_due(1.6) == []  # too early: the answers may be on their way
    p.on_failed(0, "aborted by the coordinator", 1.7, code="aborted_by_coordinator")
    assert p.resend_due(1.8) == [1, 2]
    assert p.resend_due(2.0) == []  # the interval doubles: 0.25, 0.5, 1, 2 (cap)
    p.on_failed(1, "aborted by the coordinator", 2.1, code="aborted_by_coordinator")
    assert p.resend_due(2.4) == [2]
    assert p.on_failed(2, "no vote", 2.5, code="no_vote") and p.phase is Phase.ABORTED
    assert p.resend_due(9.0) == []


def test_the_runner_sends_the_copies_to_the_missing_ranks_only():
    import time

    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    sent: list[tuple[bytes, protocol.Message]] = []
    c.send = lambda identity, message: sent.append((identity, message))
    c.plans.pending_batches = [
        type("Batch", (), {"layers": [0], "phy2log": c.placements[c.epoch][[0]], "bytes_moved": 0})
    ]
    c.side_comm.next(c.registry.agents[0].store)
    for record in c.registry.alive:
        record.comm_generation = c.side_comm.generation
    c.plans.start_next_batch()
    plan = c.plans.plan
    assert plan is not None and len(sent) == 2
    rank0, rank1 = c.registry.agents[0], c.registry.agents[1]
    c._handle(
        rank0.identity,
        protocol.Staged(rank=0, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0, session=rank0.session),
    )
    sent.clear()
    c.plans.tick(time.monotonic() + 0.3)
    assert [(identity, type(m).__name__) for identity, m in sent] == [(rank1.identity, "Plan")]
    assert sent[0][1].plan_id == plan.plan_id
    c._handle(
        rank1.identity,
        protocol.Staged(rank=1, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0, session=rank1.session),
    )
    assert plan.phase is Phase.VOTING
    sent.clear()
    c.plans.tick(time.monotonic() + 0.3)
    assert sorted((identity, type(m).__name__) for identity, m in sent) == [
        (rank0.identity, "VoteNow"),
        (rank1.identity, "VoteNow"),
    ]
    assert c.plans.resent == {"Plan": 1, "VoteNow": 2}
    resent = {
        s.labels["message"]: s.value
        for f in c.metrics.registry.collect()
        for s in f.samples
        if s.name == "eplb_messages_resent_total"
    }
    assert resent == {"Plan": 1, "VoteNow": 2, "AbortPlan": 0, "CommInit": 0}


def test_a_staged_answered_again_to_a_copy_of_the_plan_counts_once():
    """An agent answers each copy of a ``Plan`` with the ``Staged`` it sent (``resend``), so a
    copy the coordinator sent just before the first ``Staged`` arrived draws a second one while
    the other ranks still stage. Each rank's bytes count once in the plan's total (the "staged on
    every rank: N over the side communicator" line), and its first answer is its staging time."""
    p = run(world=2)
    assert not p.on_staged(0, 0.5, received_bytes=1000, duration_s=0.4)
    assert not p.on_staged(0, 0.9, received_bytes=1000, duration_s=0.4)  # the answer to the copy
    assert p.on_staged(1, 1.0, received_bytes=500, duration_s=0.9) and p.phase is Phase.VOTING
    assert p.received_bytes == 1500 and p.staged[0] == 0.5


def test_the_coordinator_keeps_a_silent_vote_in_flight_and_books_the_commit_the_heartbeats_show():
    """Before: the plan was booked aborted ("maps untouched on every rank") at 2 x voting_timeout_s,
    and when the ranks committed at S their heartbeats at epoch 1 named an epoch the book did not
    hold: every rank was sent ``Reject(placement epoch 1 is unknown here)`` and declared dead."""
    import time

    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    sent: list[tuple[bytes, protocol.Message]] = []
    c.send = lambda identity, message: sent.append((identity, message))
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [type("Batch", (), {"layers": [0], "phy2log": rows, "bytes_moved": 0})]
    c.side_comm.next(c.registry.agents[0].store)
    for record in c.registry.alive:
        record.comm_generation = c.side_comm.generation
    c.plans.start_next_batch()
    plan = c.plans.plan
    ranks = [c.registry.agents[r] for r in (0, 1)]
    for r in ranks:
        c._handle(
            r.identity,
            protocol.Staged(rank=r.rank, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0, session=r.session),
        )
    timeout = c.cfg.voting_timeout_s
    c.plans.tick(time.monotonic() + timeout + 0.5)  # every Voted lost: AbortPlan, which loses to "commit"
    c.plans.tick(time.monotonic() + 2 * timeout + 1)
    assert c.plans.plan is plan and plan.outcome_unknown, c.plans.outcomes
    assert c.status()["plan_in_flight"]["outcome_unknown"] is True
    assert not c.plans.should_plan(time.monotonic() + 3 * timeout)
    sent.clear()
    for r in ranks:  # serving resumes; every rank committed at S (its Committed lost too)
        c._handle(
            r.identity,
            protocol.Heartbeat(rank=r.rank, step=50, epoch=1, comm_generation=r.comm_generation, session=r.session),
        )
    assert [type(m).__name__ for _, m in sent] == ["HeartbeatAck", "HeartbeatAck"]
    assert [o.phase for o in c.plans.outcomes] == ["committed"]
    assert c.epoch == 1 and np.array_equal(c.placements[1][[0]], rows)
    assert [r.rank for r in c.registry.alive] == [0, 1] and c.halted_reason is None


def test_ranks_seen_past_the_commit_step_at_the_old_epoch_are_booked_as_missing_it():
    """The record said commit at 9; heartbeats show every rank past it still at epoch 0. Before,
    the abort was labelled ``agent_lost`` (no rank was lost); a rank's own ``Aborted`` still names
    the outcome when one came."""
    p = run(world=2)
    p.on_staged(0, 0.1), p.on_staged(1, 0.1)
    p.on_voted(9, True)
    assert not p.on_heartbeat(0, 12, 0, 1.0)
    assert p.on_heartbeat(1, 12, 0, 1.0) and p.phase is Phase.ABORTED
    assert p.code == "missed_commit_step" and "past the commit step 9" in p.reason
    q = run(world=2)
    q.on_staged(0, 0.1), q.on_staged(1, 0.1)
    q.on_voted(9, True)
    q.on_heartbeat(0, 12, 0, 1.0)
    assert q.on_failed(1, "fence_timeout: undecided at the fence", 1.0, "fence_timeout") and q.phase is Phase.ABORTED
    assert q.code == "fence_timeout" and q.reason.startswith("rank 1: fence_timeout")


def test_a_heartbeat_at_the_commit_step_itself_at_the_old_epoch_is_not_a_missed_commit():
    """A rank reports its step before its epoch, and bumps its epoch at the boundary before ``S``:
    ``(step S, old epoch)`` is a rank about to apply the plan, not one that went past it. Booked as
    missed, its ``Committed`` a moment later would read as a divergence and halt rebalancing."""
    p = run(world=2)
    p.on_staged(0, 0.0), p.on_staged(1, 0.0)
    p.on_voted(40, True)
    p.on_committed(0, 40, 0.0, 0.5)
    assert not p.on_heartbeat(1, 40, 0, 0.6) and 1 not in p.aborted and p.phase is Phase.VOTING
    assert p.on_committed(1, 40, 0.0, 0.7) and p.phase is Phase.COMMITTED


def test_the_heartbeats_of_a_rank_lost_during_the_vote_say_nothing_about_the_plan():
    """A rank lost mid-vote may come back as a new process at the old epoch and past ``S``; it never
    held this plan, so its heartbeats must not book it as having missed the commit (a divergence
    once the others report theirs)."""
    p = run(world=3)
    for r in range(3):
        p.on_staged(r, 0.0)
    p.on_voted(40, True)
    p.on_committed(0, 40, 0.0, 0.5)
    assert not p.on_agent_lost(1, 0.6)
    assert not p.on_heartbeat(1, 60, 0, 0.7) and 1 not in p.aborted
    assert p.on_committed(2, 40, 0.0, 0.8) and p.phase is Phase.COMMITTED and "ranks [1] were lost" in p.reason


def _two_batches(c):
    from types import SimpleNamespace

    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0) for _ in range(2)]
    c.plans.start_next_batch()
    return c.plans.plan


def test_the_runner_asked_to_abort_a_plan_in_its_vote_waits_for_the_record():
    """Only the decision record decides a voted plan: the runner asks the ranks for ``abort`` and
    books what they report, here the ``commit`` another rank had written first."""
    from plan_harness import harness, start_plan

    from eplb_service import protocol

    c, sent = harness()
    plan = start_plan(c)
    assert plan.phase is Phase.VOTING
    sent.clear()
    c.plans.abort("coordinator shutting down", "coordinator_stopping")
    assert c.plans.plan is plan and plan.phase is Phase.VOTING and not c.plans.outcomes
    assert {type(m).__name__ for _, m in sent} == {"AbortPlan"}
    for r in c.registry.alive:
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=30, ok=True, session=r.session)
        )
        c._handle(
            r.identity,
            protocol.Committed(
                rank=r.rank, plan_id=plan.plan_id, commit_step=30, epoch=1, stall_s=0.0, session=r.session
            ),
        )
    assert c.plans.outcomes[-1].phase == "committed" and c.epoch == 1 and c.halted_reason is None


def test_an_aborted_batch_drops_the_batches_after_it_and_rebuilds_the_side_communicator():
    """The batches after an aborted one were cut from the placement it would have made, and a
    rank may have torn its side communicator down: planning starts over on a new generation.
    Kept, the leftover batches held every later plan back (``should_plan`` waits for them)."""
    from plan_harness import harness

    from eplb_service import protocol

    c, sent = harness()
    generation = c.side_comm.generation
    plan = _two_batches(c)
    assert len(c.plans.pending_batches) == 1
    r = c.registry.agents[1]
    c._handle(
        r.identity,
        protocol.Failed(
            rank=1, plan_id=plan.plan_id, reason="staging failed: test", session=r.session, code="staging_failed"
        ),
    )
    assert c.plans.plan is None and c.plans.outcomes[-1].phase == "aborted"
    assert c.plans.pending_batches == []
    assert c.side_comm.generation == generation + 1
    assert any(isinstance(m, protocol.CommInit) and m.generation == generation + 1 for _, m in sent)


def test_a_rank_s_copies_go_at_doubling_intervals_up_to_the_cap_and_at_once_after_a_reopen():
    """``ResendSchedule``: first ``first_s`` after ``since``, then 2x, 4x ... apart up to ``max_s``; a
    rank whose socket was reopened (``due_now``) is due at once, its back-off back to the first."""
    from eplb_service.coordinator.resend import ResendSchedule

    schedule = ResendSchedule(since=0.0, first_s=0.25, max_s=2.0)
    due_at = [ms / 1000 for ms in range(0, 10_000, 10) if schedule.due(ms / 1000, [1])]
    assert due_at == [0.25, 0.75, 1.75, 3.75, 5.75, 7.75, 9.75]
    schedule.due_now(1, 8.0)
    assert schedule.due(8.0, [1]) == [1]
    assert schedule.due(8.25, [1]) == [] and schedule.due(8.5, [1]) == [1]  # 0.5 s after: the back-off restarted
