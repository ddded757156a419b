"""The plan runner's rules for when a plan may start and what each rank's answer does to it.

Each test pins one rule of proto/PROTOCOL.md and docs/FAILURE_MODEL.md at the runner's seam: a
real coordinator with two registered ranks (``plan_harness``), driven message by message, no
sockets. Written against hand-made mutations of ``plan_runner`` and ``router`` that the rest of
the suite let through (a second plan started over one in flight, say)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import msgspec
import numpy as np
from conftest import send_load_report
from plan_harness import beat, harness

from eplb_service import protocol


def plannable(check_clock: bool = False):
    """A harness coordinator that would start planning now: a window of exactly ``min_window_steps``
    (50) steps of load, both ranks exactly ``rebalance_interval_steps`` (200) past the last plan at
    the agreed epoch, the side communicator built; the step-clock check off unless ``check_clock``."""
    c, sent = harness()
    c.guard.check_step_clock = check_clock
    load = np.arange(16, dtype=np.int64).reshape(2, 8)
    for step in range(10, 60, 10):
        for rank in (0, 1):
            send_load_report(c, rank, step, load)
    for rank in (0, 1):
        beat(c, rank, step=c.cfg.rebalance_interval_steps, epoch=0)
    assert c.book.window.steps_covered() == c.cfg.min_window_steps == 50
    assert c.registry.min_step() - c.plans.last_plan_end_step == c.cfg.rebalance_interval_steps
    if not check_clock:
        assert c.plans.should_plan(0.0), "the harness must be plannable before one rule is broken"
    return c, sent


def one_batch(c) -> None:
    """Layer 0's row reversed, as the policy's only batch."""
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]


def test_no_plan_is_computed_while_a_batch_is_in_flight():
    """A second policy run over a batch in flight would overwrite the runner's one ``PlanRun``: the
    first plan's answers then go unheard, and the ranks stage two plans from one base epoch."""
    c, _ = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    assert c.plans.plan is not None and not c.plans.pending_batches
    assert not c.plans.should_plan(0.0)


def test_a_plan_starts_at_exactly_the_window_and_interval_the_settings_name():
    """``--min-window-steps`` and ``--rebalance-interval-steps`` are "at least": at exactly 50 steps of
    window and 200 steps since the last plan the runner plans; one step short of either, it waits."""
    c, _ = plannable()
    c.plans.last_plan_end_step = 1
    assert not c.plans.should_plan(0.0)
    c.plans.last_plan_end_step = 0
    c.book.window.first_step += 1
    assert not c.plans.should_plan(0.0)


def test_no_plan_starts_while_the_ranks_report_different_epochs():
    """Between a decided commit and its step (or a rank not at the placement it claims) the agreed
    epoch is not every rank's: a plan named on it would be staged against maps a rank does not serve."""
    c, _ = plannable()
    c.book.learn(1, c.placements[0].copy())
    c.registry.agents[1].epoch = 1
    assert not c.epochs_agree()
    assert not c.plans.should_plan(0.0)


def test_no_plan_starts_while_a_step_clock_is_unverified_until_the_grace_ends():
    """Heartbeats without probes leave rank 1's step clock unverified: no plan for
    ``step_clock_grace_s``, then planning goes on without the check (FAILURE_MODEL.md)."""
    c, _ = plannable(check_clock=True)
    now = time.monotonic()
    c.watch(now)  # as after each heartbeat: rank 1's clock unverified since the first of them
    grace = c.cfg.step_clock_grace_s
    assert not c.plans.should_plan(now)
    assert c.plans.should_plan(now + grace + 1.0)


def names(sent) -> list[str]:
    return [type(m).__name__ for _, m in sent]


def stage(c, plan_id: int, ranks=(0, 1)) -> None:
    for rank in ranks:
        r = c.registry.agents[rank]
        c._handle(
            r.identity,
            protocol.Staged(rank=rank, plan_id=plan_id, bytes_received=0, duration_s=0.0, session=r.session),
        )


def test_no_batch_is_sent_while_the_side_communicator_is_not_built():
    """Staging moves rows over the side communicator: a ``Plan`` sent while a rank has not built the
    current generation would fail or hang its exchange; the planned batches are dropped instead."""
    c, sent = plannable()
    c.rebuild_comm()  # a new generation the ranks have not reported built yet
    assert not c.comm_ready()
    one_batch(c)
    sent.clear()
    c.plans.start_next_batch()
    assert c.plans.plan is None and c.plans.pending_batches == []
    assert "Plan" not in names(sent)


def test_answers_naming_another_plan_leave_the_plan_in_flight_alone():
    """Plan ids tell plans apart across batches and restarts: a ``Staged``, ``Failed`` or ``Committed``
    of another id (an earlier batch's, duplicated by the link) must not count for this one."""
    c, sent = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    plan = c.plans.plan
    other = plan.plan_id - 1
    sent.clear()
    stage(c, other)
    assert c.plans.plan is plan and plan.phase.value == "staging" and "VoteNow" not in names(sent)
    r = c.registry.agents[1]
    c._handle(r.identity, protocol.Failed(rank=1, plan_id=other, reason="old", code="other", session=r.session))
    assert c.plans.plan is plan and plan.phase.value == "staging" and "AbortPlan" not in names(sent)
    stage(c, plan.plan_id)
    assert plan.phase.value == "voting" and names(sent).count("VoteNow") == 2
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(
            r.identity,
            protocol.Committed(rank=rank, plan_id=other, commit_step=300, epoch=1, stall_s=0.0, session=r.session),
        )
    assert c.plans.plan is plan and not plan.committed and c.plans.counts["committed"] == 0


def test_each_batch_of_a_plan_goes_out_under_a_new_plan_id():
    """Agents drop a plan id they have seen (to survive duplicated messages): a second batch under
    the first one's id would be answered with the first one's outcome, never staged."""
    c, sent = plannable()
    rows = c.placements[0][[0, 1]][:, ::-1].copy()
    c.plans.pending_batches = [
        SimpleNamespace(layers=[0], phy2log=rows[:1], bytes_moved=0),
        SimpleNamespace(layers=[1], phy2log=rows[1:], bytes_moved=0),
    ]
    c.plans.start_next_batch()
    first = c.plans.plan
    stage(c, first.plan_id)
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(
            r.identity, protocol.Voted(rank=rank, plan_id=first.plan_id, commit_step=300, ok=True, session=r.session)
        )
        c._handle(
            r.identity,
            protocol.Committed(
                rank=rank, plan_id=first.plan_id, commit_step=300, epoch=1, stall_s=0.0, session=r.session
            ),
        )
    second = c.plans.plan
    assert second is not None and second.layers == [1] and second.base_epoch == 1
    plans = [m for _, m in sent if isinstance(m, protocol.Plan)]
    assert [p.plan_id for p in plans] == [first.plan_id] * 2 + [second.plan_id] * 2
    assert second.plan_id != first.plan_id and not c.plans.knows(second.plan_id + 1)
    # the second batch is cut from the placement the first one committed, not the one before it
    assert np.array_equal(c.placements[1][0], rows[0]) and plans[-1].base_epoch == 1


def commit(c, plan_id: int, step: int, epoch: int) -> None:
    for rank in (0, 1):
        r = c.registry.agents[rank]
        c._handle(r.identity, protocol.Voted(rank=rank, plan_id=plan_id, commit_step=step, ok=True, session=r.session))
        c._handle(
            r.identity,
            protocol.Committed(
                rank=rank, plan_id=plan_id, commit_step=step, epoch=epoch, stall_s=0.0, session=r.session
            ),
        )


def test_the_rebalance_interval_counts_from_the_end_of_the_last_plan():
    """A committed batch ends its plan at the ranks' lowest step: the next one waits a whole
    ``rebalance_interval_steps`` from there, not from the step the previous plan started at."""
    c, _ = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    plan = c.plans.plan
    stage(c, plan.plan_id)
    commit(c, plan.plan_id, step=210, epoch=1)
    for rank in (0, 1):
        beat(c, rank, step=220, epoch=1)
    end = c.plans.last_plan_end_step
    assert c.plans.plan is None and c.epoch == 1 and end == 200  # the lowest step heard when it settled
    assert not c.plans.should_plan(0.0)
    for rank in (0, 1):
        beat(c, rank, step=end + c.cfg.rebalance_interval_steps - 1, epoch=1)
    assert not c.plans.should_plan(0.0)
    for rank in (0, 1):
        beat(c, rank, step=end + c.cfg.rebalance_interval_steps, epoch=1)
    assert c.plans.should_plan(0.0)


def test_a_policy_that_raises_is_tried_again_only_after_an_interval():
    """A policy bug raises every time: tried at every tick it would log a traceback a tick."""
    c, _ = plannable()

    def broken(*args, **kwargs):
        raise RuntimeError("policy bug")

    c.plans._policy_call = broken
    c.plans.planning = True
    asyncio.run(c.plans.run_policy())
    assert c.plans.plan is None and not c.plans.planning and c.halted_reason is None
    assert c.plans.last_plan_end_step == c.registry.min_step()
    assert not c.plans.should_plan(0.0)


def test_a_rebalance_computed_while_the_epoch_moved_on_is_not_sent():
    """The policy runs off the event loop: if the ranks committed a placement meanwhile (a plan of a
    coordinator before this one, resynced), its batches are cut from a placement nobody serves."""
    c, sent = plannable()
    real_call = c.plans._policy_call

    def epoch_moves_while_planning(*args, **kwargs):
        call = real_call(*args, **kwargs)

        def run():
            c.book.placements[1] = c.placements[0].copy()
            c.book.epoch = 1  # as if every rank reported epoch 1 while the policy ran
            return call()

        return run

    c.plans._policy_call = epoch_moves_while_planning
    sent.clear()
    asyncio.run(c.plans.run_policy())
    assert c.plans.plan is None and c.plans.pending_batches == []
    assert "Plan" not in names(sent) and c.plans.counts["skipped"] == 1


def test_after_an_abort_asked_for_in_the_vote_silent_ranks_get_abortplan_copies_never_votenow():
    """A vote nobody answered: the runner asks for ``abort`` at the voting timeout, sends the silent
    ranks copies of that ``AbortPlan`` (a rank that never got ``VoteNow`` answers it at once), and at
    twice the timeout keeps the plan undecided (``outcome_unknown``). A ``VoteNow`` then would start
    the vote on a rank that missed the first one, racing the ``AbortPlan`` it is sent."""
    c, sent = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    plan = c.plans.plan
    stage(c, plan.plan_id)
    assert names(sent).count("VoteNow") == 2
    start, timeout = plan.phase_started_at, plan.voting_timeout_s
    sent.clear()
    c.plans.tick(start + timeout + 0.1)
    c.plans.tick(start + timeout + 0.5)  # the silent ranks' copies: of the AbortPlan, not the VoteNow
    assert set(names(sent)) == {"AbortPlan"} and len(sent) >= 4, names(sent)
    c.plans.tick(start + 2 * timeout + 0.1)
    assert "VoteNow" not in names(sent), names(sent)
    assert plan.outcome_unknown and c.plans.plan is plan


def test_a_missing_vote_request_goes_again_within_a_quarter_of_the_fence_timeout():
    """The ranks in the vote wait at their fence, serving paused, for one that missed ``VoteNow``:
    its copy goes after 0.25 s, or a quarter of ``fence_timeout_s`` if that is shorter, well before
    the fence gives up and the plan aborts."""
    for fence_s, first_s in ((5.0, 0.25), (0.4, 0.1)):
        c, sent = plannable()
        c.cfg.agent = msgspec.structs.replace(c.cfg.agent, fence_timeout_s=fence_s)
        one_batch(c)
        c.plans.start_next_batch()
        plan = c.plans.plan
        stage(c, plan.plan_id)
        sent.clear()
        c.plans.tick(plan.phase_started_at + first_s - 0.02)
        assert "VoteNow" not in names(sent)
        c.plans.tick(plan.phase_started_at + first_s + 0.02)
        assert names(sent).count("VoteNow") == 2, (fence_s, names(sent))


def test_a_plan_committed_on_one_rank_and_aborted_on_another_halts_rebalancing():
    """Diverged maps are not repaired by another plan built on an epoch half the ranks do not serve:
    the runner books it diverged and halts (FAILURE_MODEL.md), naming the plan."""
    c, sent = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    plan = c.plans.plan
    stage(c, plan.plan_id)
    r0, r1 = c.registry.agents[0], c.registry.agents[1]
    c._handle(
        r0.identity,
        protocol.Committed(rank=0, plan_id=plan.plan_id, commit_step=210, epoch=1, stall_s=0.0, session=r0.session),
    )
    c._handle(
        r1.identity, protocol.Aborted(rank=1, plan_id=plan.plan_id, reason="fence", code="other", session=r1.session)
    )
    assert c.plans.plan is None and c.plans.counts["diverged"] == 1
    assert c.halted_reason is not None and f"(id {plan.plan_id}) diverged" in c.halted_reason
    assert not c.plans.should_plan(0.0)


def test_a_commit_one_rank_reported_and_another_s_heartbeat_showed_is_booked_at_the_reported_step():
    """Rank 1's ``Committed`` (and every ``Voted``) lost: its heartbeat at the new epoch shows it
    committed, with no step (-1). The outcome names the step rank 0 reported, not -1."""
    c, sent = plannable()
    one_batch(c)
    c.plans.start_next_batch()
    plan = c.plans.plan
    stage(c, plan.plan_id)
    r0 = c.registry.agents[0]
    c._handle(
        r0.identity,
        protocol.Committed(rank=0, plan_id=plan.plan_id, commit_step=210, epoch=1, stall_s=0.0, session=r0.session),
    )
    beat(c, 1, step=215, epoch=1)
    assert c.plans.plan is None and c.plans.counts["committed"] == 1
    assert c.plans.outcomes[-1].commit_step == 210
