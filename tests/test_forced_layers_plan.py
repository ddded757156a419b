"""The coordinator starts a plan below ``--min-gain`` where it repairs node purity.

With ``--groups G --nodes N`` the migration policy keeps every group's replicas on one node;
a placement spreading a group over nodes (vLLM's initial ``p % N_log`` layout with redundant
slots does) is repaired whatever the balance gains, and the policy lists those layers in
``RebalancePlan.forced_layers``. Under a flat load the repair gains nothing, so a coordinator
that judged the plan on its gain alone would skip it at every interval and never make the
placement node-pure.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from conftest import register_two_ranks_reporting

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_hierarchy import node_purity
from eplb_service.coordinator.server import Coordinator
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.testing.protocol_fuzz import SocketSink

SHAPE = PlacementShape(2, 6, 8, 2)
"""conftest.hello_message's model: 2 layers, 6 experts in 8 slots on 2 ranks (one rank a node)."""


def flat_coordinator(num_groups: int, num_nodes: int) -> Coordinator:
    """Two registered ranks in vLLM's initial placement whose reports give every expert the same load."""
    c = Coordinator(
        CoordinatorConfig(
            world_size=2, endpoint="ipc:///nonexistent/forced.sock", num_groups=num_groups, num_nodes=num_nodes
        )
    )
    c._sock = SocketSink()
    # Slots 0-7 hold experts 0 1 2 3 4 5 0 1: each replica of experts 0 and 1 carries half.
    register_two_ranks_reporting(c, np.tile(np.array([50, 50, 100, 100, 100, 100, 50, 50], dtype=np.int64), (2, 1)))
    return c


def run_one_interval(c: Coordinator) -> list[tuple[int, ...]]:
    """One ``run_policy``; returns the layers of the batches it started (no side communicator here)."""
    started: list[tuple[int, ...]] = []
    c.plans.start_next_batch = lambda: started.extend(tuple(b.layers) for b in c.plans.pending_batches)
    asyncio.run(c.plans.run_policy())
    return started


def test_the_initial_placement_spreads_a_group_and_the_repair_gains_nothing():
    """The premise: both layers impure, both forced, and a gain under the default --min-gain 0.01."""
    current = initial_phy2log(SHAPE)
    assert not node_purity(current, 6, 2, 2).any()  # slots 6-7 (node 1) hold experts 0 and 1 of group 0
    plan = plan_rebalance("migration", current, np.ones((2, 6)), SHAPE, num_groups=2, num_nodes=2)
    assert plan.forced_layers == (0, 1)
    assert plan.balancedness_after - plan.balancedness_before < CoordinatorConfig.min_gain
    assert node_purity(plan.target_phy2log, 6, 2, 2).all()


def test_a_flat_load_still_plans_the_purity_repair_and_says_how_many_layers(caplog):
    """Before (forced layers ignored): 'no rebalance' at every interval, the groups spread for good."""
    c = flat_coordinator(num_groups=2, num_nodes=2)
    with caplog.at_level(logging.INFO):
        started = run_one_interval(c)
    assert sorted(layer for batch in started for layer in batch) == [0, 1]
    assert c.plans.counts["skipped"] == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "2 layers hold a group's experts on more than one node (--groups 2 --nodes 2)" in line for line in lines
    ), lines
    assert not any("no rebalance" in line for line in lines), lines


def test_without_the_hierarchy_the_same_flat_load_is_skipped(caplog):
    """The control: on one node nothing is forced, and a gain under --min-gain starts no plan."""
    c = flat_coordinator(num_groups=2, num_nodes=1)
    with caplog.at_level(logging.INFO):
        started = run_one_interval(c)
    assert started == [] and c.plans.counts["skipped"] == 1
    assert any("no rebalance" in r.getMessage() for r in caplog.records)
    assert not any("more than one node" in r.getMessage() for r in caplog.records)


def test_the_deepseek_policy_repairs_purity_too():
    """``--policy deepseek`` keeps DeepSeek's hierarchy as its help says: before, only the migration
    policy forced the repair, so a deepseek plan on a flat load (or on any load where DeepSeek's
    hierarchical packing balances no better than vLLM's initial layout) kept groups spread over
    nodes: ``eplb-plan --policy deepseek --groups 8 --nodes 4`` on zero load moved nothing."""
    current = initial_phy2log(SHAPE)
    for load in (np.ones((2, 6)), np.zeros((2, 6))):
        plan = plan_rebalance("deepseek", current, load, SHAPE, num_groups=2, num_nodes=2)
        assert plan.forced_layers == (0, 1)
        assert node_purity(plan.target_phy2log, 6, 2, 2).all()


def test_the_deepseek_policy_forces_nothing_on_a_node_pure_placement():
    """Its own node-pure plan, planned again on the same load, gains nothing and forces nothing."""
    load = np.array([[9.0, 1.0, 4.0, 4.0, 2.0, 7.0], [1.0, 1.0, 1.0, 8.0, 3.0, 3.0]])
    first = plan_rebalance("deepseek", initial_phy2log(SHAPE), load, SHAPE, num_groups=2, num_nodes=2)
    again = plan_rebalance("deepseek", first.target_phy2log, load, SHAPE, num_groups=2, num_nodes=2)
    assert again.forced_layers == () and not again.batches
