"""Persistence of the load's imbalance, the forecast built on it, and the price it puts on moves."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service.coordinator.load_forecast import (
    FORECAST_UP_TO,
    PLAN_AS_IS_FROM,
    forecast_load,
    persistence,
    planning_persistence,
)
from eplb_service.coordinator.load_window import LoadWindow
from eplb_service.coordinator.policy import build_plan, plan_rebalance
from eplb_service.coordinator.policy_migration import migration_phy2log, priced_layers
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log, rank_loads


def hopping_windows(windows: int, layers: int = 32, experts: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Each window the hottest expert's traffic moves to a random expert (Mixtral-sized layers)."""
    rng = np.random.default_rng(seed)
    popularity = np.tile(1.0 / np.arange(1, experts + 1), (layers, 1))
    for row in popularity:
        rng.shuffle(row)
    out = []
    for _ in range(windows):
        out.append(np.stack([rng.multinomial(200_000, p / p.sum()) for p in popularity]).astype(np.float64))
        hot = popularity.argmax(axis=1)
        other = rng.integers(0, experts, layers)
        rows = np.arange(layers)
        popularity[rows, hot], popularity[rows, other] = popularity[rows, other], popularity[rows, hot].copy()
    return out


def test_a_load_that_keeps_its_shape_persists_fully_and_its_forecast_is_itself():
    rng = np.random.default_rng(1)
    load = rng.gamma(1.0, 1000.0, size=(4, 16))
    assert persistence(load, load * 3.0) == pytest.approx(1.0)
    assert forecast_load(load, 1.0) is load or np.array_equal(forecast_load(load, 1.0), load)


def test_hot_experts_that_hop_every_window_persist_little():
    windows = hopping_windows(3)
    assert persistence(windows[0], windows[1]) < 0.5
    assert persistence(windows[1], windows[2]) < 0.5


def test_persistence_is_one_without_history_or_deviation_and_never_leaves_zero_to_one():
    load = np.arange(1.0, 9.0).reshape(1, 8)
    assert persistence(None, load) == 1.0
    assert persistence(np.ones((1, 8)), load) == 1.0  # a flat window has nothing to regress on
    assert persistence(np.ones((2, 8)), load) == 1.0  # shapes differ
    assert persistence(load, load[:, ::-1]) == 0.0  # anti-correlated: clipped at 0


def test_the_forecast_keeps_each_layers_total_and_mean_and_shrinks_deviations():
    load = np.array([[10.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = forecast_load(load, 0.25)
    assert np.allclose(out.sum(axis=1), load.sum(axis=1))
    assert (out >= 0).all()
    assert np.allclose(out[0] - out[0].mean(), 0.25 * (load[0] - load[0].mean()))


def test_a_layer_change_that_does_not_pay_for_its_slots_is_reset():
    current = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    proposed = np.array([[0, 2, 1, 3], [0, 2, 1, 3]])
    # Layer 0 gains a lot (ranks 11/1 -> 6/6), layer 1 a little (5.2/4.8 -> 5.1/4.9).
    load = np.array([[10.0, 1.0, 0.0, 1.0], [3.0, 2.2, 2.1, 2.7]])
    before = rank_loads(current, load, 2).max(axis=1)
    after = rank_loads(proposed, load, 2).max(axis=1)
    assert (before - after > 0).all()
    out = priced_layers(current, proposed, load, num_ranks=2, slot_price=0.1)
    assert np.array_equal(out[0], proposed[0]) and np.array_equal(out[1], current[1])
    assert np.array_equal(priced_layers(current, proposed, load, 2, 0.0), proposed)


def test_migration_moves_far_fewer_slots_on_hopping_hot_experts_when_told_they_do_not_last():
    windows = hopping_windows(8)
    shape = PlacementShape(32, 8, 8, 4)
    moved = {}
    for use_forecast in (False, True):
        current = initial_phy2log(shape)
        total = 0
        for i in range(1, len(windows)):
            lasting = persistence(windows[i - 1], windows[i]) if use_forecast else 1.0
            plan = plan_rebalance("migration", current, windows[i], shape, persistence=lasting)
            total += plan.experts_moved if i > 1 else 0
            current = plan.target_phy2log
        moved[use_forecast] = total
    assert moved[True] < 0.5 * moved[False], moved


def test_full_persistence_leaves_the_migration_policy_unchanged():
    rng = np.random.default_rng(3)
    load = rng.gamma(0.7, 500.0, size=(6, 16))
    current = initial_phy2log(PlacementShape(6, 16, 20, 4))
    assert np.array_equal(migration_phy2log(current, load, 4), migration_phy2log(current, load, 4, persistence=1.0))


def test_the_plan_keeps_the_forecast_where_imbalance_fades_and_the_load_where_it_lasts():
    grid = np.linspace(0.0, 1.0, 1001)
    kept = np.array([planning_persistence(a) for a in grid])
    low, high = grid <= FORECAST_UP_TO, grid >= PLAN_AS_IS_FROM
    assert np.array_equal(kept[low], grid[low]) and (kept[high] == 1.0).all()
    assert (np.diff(kept) >= 0).all() and (kept >= grid).all()
    assert np.abs(np.diff(kept)).max() < 0.01  # continuous: no jump where a crosses a line


def test_where_most_imbalance_lasts_the_plan_is_for_the_load_as_it_is_priced_by_the_persistence():
    rng = np.random.default_rng(11)
    shape = PlacementShape(8, 16, 24, 4)
    load = rng.gamma(0.6, 400.0, size=(8, 16))
    current = initial_phy2log(shape)
    plan = plan_rebalance("migration", current, load, shape, persistence=0.8)
    expected = build_plan(current, migration_phy2log(current, load, 4, persistence=0.8), load, shape)
    assert np.array_equal(plan.target_phy2log, expected.target_phy2log)
    shrunk = forecast_load(load, 0.3)
    low = plan_rebalance("migration", current, load, shape, persistence=0.3)
    assert np.array_equal(
        low.target_phy2log,
        build_plan(current, migration_phy2log(current, shrunk, 4, persistence=0.3), shrunk, shape).target_phy2log,
    )


def test_a_new_hot_expert_that_lasts_is_provisioned_for_its_load_not_the_shrunk_forecast():
    # A quarter of the layers gain a hot expert from nowhere (persistence about 0.75) and it is
    # still there next window: the plan for the load as it is leaves the lower largest rank.
    rng = np.random.default_rng(5)
    layers, experts = 16, 16
    shape = PlacementShape(layers, experts, 24, 4)
    before = rng.gamma(2.0, 300.0, size=(layers, experts))
    after = before.copy()
    rows = np.arange(0, layers, 4)
    after[rows, rng.integers(0, experts, rows.size)] = 4 * before.max()
    current = plan_rebalance("migration", initial_phy2log(shape), before, shape).target_phy2log
    now = plan_rebalance("migration", current, after, shape, persistence=0.75).target_phy2log
    shrunk = forecast_load(after, 0.75)
    then = build_plan(current, migration_phy2log(current, shrunk, 4, persistence=0.75), shrunk, shape).target_phy2log
    peak_now, peak_then = rank_loads(now, after, 4).max(axis=1), rank_loads(then, after, 4).max(axis=1)
    assert (peak_now[rows] <= peak_then[rows] + 1e-9).all() and peak_now[rows].sum() < peak_then[rows].sum()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "high"])
def test_plan_rebalance_names_a_bad_persistence(bad):
    shape = PlacementShape(1, 4, 4, 2)
    with pytest.raises(PlacementError, match="persistence must be a number in \\[0, 1\\]"):
        plan_rebalance("migration", initial_phy2log(shape), np.ones((1, 4)), shape, persistence=bad)


def test_the_load_window_measures_persistence_on_its_two_newest_complete_segments():
    window = LoadWindow(num_layers=1, num_logical=4, half_life_steps=100)
    a = np.array([[8.0, 1.0, 1.0, 2.0]])
    b = np.array([[1.0, 8.0, 2.0, 1.0]])
    window.add(a, 0, 50)
    window.add(a, 50, 100)
    assert window.persistence() == 1.0  # one segment, still the newest
    window.add(b, 100, 150)
    assert window.persistence() == 1.0  # [0, 100) complete, [100, 200) filling
    window.add(b, 200, 250)
    assert window.persistence() == pytest.approx(persistence(2 * a, b))
    window.add(b, 300, 350)  # segments 1 and 2 complete now: b then b
    assert window.persistence() == pytest.approx(1.0)
    assert sorted(window.segments) == [1, 2, 3]


def test_persistence_is_pooled_over_every_layer_not_read_off_one():
    """A layer that keeps its shape and one that keeps 14/34 of its deviations, with equal spread:
    their pooled slope is the mean of the two, whichever layer comes first."""
    kept, shrunk = np.array([8.0, 1.0, 1.0, 2.0]), np.array([5.0, 2.0, 2.0, 3.0])
    assert persistence(kept[None], shrunk[None]) == pytest.approx(14 / 34)
    for order in ((0, 1), (1, 0)):
        previous = np.stack([kept, kept])[list(order)]
        latest = np.stack([kept, shrunk])[list(order)]
        assert persistence(previous, latest) == pytest.approx((1 + 14 / 34) / 2)


def test_the_load_window_measures_no_persistence_across_a_segment_without_load():
    """Segments 0 and 2 complete, 1 empty (an idle stretch): they are two half-lives apart, not
    adjacent windows, so the window plans for the load as it is (1.0)."""
    window = LoadWindow(num_layers=1, num_logical=4, half_life_steps=100)
    window.add(np.array([[8.0, 1.0, 1.0, 2.0]]), 0, 50)
    window.add(np.array([[1.0, 8.0, 2.0, 1.0]]), 200, 250)
    window.add(np.array([[1.0, 8.0, 2.0, 1.0]]), 300, 350)
    assert sorted(window.segments) == [0, 2, 3] and window.persistence() == 1.0


def test_a_layer_idle_in_either_window_does_not_weigh_on_the_persistence():
    """Mutation: every layer pooled (``both = prev.sum(axis=1) >= 0``). A layer with load before
    and none now added its deviations to the spread and nothing to the covariance: 0.78 read
    0.66 here, and a lasting imbalance could read as one that fades."""
    rng = np.random.default_rng(0)
    previous = rng.gamma(1.0, 10.0, size=(4, 8))
    latest = previous + rng.gamma(1.0, 3.0, size=(4, 8))
    alone = persistence(previous[:3], latest[:3])
    went_idle, was_idle = latest.copy(), previous.copy()
    went_idle[3] = 0.0
    was_idle[3] = 0.0
    assert persistence(previous, went_idle) == pytest.approx(alone, abs=1e-12)
    assert persistence(was_idle, latest) == pytest.approx(alone, abs=1e-12)
    assert alone != pytest.approx(persistence(previous, latest), abs=1e-4)  # the layer counts when busy
