"""plan_rebalance: the interface the coordinator calls (filtering, bytes, batching, errors)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.coordinator.policy import POLICIES, LayerBatch, RebalancePlan, plan_rebalance
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log, validate_phy2log

SHAPE = PlacementShape(4, 16, 20, 4)


def skewed_load(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return rng.gamma(0.4, 100.0, size=(shape.num_layers, shape.num_logical))


def test_policies_and_default():
    assert POLICIES == ("migration", "deepseek")


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_is_consistent(policy):
    current = initial_phy2log(SHAPE)
    plan = plan_rebalance(policy, current, skewed_load(), SHAPE, bytes_per_expert=1000)
    assert isinstance(plan, RebalancePlan)
    validate_phy2log(plan.target_phy2log, SHAPE)
    assert plan.balancedness_after > plan.balancedness_before
    changed = plan.target_phy2log != current
    assert plan.experts_moved == int(changed.sum())
    assert plan.bytes_moved == sum(b.bytes_moved for b in plan.batches)
    assert plan.bytes_moved <= plan.experts_moved * 1000
    covered = sorted(layer for b in plan.batches for layer in b.layers)
    assert covered == sorted(set(np.flatnonzero(changed.any(axis=1)).tolist()))
    for batch in plan.batches:
        assert isinstance(batch, LayerBatch)
        assert batch.phy2log.shape == (len(batch.layers), SHAPE.num_physical)
        assert np.array_equal(batch.phy2log, plan.target_phy2log[list(batch.layers)])
        assert batch.gain > 0


def test_local_copies_cost_no_bytes():
    shape = PlacementShape(1, 3, 4, 2)
    current = np.array([[0, 1, 2, 0]])  # expert 0 on both ranks
    load = np.array([[1.0, 10.0, 10.0]])
    plan = plan_rebalance("migration", current, load, shape, bytes_per_expert=7)
    # Best: put 1 and 2 on different ranks. Whatever the policy does, each changed slot costs
    # 7 bytes unless its rank already held the new expert.
    target = plan.target_phy2log
    held = [set(current[0, :2].tolist()), set(current[0, 2:].tolist())]
    expected = sum(7 for p in range(4) if target[0, p] != current[0, p] and target[0, p] not in held[p // 2])
    assert plan.bytes_moved == expected
    assert plan.balancedness_after == 1.0


def test_batches_fit_the_staging_budget_and_are_ordered_by_gain_per_byte():
    shape = PlacementShape(12, 32, 40, 4)
    load = skewed_load(1, shape)
    current = initial_phy2log(shape)
    bpe = 100
    unbounded = plan_rebalance("deepseek", current, load, shape, bytes_per_expert=bpe)
    per_layer = (unbounded.target_phy2log != current).reshape(12, 4, 10).sum(axis=2).max(axis=1) * bpe
    budget = int(per_layer.max()) * 2
    plan = plan_rebalance("deepseek", current, load, shape, bytes_per_expert=bpe, staging_budget_bytes=budget)
    assert np.array_equal(plan.target_phy2log, unbounded.target_phy2log)
    assert len(plan.batches) > 1
    for batch in plan.batches:
        rows = list(batch.layers)
        changed = (plan.target_phy2log[rows] != current[rows]).reshape(len(rows), 4, 10).sum(axis=(0, 2))
        assert (changed * bpe <= budget).all()
    ratios = [b.gain / max(b.bytes_moved, 1e-9) for b in plan.batches]
    assert ratios == sorted(ratios, reverse=True)


def test_layer_over_budget_is_named():
    current = initial_phy2log(SHAPE)
    with pytest.raises(
        ValueError, match=r"layer \d+ alone needs \d+ staging bytes on rank \d+.*staging_budget_bytes=50"
    ):
        plan_rebalance("deepseek", current, skewed_load(), SHAPE, bytes_per_expert=100, staging_budget_bytes=50)


def test_min_layer_gain_skips_small_gains():
    current = initial_phy2log(SHAPE)
    load = skewed_load()
    full = plan_rebalance("migration", current, load, SHAPE)
    none = plan_rebalance("migration", current, load, SHAPE, min_layer_gain=2.0)
    assert full.batches and none.batches == ()
    assert np.array_equal(none.target_phy2log, current)
    assert none.balancedness_after == none.balancedness_before


def test_unknown_policy_names_choices():
    with pytest.raises(ValueError, match=r"unknown policy 'lpt'; choices: migration, deepseek"):
        plan_rebalance("lpt", initial_phy2log(SHAPE), skewed_load(), SHAPE)


@pytest.mark.parametrize(
    "kwargs,load_fix,match",
    [
        ({}, lambda load: load[:, :-1], r"logical_load has shape \(4, 15\), expected \(4, 16\)"),
        ({}, lambda load: np.where(np.arange(16) == 3, -1.0, load), r"logical_load\[0, 3\] = -1.0"),
        ({}, lambda load: np.where(np.arange(16) == 2, np.nan, load), r"logical_load\[0, 2\] = nan"),
        ({"bytes_per_expert": 0}, None, "bytes_per_expert must be a positive integer, got 0"),
        ({"staging_budget_bytes": -1}, None, "staging_budget_bytes .* got -1"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, load_fix, match):
    load = skewed_load()
    if load_fix is not None:
        load = load_fix(load)
    with pytest.raises(PlacementError, match=match):
        plan_rebalance("migration", initial_phy2log(SHAPE), load, SHAPE, **kwargs)


def test_bytes_per_expert_that_would_overflow_the_byte_counts_is_refused():
    """Before, ``bytes_per_expert=2**61`` gave ``bytes_moved`` -2**63 and ``2**62`` gave 0, silently."""
    slots = SHAPE.num_layers * SHAPE.num_physical
    largest = (2**63 - 1) // slots
    with pytest.raises(PlacementError, match=f"bytes_per_expert={largest + 1} is too large: .*at most {largest}"):
        plan_rebalance("migration", initial_phy2log(SHAPE), skewed_load(), SHAPE, bytes_per_expert=largest + 1)
    plan = plan_rebalance("migration", initial_phy2log(SHAPE), skewed_load(), SHAPE, bytes_per_expert=largest)
    assert plan.bytes_moved == sum(b.bytes_moved for b in plan.batches) > 0
    assert plan.bytes_moved % largest == 0


def test_bad_placement_and_hierarchy_name_the_value():
    bad = initial_phy2log(SHAPE)
    bad[2, 5] = 99
    with pytest.raises(PlacementError, match="layer 2: slot 5 holds expert 99"):
        plan_rebalance("migration", bad, skewed_load(), SHAPE)
    with pytest.raises(PlacementError, match="num_groups=3"):
        plan_rebalance("deepseek", initial_phy2log(SHAPE), skewed_load(), SHAPE, num_groups=3)
    with pytest.raises(PlacementError, match="num_nodes=3"):
        plan_rebalance("deepseek", initial_phy2log(SHAPE), skewed_load(), SHAPE, num_nodes=3)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 2**31 - 1),
    budget_slots=st.one_of(st.none(), st.integers(0, 12)),
    min_gain=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_batching_invariants(policy, seed, budget_slots, min_gain):
    shape = PlacementShape(6, 16, 24, 4)
    rng = np.random.default_rng(seed)
    current = np.stack([rng.permutation(np.r_[np.arange(16), rng.integers(0, 16, 8)]) for _ in range(6)])
    load = rng.gamma(0.5, 10.0, size=(6, 16))
    bpe = 3
    budget = None if budget_slots is None else budget_slots * bpe
    try:
        plan = plan_rebalance(
            policy, current, load, shape, bytes_per_expert=bpe, staging_budget_bytes=budget, min_layer_gain=min_gain
        )
    except ValueError as exc:
        assert budget is not None and "alone needs" in str(exc)
        return
    validate_phy2log(plan.target_phy2log, shape)
    seen = [layer for b in plan.batches for layer in b.layers]
    assert len(seen) == len(set(seen))
    changed_layers = set(np.flatnonzero((plan.target_phy2log != current).any(axis=1)).tolist())
    assert set(seen) == changed_layers
    for batch in plan.batches:
        assert batch.gain >= min_gain and batch.gain > 0
        rows = list(batch.layers)
        per_rank = (plan.target_phy2log[rows] != current[rows]).reshape(len(rows), 4, 6).sum(axis=(0, 2))
        if budget is not None:
            assert (per_rank * bpe <= budget).all()
    assert plan.balancedness_after >= plan.balancedness_before - 1e-12


def test_a_registered_policy_is_reached_by_name_through_the_same_entry_point():
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.policy import (
        RebalancePlan,
        plan_rebalance,
        policy_names,
        register_policy,
        unregister_policy,
    )

    calls = []

    def keep(current_phy2log, logical_load, shape, **options):
        calls.append(options["bytes_per_expert"])
        current = np.asarray(current_phy2log)
        return RebalancePlan(current, (), 1.0, 1.0, 0, 0)

    with pytest.raises(ValueError, match="is not one of"):
        CoordinatorConfig(world_size=2, policy="keep")
    register_policy("keep", keep)
    try:
        assert "keep" in policy_names() and CoordinatorConfig(world_size=2, policy="keep").policy == "keep"
        shape = PlacementShape(1, 4, 4, 2)
        plan = plan_rebalance("keep", initial_phy2log(shape), np.ones((1, 4)), shape, bytes_per_expert=7)
        assert plan.batches == () and calls == [7]
        with pytest.raises(ValueError, match="taken by a built-in policy"):
            register_policy("deepseek", keep)
    finally:
        unregister_policy("keep")
    assert "keep" not in policy_names()


def test_load_whose_total_overflows_is_refused_naming_it():
    """Entries near 1e308 are finite but their sums are not: every balancedness was NaN."""
    shape = PlacementShape(2, 4, 4, 2)
    load = np.array([[1.0, 2.0, 3.0, 4.0], [1e308, 1e308, 1.0, 1.0]])
    for policy in POLICIES:
        with pytest.raises(
            PlacementError, match=r"logical_load sums to inf \(its largest entry is \[1, 0\] = 1e\+308\)"
        ):
            plan_rebalance(policy, initial_phy2log(shape), load, shape)
    # Just below: every figure finite.
    plan = plan_rebalance("migration", initial_phy2log(shape), load / 2.5, shape)
    assert np.isfinite([plan.balancedness_before, plan.balancedness_after]).all()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(12))
def test_progress_reports_blocks_of_layers_and_changes_no_plan(policy, seed, monkeypatch):
    """With a progress callback the policy runs block by block; every layer is planned on its own,
    so the plan is the one a single call over all layers makes."""
    import eplb_service.coordinator.policy as policy_module

    shape = PlacementShape(13, 16, 24, 4)
    rng = np.random.default_rng(seed)
    current = np.stack([rng.permutation(np.arange(24) % 16) for _ in range(13)])
    load = rng.lognormal(0.0, 1.5, size=(13, 16)) * 1000
    whole = plan_rebalance(policy, current, load, shape, persistence=0.3, bytes_per_expert=7)
    monkeypatch.setattr(policy_module, "PROGRESS_BLOCK_SLOTS", 5 * 24)  # blocks of 5 layers
    seen = []
    blocked = plan_rebalance(
        policy, current, load, shape, persistence=0.3, bytes_per_expert=7, progress=lambda *a: seen.append(a)
    )
    assert seen == [(5, 13), (10, 13), (13, 13)]
    assert np.array_equal(blocked.target_phy2log, whole.target_phy2log)
    assert [(b.layers, b.bytes_moved, b.gain) for b in blocked.batches] == [
        (b.layers, b.bytes_moved, b.gain) for b in whole.batches
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "load",
    [[186.98664093634852, 566.0019953741505], [7.913940783283335e-301, 1.931264785898645e-301]],
)
def test_a_perfectly_balanced_layer_moves_nothing(policy, load):
    """Every rank holds two replicas of each expert: balanced whatever the load. A proposal that
    repacks it scored a float-rounding 'gain' (balancedness 1.0 -> 1.0000000000000002), and the
    plan moved 3 slots for it."""
    shape = PlacementShape(1, 2, 12, 3)
    current = initial_phy2log(shape)
    plan = plan_rebalance(policy, current, np.array([load]), shape)
    assert plan.experts_moved == 0 and plan.batches == ()
    assert np.array_equal(plan.target_phy2log, current)
