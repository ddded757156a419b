"""The migration policy held to DeepSeek's node hierarchy (``--groups G --nodes N``): every plan
is a valid placement with each group's replicas on one node, impure placements become pure on the
first plan at the fewest moves, and whole groups change nodes only where a node is far hotter."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_hierarchy import (
    current_group_nodes,
    exchange_groups,
    hierarchical_migration_phy2log,
    node_pure_rows,
    node_purity,
    node_rows,
    rank_floor,
)
from eplb_service.placement import PlacementShape, PolicySettingsError, initial_phy2log, rank_loads, validate_phy2log


@st.composite
def hierarchies(draw):
    """A shape with ``G`` groups on ``N`` nodes (``N | G``, ``G | N_log``, ``N | R``), a random
    valid placement (node-pure or not) and a load."""
    nodes = draw(st.integers(2, 4))
    groups = nodes * draw(st.integers(1, 3))
    experts = groups * draw(st.integers(1, 3))
    ranks = nodes * draw(st.integers(1, 3))
    per_node = experts // nodes
    per_rank = draw(st.integers(-(-per_node // (ranks // nodes)), -(-per_node // (ranks // nodes)) + 3))
    layers = draw(st.integers(1, 3))
    shape = PlacementShape(layers, experts, ranks * per_rank, ranks)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        current = initial_phy2log(shape)
    else:
        extra = rng.integers(0, experts, (layers, shape.num_redundant))
        current = np.array([rng.permutation(np.r_[np.arange(experts), e]) for e in extra], dtype=np.int64)
    kind = draw(st.sampled_from(["lognormal", "zeros", "one_hot", "counts"]))
    load = {
        "lognormal": lambda: rng.lognormal(0.0, 1.5, (layers, experts)),
        "zeros": lambda: np.zeros((layers, experts)),
        "counts": lambda: rng.integers(0, 50, (layers, experts)).astype(float),
        "one_hot": lambda: np.eye(experts)[rng.integers(0, experts, layers)] * 1e4,
    }[kind]()
    return shape, groups, nodes, current, load


@settings(max_examples=150, deadline=None)
@given(case=hierarchies(), persistence=st.sampled_from([1.0, 0.3]))
def test_every_plan_is_valid_and_node_pure(case, persistence):
    shape, groups, nodes, current, load = case
    plan = plan_rebalance(
        "migration", current, load, shape, num_groups=groups, num_nodes=nodes, persistence=persistence
    )
    target = plan.target_phy2log
    validate_phy2log(target, shape)  # every expert >= 1 replica; [L, P] keeps every rank's slot count
    assert node_purity(target, shape.num_logical, groups, nodes).all()
    assert plan.experts_moved == int((target != current).sum())
    impure = ~node_purity(current, shape.num_logical, groups, nodes)
    assert set(plan.forced_layers) == set(np.flatnonzero(impure).tolist())
    # A pure layer with nothing to gain keeps its row.
    pure_layers = np.flatnonzero(~impure)
    if persistence == 1.0 and pure_layers.size:
        before = rank_loads(current, load, shape.num_ranks).max(axis=1)
        after = rank_loads(target, load, shape.num_ranks).max(axis=1)
        assert (after[pure_layers] <= before[pure_layers] * (1 + 1e-9)).all()


@settings(max_examples=150, deadline=None)
@given(case=hierarchies())
def test_purity_costs_the_fewest_moves(case):
    """Under a load that forces no replica count change (all zero), a row changes exactly
    ``max(slots of other nodes' experts, own experts without a replica)`` slots: fewer cannot
    make it pure."""
    shape, groups, nodes, current, _ = case
    zero = np.zeros((shape.num_layers, shape.num_logical))
    node_of_group = current_group_nodes(current, shape.num_logical, groups, nodes)
    split = node_rows(current, zero, node_of_group, nodes)
    per_node = shape.num_logical // nodes
    pure = node_pure_rows(split.rows, split.load, shape.num_ranks // nodes)
    foreign = (split.rows == per_node).sum(axis=1)
    present = np.array([np.isin(np.arange(per_node), row).sum() for row in split.rows])
    assert ((pure != split.rows).sum(axis=1) == np.maximum(foreign, per_node - present)).all()
    assert (pure < per_node).all()
    assert all(np.isin(np.arange(per_node), row).all() for row in pure)


def test_vllm_initial_layout_becomes_node_pure_on_the_first_plan_even_without_gain():
    """DeepSeek-V3 on 4 nodes: vLLM's ``p % 256`` layout with 32 redundant slots spills groups over
    two nodes. Under an equal load nothing gains balance, yet every layer is made pure."""
    shape = PlacementShape(3, 256, 288, 32)
    current = initial_phy2log(shape)
    assert not node_purity(current, 256, 8, 4).any()
    plan = plan_rebalance("migration", current, np.ones((3, 256)), shape, num_groups=8, num_nodes=4)
    assert node_purity(plan.target_phy2log, 256, 8, 4).all()
    assert plan.forced_layers == (0, 1, 2)
    assert plan.balancedness_after >= plan.balancedness_before
    # Purity alone costs the fewest moves: node 0 holds groups 0, 1 and 8 experts of group 2
    # (8 slots to refill); node 1 groups 2 (24 of 32), 3 and 16 experts of group 4 (16); node 2
    # groups 5 and 6 (24 of 32) and 16 of group 4 (16); node 3 group 7, 8 experts of group 6
    # and all of group 0 (40 slots, group 4 arriving whole): 80 slots a layer. (The plan also
    # levels each node's ranks, which an equal load with 8 second copies per node asks for.)
    split = node_rows(current, np.ones((3, 256)), current_group_nodes(current, 256, 8, 4), 4)
    pure = node_pure_rows(split.rows, split.load, 8)
    assert (pure != split.rows).sum() == 3 * 80


def test_a_pure_placement_under_a_level_load_does_not_move():
    shape = PlacementShape(2, 16, 16, 4)
    current = np.tile(np.arange(16), (2, 1))  # groups of 4 experts, 2 per node, in order
    plan = plan_rebalance("migration", current, np.ones((2, 16)), shape, num_groups=4, num_nodes=2)
    assert plan.experts_moved == 0 and plan.forced_layers == ()


def test_groups_stay_on_the_node_holding_most_of_them():
    current = np.array([[4, 5, 6, 7, 0, 1, 2, 3, 0]])[:, :8]  # group 1 on node 0, group 0 on node 1
    assert current_group_nodes(current, 8, 2, 2).tolist() == [[1, 0]]


def test_a_far_hotter_node_exchanges_a_group_and_a_level_one_does_not():
    node_of_group = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.26, 0.25, 0.25, 0.24]])
    slots = np.full((2, 4), 2)
    out = exchange_groups(
        node_of_group,
        load,
        slots,
        2,
        limit=np.array([0.51, 0.51]),  # the greedy packing's 0.5 plus a tolerance
        min_gain=np.array([0.005, 0.005]),
        slot_price=np.zeros(2),
        max_rounds=4,
    )
    node_load = [np.bincount(row, weights=w, minlength=2) for row, w in zip(out, load)]
    assert np.allclose(node_load[0], [0.5, 0.5])  # 0.7 / 0.3 -> one exchange evens it
    assert out[1].tolist() == [0, 0, 1, 1]  # 0.51 / 0.49: within the tolerance, kept
    # A price per moved slot above the gain keeps the hot layer too.
    kept = exchange_groups(
        node_of_group,
        load,
        slots,
        2,
        limit=np.full(2, 0.51),
        min_gain=np.full(2, 0.005),
        slot_price=np.full(2, 0.06),
        max_rounds=4,
    )
    assert kept[0].tolist() == [0, 0, 1, 1]


def test_a_node_hotter_than_the_others_but_under_a_hot_experts_rank_keeps_its_groups():
    """Before: node 0 (groups 0 and 1, 17 of 21 tokens, 8.5 per rank) exchanged group 1 for a
    cold group, moving half the layer, while expert 0's rank carries 10 + 1 whatever the nodes
    hold: its largest rank load stayed 11 after the exchange as before it."""
    current = np.arange(8)[None, :]  # 4 groups of 2 experts, 2 nodes of 2 ranks of 2 slots, no redundant slot
    load = np.array([[10.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
    assert np.isclose(rank_floor(load / load.sum(), 8, 4)[0], 11 / 21)
    target = hierarchical_migration_phy2log(current, load, 4, 4, 2)
    assert current_group_nodes(target, 8, 4, 2).tolist() == [[0, 0, 1, 1]]
    assert np.count_nonzero(target != current) <= 2  # at most one exchange inside a node
    assert rank_loads(target, load, 4).max() == 11.0


def test_an_exchange_counts_its_drop_only_down_to_the_floor():
    node_of_group = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    out = exchange_groups(
        node_of_group,
        load,
        np.full((2, 4), 2),
        2,
        limit=np.full(2, 0.51),
        min_gain=np.full(2, 0.005),
        slot_price=np.zeros(2),
        max_rounds=4,
        floor=np.array([0.7, 0.6]),  # layer 0: no exchange lowers it; layer 1: 0.7 -> 0.6 does
    )
    assert out[0].tolist() == [0, 0, 1, 1]
    assert np.bincount(out[1], weights=load[1], minlength=2).max() <= 0.6 + 1e-12


def test_one_group_per_node_never_exchanges():
    out = exchange_groups(
        np.array([[0, 1, 2]]),
        np.array([[0.9, 0.05, 0.05]]),
        np.ones((1, 3)),
        3,
        limit=np.zeros(1),
        min_gain=np.zeros(1),
        slot_price=np.zeros(1),
        max_rounds=3,
    )
    assert out.tolist() == [[0, 1, 2]]


def test_groups_not_a_multiple_of_nodes_is_the_plain_policy_and_a_bad_hierarchy_is_refused_by_name():
    """No hierarchy to keep (as DeepSeek's policy falls back to its global one): ``--nodes 2`` of a
    model without groups must not stop the default policy."""
    shape = PlacementShape(1, 12, 12, 4)
    load = np.random.default_rng(0).lognormal(0, 1, (1, 12))
    split = plan_rebalance("migration", initial_phy2log(shape), load, shape, num_groups=3, num_nodes=2)
    plain = plan_rebalance("migration", initial_phy2log(shape), load, shape)
    assert np.array_equal(split.target_phy2log, plain.target_phy2log) and split.forced_layers == ()
    with pytest.raises(PolicySettingsError, match=r"num_groups=3 \(--groups\) must be a multiple of num_nodes=2"):
        hierarchical_migration_phy2log(initial_phy2log(shape), np.ones((1, 12)), 4, 3, 2)
    with pytest.raises(PolicySettingsError, match=r"num_nodes=3 \(--nodes\) must divide num_ranks=4"):
        hierarchical_migration_phy2log(initial_phy2log(shape), np.ones((1, 12)), 4, 6, 3)


def test_one_node_is_the_plain_migration_policy():
    shape = PlacementShape(2, 16, 20, 4)
    rng = np.random.default_rng(3)
    load = rng.lognormal(0, 1, (2, 16))
    grouped = plan_rebalance("migration", initial_phy2log(shape), load, shape, num_groups=4, num_nodes=1)
    plain = plan_rebalance("migration", initial_phy2log(shape), load, shape)
    assert np.array_equal(grouped.target_phy2log, plain.target_phy2log)


def test_a_group_exchange_pays_the_price_of_the_slots_it_moves_where_the_imbalance_fades():
    """Mutation: step 2 given no price per moved slot (``slot_price`` 0). Groups of 0.4 and 0.3
    of the layer share node 0: an exchange evens the nodes (0.35 -> 0.25 per rank) and is made
    where the imbalance lasts; with none of it lasting (persistence 0), each of its 4 slots
    costs 0.4 / 8 and together they cost more than the drop, so the groups stay."""
    current = np.arange(8)[None, :]
    load = np.array([[200000.0, 200000.0, 150000.0, 150000.0, 100000.0, 100000.0, 50000.0, 50000.0]])
    lasting = hierarchical_migration_phy2log(current, load, 4, 4, 2, persistence=1.0)
    assert sorted(set((lasting[0, :4] // 2).tolist())) != [0, 1]  # node 0 holds other groups
    fading = hierarchical_migration_phy2log(current, load, 4, 4, 2, persistence=0.0)
    assert sorted(set((fading[0, :4] // 2).tolist())) == [0, 1]
