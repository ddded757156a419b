"""The serving-thread half in isolation: fence, commit at exactly step S, aborts, load snapshots."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_model, rows_match_maps

from eplb_service.placement import initial_phy2log
from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.schedule import build_schedule
from eplb_service.worker_agent.serving_hooks import CommitTicket, ServingHooks, UndecidedCommit
from eplb_service.worker_agent.staging import StagingArea, prepare_commit


def staged_ticket(model, shape, new_rows, layers, plan_id=1) -> CommitTicket:
    """Stage a single-rank-local plan (rank 0 only swaps rows it already holds)."""
    old = initial_phy2log(shape)[layers]
    sched = build_schedule(old, new_rows, shape.num_ranks)
    work = sched.per_rank[model.rank]
    assert not [op for op in sched.remote if model.rank in (op.src_rank, op.dst_rank)], "test plan must be local"
    area = StagingArea(model, work)
    for copy in work.local:
        for k, live in enumerate(model.expert_weights[layers[copy.layer]]):
            area.rows[k][copy.dst_staging].copy_(live[copy.src_row])
    return CommitTicket(action=prepare_commit(model, plan_id, layers, new_rows, area))


def record_answers(ticket: CommitTicket, first: Decision | None = None) -> list[str]:
    """A stand-in decision record: the first proposal wins (``first``, if given, got there before)."""
    asked = []

    def propose(code: str, reason: str) -> None:
        asked.append(reason)
        ticket.resolve(first if first is not None else Decision.abort(0, reason, code))

    ticket.propose_abort = propose
    return asked


@pytest.fixture
def setup(small_shape):
    model = make_model(0, small_shape)
    hooks = ServingHooks(model, report_interval_steps=4, fence_steps=3, fence_timeout_s=0.3)
    # rank 0 holds experts [0,1,2,3] in layer 1; swap the order of its slots
    new = initial_phy2log(small_shape)[[1]].copy()
    new[0, :4] = [3, 2, 1, 0]
    return model, hooks, new


def run_steps(hooks, n, load=None):
    for _ in range(n):
        hooks.before_step()
        hooks.after_step(load)


def test_commit_lands_exactly_at_step_s_and_not_before(setup, small_shape):
    model, hooks, new = setup
    ticket = staged_ticket(model, small_shape, new, [1])
    run_steps(hooks, 5)
    hooks.ticket = ticket
    ticket.vote_entry_step = hooks.steps_done  # 5
    ticket.resolve(Decision.commit_at(5 + 3 + 2, rank=1))
    before = model.phy2log.clone()
    while hooks.steps_done < 10:
        hooks.before_step()
        assert torch.equal(model.phy2log, before), f"maps changed before step S at step {hooks.steps_done}"
        hooks.after_step(None)
    hooks.before_step()
    assert ticket.outcome == "committed" and ticket.outcome_step == 10
    assert model.phy2log[1, :4].tolist() == [3, 2, 1, 0]
    assert rows_match_maps(model)
    assert int(model.logcnt[1].sum()) == small_shape.num_physical
    assert model.log2phy[1, 3, 0].item() == 0  # expert 3 now in slot 0
    assert hooks.epoch == 1 and hooks.ticket is None and ticket.finished.is_set()


def test_fence_times_out_and_leaves_maps_untouched(setup, small_shape):
    model, hooks, new = setup
    ticket = staged_ticket(model, small_shape, new, [1])
    asked = record_answers(ticket)
    hooks.ticket = ticket
    ticket.vote_entry_step = 0
    run_steps(hooks, 3)  # steps 0..2 run without waiting
    before_maps, before_rows = model.phy2log.clone(), [t.clone() for t in model.expert_weights[1]]
    t0 = time.perf_counter()
    hooks.before_step()  # step 3 = entry + F: blocks until the timeout
    waited = time.perf_counter() - t0
    assert 0.25 < waited < 2.0
    assert len(asked) == 1 and "fence_timeout" in asked[0]
    assert ticket.outcome == "aborted" and "fence_timeout" in ticket.reason and ticket.outcome_step == 3
    assert ticket.code == "fence_timeout"
    assert torch.equal(model.phy2log, before_maps)
    assert all(torch.equal(a, b) for a, b in zip(model.expert_weights[1], before_rows))
    assert hooks.epoch == 0 and hooks.ticket is None


def test_fence_waits_for_a_late_decision_then_commits(setup, small_shape):
    model, hooks, new = setup
    ticket = staged_ticket(model, small_shape, new, [1])
    hooks.ticket = ticket
    ticket.vote_entry_step = 0
    run_steps(hooks, 3)

    def decide():
        ticket.resolve(Decision.commit_at(3, rank=1))

    threading.Timer(0.05, decide).start()
    hooks.before_step()
    assert ticket.outcome == "committed" and ticket.outcome_step == 3
    assert 0.03 < ticket.fence_wait_s < 0.3
    assert rows_match_maps(model)


def test_failed_vote_and_missed_step_never_apply(setup, small_shape):
    model, hooks, new = setup
    run_steps(hooks, 2)
    for outcome, ok, offset in (("aborted", False, 5), ("missed_commit_step", True, -1)):
        ticket = staged_ticket(model, small_shape, new, [1])
        hooks.ticket = ticket
        ticket.vote_entry_step = hooks.steps_done
        ticket.resolve(Decision.commit_at(hooks.steps_done + offset, 1) if ok else Decision.abort(1, "vote_failed"))
        before = model.phy2log.clone()
        run_steps(hooks, 1)
        assert ticket.outcome == outcome
        assert torch.equal(model.phy2log, before) and rows_match_maps(model) and hooks.epoch == 0


def test_fence_timeout_commits_when_the_record_already_says_commit(setup, small_shape):
    """The rank gives up at the fence, but another rank wrote "commit" first: it commits at S."""
    model, hooks, new = setup
    ticket = staged_ticket(model, small_shape, new, [1])
    asked = record_answers(ticket, first=Decision.commit_at(4, rank=1))
    hooks.ticket = ticket
    ticket.vote_entry_step = 0
    run_steps(hooks, 3)
    hooks.before_step()  # step 3: times out, asks for abort, learns "commit at 4"
    assert len(asked) == 1 and ticket.outcome is None and torch.equal(model.phy2log[1, :4], torch.arange(4))
    hooks.after_step(None)
    hooks.before_step()  # step 4 = S
    assert ticket.outcome == "committed" and ticket.outcome_step == 4
    assert model.phy2log[1, :4].tolist() == [3, 2, 1, 0] and rows_match_maps(model)


def test_a_ticket_keeps_the_first_decision_it_was_given(setup, small_shape):
    """The serving thread may have read the decision already: a second answer (a proposal retried
    on another thread, a record answering twice) must never change what it acts on."""
    model, _, new = setup
    ticket = staged_ticket(model, small_shape, new, [1])
    assert ticket.resolve(Decision.commit_at(12, rank=1))
    assert not ticket.resolve(Decision.abort(0, "fence_timeout: late", "fence_timeout"))
    assert ticket.decision == Decision.commit_at(12, rank=1) and ticket.is_decided


def test_an_unreachable_record_stops_the_worker_instead_of_guessing(small_shape):
    model = make_model(0, small_shape)
    hooks = ServingHooks(model, report_interval_steps=4, fence_steps=2, fence_timeout_s=0.1, decision_timeout_s=0.2)
    new = initial_phy2log(small_shape)[[1]].copy()
    new[0, :4] = [3, 2, 1, 0]
    ticket = staged_ticket(model, small_shape, new, [1])
    asked = []
    ticket.propose_abort = lambda code, reason: asked.append(reason)  # the record never answers
    hooks.ticket = ticket
    ticket.vote_entry_step = 0
    run_steps(hooks, 2)
    before = model.phy2log.clone()
    with pytest.raises(UndecidedCommit, match="did not answer within fence_timeout_s=0.1 \\+ decision_timeout_s=0.2"):
        hooks.before_step()
    assert len(asked) == 1 and torch.equal(model.phy2log, before) and hooks.epoch == 0


def test_step_end_times_are_recorded_in_the_ring(setup):
    model, hooks, _ = setup
    t0 = time.monotonic()
    run_steps(hooks, 5)
    times = hooks.step_end_times[:5]
    assert np.all(np.diff(times) >= 0) and times[0] >= t0 and times[4] <= time.monotonic()
    assert hooks.step_end_times[5] == 0.0


def test_load_snapshots_carry_step_ranges_and_the_epoch_they_were_counted_in(setup, small_shape):
    model, hooks, new = setup
    load = torch.ones(tuple(model.phy2log.shape), dtype=torch.int64)
    run_steps(hooks, 8, load)
    snaps = list(hooks.snapshots)
    assert [(s.step_begin, s.step_end, s.epoch) for s in snaps] == [(0, 4, 0), (4, 8, 0)]
    assert int(hooks.host_buffers[snaps[0].buffer_index].sum()) == 4 * load.numel()
    # a commit cuts the window: counts before it are reported under epoch 0
    ticket = staged_ticket(model, small_shape, new, [1])
    hooks.ticket = ticket
    ticket.vote_entry_step = 8
    ticket.resolve(Decision.commit_at(10, rank=0))
    run_steps(hooks, 2, load)
    hooks.before_step()
    assert ticket.outcome == "committed"
    assert (hooks.snapshots[-1].step_begin, hooks.snapshots[-1].step_end, hooks.snapshots[-1].epoch) == (8, 10, 0)
    hooks.after_step(load)
    run_steps(hooks, 3, load)
    assert (hooks.snapshots[-1].step_begin, hooks.snapshots[-1].epoch) == (10, 1)


def test_snapshot_is_skipped_not_blocking_when_the_agent_is_behind(setup):
    model, hooks, _ = setup
    load = torch.ones(tuple(model.phy2log.shape), dtype=torch.int64)
    run_steps(hooks, 4 * len(hooks.host_buffers) + 4, load)  # nobody returns buffers
    assert hooks.dropped_windows >= 1
    assert len(hooks.snapshots) == len(hooks.host_buffers)
    assert int(hooks.load_acc.sum()) > 0  # the load keeps accumulating for the next free buffer


def test_invalid_hook_settings_are_named(small_shape):
    with pytest.raises(ValueError, match="fence_steps=0"):
        ServingHooks(make_model(0, small_shape), fence_steps=0)
