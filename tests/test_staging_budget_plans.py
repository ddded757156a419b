"""The coordinator's staging budget against plans: a layer that alone needs more staging than
``--staging-budget-bytes`` keeps its rows while the other layers are planned, and a budget below
one expert's bytes halts rebalancing once, naming it; neither logs a traceback."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from conftest import register_two_ranks_reporting

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.policy import build_plan, plan_rebalance
from eplb_service.coordinator.server import Coordinator
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.testing.protocol_fuzz import SocketSink

SHAPE = PlacementShape(2, 6, 8, 2)
BYTES_PER_EXPERT = 36  # conftest.hello_message's model
LOAD = np.array([[48.0, 89.0, 153.0, 208.0, 86.0, 44.0], [111.0, 187.0, 55.0, 163.0, 134.0, 0.0]])
"""Under it the migration policy changes 2 slots on one rank in layer 0 (the two hottest experts
gain the redundant slots) and 1 slot in layer 1 (6 experts + 2 on 2 ranks: planned exactly,
:mod:`eplb_service.coordinator.policy_exact`)."""


def coordinator_with_load(budget: int) -> Coordinator:
    """Two registered ranks whose reports add up to :data:`LOAD`, and a window ready to plan."""
    c = Coordinator(
        CoordinatorConfig(world_size=2, endpoint="ipc:///nonexistent/budget.sock", staging_budget_bytes=budget)
    )
    c._sock = SocketSink()
    slot_load = np.zeros((2, 8), dtype=np.int64)
    slot_load[:, :6] = LOAD  # slots 0-5 hold experts 0-5 in vLLM's initial placement
    register_two_ranks_reporting(c, slot_load)
    return c


def test_the_load_needs_two_slots_on_a_rank_in_layer_0_and_one_in_layer_1():
    plan = plan_rebalance("migration", initial_phy2log(SHAPE), LOAD, SHAPE)
    per_rank = (plan.target_phy2log != initial_phy2log(SHAPE)).reshape(2, 2, 4).sum(axis=2).max(axis=1)
    assert per_rank.tolist() == [2, 1]


def test_a_layer_over_the_budget_keeps_its_rows_and_the_others_are_planned():
    current = initial_phy2log(SHAPE)
    proposed = plan_rebalance("migration", current, LOAD, SHAPE).target_phy2log
    plan = build_plan(
        current, proposed, LOAD, SHAPE, bytes_per_expert=36, staging_budget_bytes=36, skip_over_budget=True
    )
    assert plan.over_budget_layers == (0,) and plan.over_budget_need_bytes == 72
    assert np.array_equal(plan.target_phy2log[0], current[0])
    assert np.array_equal(plan.target_phy2log[1], proposed[1])
    assert [b.layers for b in plan.batches] == [(1,)] and plan.experts_moved == 1


def test_the_coordinator_plans_the_layers_that_fit_and_warns_once(caplog):
    """Before: the policy's 'layer 0 alone needs 72 staging bytes' failed the whole plan, logged
    with a traceback at every rebalance interval, so layer 1 was never rebalanced either."""
    c = coordinator_with_load(BYTES_PER_EXPERT)
    sent: list[tuple[int, ...]] = []
    c.plans.start_next_batch = lambda: sent.extend(b.layers for b in c.plans.pending_batches)  # no side comm here
    with caplog.at_level(logging.DEBUG):
        asyncio.run(c.plans.run_policy())
        assert sent == [(1,)]
        c.plans.pending_batches = []
        asyncio.run(c.plans.run_policy())  # the next interval: the same layer, no second warning
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert "layers 0 keep their placement" in line and "--staging-budget-bytes 36 (up to 72 bytes" in line
    assert not any(r.exc_info for r in caplog.records)
    assert c.halted_reason is None


def test_a_budget_below_one_expert_halts_rebalancing_once_naming_it(caplog):
    """Before: every interval logged the policy's ValueError with a traceback, and the deployment
    ran on, never rebalancing, with nothing in its status saying why."""
    c = coordinator_with_load(10)
    with caplog.at_level(logging.DEBUG):
        asyncio.run(c.plans.run_policy())
    assert c.halted_reason is not None
    assert "--staging-budget-bytes 10 is less than one expert's 36 bytes" in c.halted_reason
    assert c.plans.plan is None and not any(r.exc_info for r in caplog.records)
