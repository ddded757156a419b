"""Small layers planned exactly (``eplb_service.coordinator.policy_exact``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_exact import (
    EXACT_MAX_LAYOUTS,
    EXACT_MOVE_PRICE,
    SPARE_LAYER_PRICE,
    SPARE_MOVE_PRICE,
    exact_phy2log,
    layouts,
    local_candidates,
    local_phy2log,
    plans_exactly,
    plans_locally,
    small_layouts,
)
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log, rank_loads, validate_phy2log


def brute_force_best_peak(load: np.ndarray, experts: int, ranks: int, per_rank: int) -> float:
    """The smallest largest rank load over every assignment of slots to experts (each expert at
    least once, never twice on a rank), found without the layouts' enumeration."""
    best = np.inf
    rank_sets = list(itertools.combinations(range(experts), per_rank))
    for chosen in itertools.product(rank_sets, repeat=ranks):
        counts = np.zeros(experts)
        for s in chosen:
            counts[list(s)] += 1
        if (counts == 0).any():
            continue
        peak = max(sum(load[e] / counts[e] for e in s) for s in chosen)
        best = min(best, peak)
    return float(best)


def layout_key(row: np.ndarray, per_rank: int) -> tuple:
    """A row's layout: its ranks' expert sets, in order."""
    ranks = len(row) // per_rank
    return tuple(sorted(tuple(sorted(int(e) for e in row[r * per_rank : (r + 1) * per_rank])) for r in range(ranks)))


def test_layouts_count_the_distinct_ways_to_lay_a_layer_and_the_slots_between_them():
    pairs = layouts(8, 4, 2)
    assert len(pairs) == 105  # the pairings of 8 experts
    eight_plus_two = layouts(8, 2, 5)
    assert len(eight_plus_two) == 280  # two 5-sets covering 8 experts share 2: C(8,5) * C(5,2) / 2
    for space in (pairs, eight_plus_two):
        assert (np.diag(space.moves) == 0).all() and (space.moves == space.moves.T).all()
        off = space.moves[~np.eye(len(space), dtype=bool)]
        assert off.min() == (2 if space is pairs else 1)  # no redundancy: an exchange; else one slot
        assert np.allclose(space.weights.sum(axis=1), 1.0)  # every expert's load is carried once
    with pytest.raises(ValueError, match="8 experts on 4 ranks of 3 slots: 455126 candidate layouts"):
        layouts(8, 4, 3)
    with pytest.raises(ValueError, match="9 experts cannot each sit once on 2 ranks of 4 slots"):
        layouts(9, 2, 4)
    assert small_layouts(8, 4, 3) is None and EXACT_MAX_LAYOUTS >= 280


def test_only_small_layers_with_redundant_slots_or_a_fading_load_are_planned_exactly():
    assert plans_exactly(8, 10, 2)  # Mixtral 8+2 on 2 GPUs
    # No redundant slot: only where the plan is made for the forecast (module docstring).
    assert not plans_exactly(8, 8, 4) and not plans_exactly(8, 8, 4, persistence=0.6)
    assert plans_exactly(8, 8, 4, persistence=0.59) and plans_exactly(8, 8, 2, persistence=0.0)
    assert plans_exactly(8, 10, 2, persistence=0.9)  # with redundant slots the persistence does not matter
    # A fresh plan without redundant slots, where DeepSeek's packing may miss the best split:
    # ranks of more than 2 slots (on ranks of 2 it is the best pairing).
    assert plans_exactly(8, 8, 2, fresh=True) and not plans_exactly(8, 8, 2)
    assert not plans_exactly(8, 8, 4, fresh=True) and not plans_exactly(6, 6, 3, fresh=True)
    assert not plans_exactly(16, 16, 8, persistence=0.0)  # more than 4 ranks
    assert not plans_exactly(8, 12, 4)  # 74 900 layouts
    assert not plans_exactly(64, 80, 8)
    # Layouts are compared over every way to lay one on the other's ranks (ranks!): at most 4
    # ranks, however few the layouts (8 + 1 on 9 ranks took 4.9 s to enumerate before).
    assert not plans_exactly(8, 9, 9) and not plans_exactly(2, 10, 10)
    with pytest.raises(ValueError, match="9 ranks: layouts are weighed on at most 4 ranks"):
        layouts(8, 9, 1)


def test_at_no_price_every_layer_takes_a_best_layout():
    rng = np.random.default_rng(4)
    load = rng.gamma(0.6, 100.0, size=(6, 6))
    shape = PlacementShape(6, 6, 8, 2)  # 6 experts + 2 on 2 ranks of 4
    current = initial_phy2log(shape)
    planned = exact_phy2log(current, load, 2, move_price=0.0)
    validate_phy2log(planned, shape)
    peaks = rank_loads(planned, load, 2).max(axis=1)
    for layer in range(6):
        assert peaks[layer] == pytest.approx(brute_force_best_peak(load[layer], 6, 2, 4))


def test_a_dear_price_keeps_the_layout_and_a_move_keeps_every_slot_it_can():
    rng = np.random.default_rng(7)
    shape = PlacementShape(8, 8, 10, 2)
    load = rng.gamma(0.5, 100.0, size=(8, 8))
    current = exact_phy2log(initial_phy2log(shape), load, 2, move_price=0.0)
    assert np.array_equal(exact_phy2log(current, load, 2, move_price=100.0), current)
    moved_load = load[:, ::-1].copy()
    cheap = exact_phy2log(current, moved_load, 2, move_price=0.0)
    priced = exact_phy2log(current, moved_load, 2, move_price=0.05)
    space = layouts(8, 2, 5)
    index = {tuple(tuple(int(e) for e in rank) for rank in m): i for i, m in enumerate(space.members)}
    for planned in (cheap, priced):
        validate_phy2log(planned, shape)
        # Slots changed are exactly the layouts' distance: the ranks were laid, and the slots
        # inside them ordered, to keep every expert that stays.
        for layer in range(8):
            changed = int((planned[layer] != current[layer]).sum())
            before, after = index[layout_key(current[layer], 5)], index[layout_key(planned[layer], 5)]
            assert changed == space.moves[before, after]
    assert (priced != current).sum() <= (cheap != current).sum()
    assert rank_loads(cheap, moved_load, 2).max(axis=1).sum() <= rank_loads(priced, moved_load, 2).max(axis=1).sum()


def test_a_layer_price_is_paid_once_per_changed_layer_and_holds_back_one_slot_follow_ups():
    """``layer_price`` adds one charge to every candidate that changes the layer at all: each
    plan is the cheapest by ``peak / mean + move_price x slots + layer_price x [slots > 0]``
    (every layout weighed, and every change of up to two slots where the layouts are too many),
    and layers a plain slot price would change by one slot stay where the charge outweighs it."""
    rng = np.random.default_rng(11)
    shape = PlacementShape(32, 8, 10, 2)
    base = rng.gamma(0.5, 100.0, size=(32, 8))
    current = exact_phy2log(initial_phy2log(shape), base, 2, move_price=0.0)
    drifted = base * rng.lognormal(0.0, 0.3, size=base.shape)  # small changes: one-slot follow-ups
    space = layouts(8, 2, 5)
    index = {tuple(tuple(int(e) for e in rank) for rank in m): i for i, m in enumerate(space.members)}
    peaks = space.max_loads(drifted) / (drifted.sum(axis=1) / 2)[:, None]
    plain = exact_phy2log(current, drifted, 2, move_price=0.045)
    charged = exact_phy2log(current, drifted, 2, move_price=0.045, layer_price=0.02)
    for layer in range(32):
        moves = space.moves[index[layout_key(current[layer], 5)]]
        costs = peaks[layer] + 0.045 * moves + 0.02 * (moves > 0)
        after = index[layout_key(charged[layer], 5)]
        assert costs[after] == pytest.approx(costs.min(), abs=1e-6)
    plain_changed, charged_changed = (plain != current).sum(axis=1), (charged != current).sum(axis=1)
    assert (plain_changed == 1).sum() > (charged_changed == 1).sum()
    assert 0 < (charged_changed > 0).sum() < (plain_changed > 0).sum()
    # Where the layouts are too many (8 + 4 on 4 ranks of 3), the same cost over changes of up to two slots.
    local_shape = PlacementShape(6, 8, 12, 4)
    local_current = plan_rebalance("deepseek", initial_phy2log(local_shape), base[:6], local_shape).target_phy2log
    local_load = drifted[:6]
    planned = local_phy2log(local_current, local_load, 4, move_price=0.045, layer_price=0.02)
    changed = (planned != local_current).sum(axis=1)
    cost = rank_loads(planned, local_load, 4).max(axis=1) / (local_load.sum(axis=1) / 4) + 0.045 * changed
    cost += 0.02 * (changed > 0)
    for layer in range(6):
        best = brute_force_best_within_two(local_current[layer], local_load[layer], 4, 0.045, layer_price=0.02)
        assert cost[layer] == pytest.approx(best)


def test_a_current_row_with_an_expert_twice_on_a_rank_is_always_re_laid():
    current = np.array([[0, 0, 1, 2, 3, 4, 5, 6, 7, 1]])  # expert 0 twice on rank 0
    load = np.ones((1, 8))
    planned = exact_phy2log(current, load, 2, move_price=100.0)
    validate_phy2log(planned, PlacementShape(1, 8, 10, 2))
    assert all(len(set(planned[0, r * 5 : (r + 1) * 5])) == 5 for r in range(2))


def test_the_migration_policy_plans_mixtral_8_plus_2_exactly():
    rng = np.random.default_rng(2)
    shape = PlacementShape(16, 8, 10, 2)
    load = rng.gamma(0.5, 100.0, size=(16, 8))
    current = initial_phy2log(shape)
    fresh = plan_rebalance("migration", current, load, shape, fresh=True)
    best = [brute_force_best_peak(load[layer], 8, 2, 5) for layer in range(16)]
    peaks = rank_loads(fresh.target_phy2log, load, 2).max(axis=1)
    assert np.allclose(peaks, best)  # the first plan: a best layout in every layer
    # A plan from there at a load that moved pays for what it moves: at most what the free plan moves.
    moved = load[:, ::-1].copy()
    later = plan_rebalance("migration", fresh.target_phy2log, moved, shape)
    free = exact_phy2log(fresh.target_phy2log, moved, 2, move_price=0.0)
    assert 0 < later.experts_moved <= int((free != fresh.target_phy2log).sum())


def test_a_fresh_plan_without_redundant_slots_takes_a_best_split_where_deepseek_s_packing_misses_it():
    """On ranks of 4 slots (Mixtral 8+0 on 2 GPUs) the greedy packing a fresh plan used to lay
    misses the best split in some layers, and the first measured plan spent the difference; on
    ranks of 2 slots the greedy packing is a best pairing, and a fresh plan takes the roomiest."""
    rng = np.random.default_rng(5)
    load = rng.gamma(0.7, 100.0, size=(40, 8))
    two_ranks = PlacementShape(40, 8, 8, 2)
    best = np.array([brute_force_best_peak(load[layer], 8, 2, 4) for layer in range(40)])
    fresh = plan_rebalance("migration", initial_phy2log(two_ranks), load, two_ranks, fresh=True)
    greedy = plan_rebalance("deepseek", initial_phy2log(two_ranks), load, two_ranks)
    assert np.allclose(rank_loads(fresh.target_phy2log, load, 2).max(axis=1), best)
    greedy_peaks = rank_loads(greedy.target_phy2log, load, 2).max(axis=1)
    assert (greedy_peaks > best + 1e-9).sum() >= 3  # the loads are ones where it matters
    four_ranks = PlacementShape(40, 8, 8, 4)
    fresh = plan_rebalance("migration", initial_phy2log(four_ranks), load, four_ranks, fresh=True)
    greedy = plan_rebalance("deepseek", initial_phy2log(four_ranks), load, four_ranks)
    ordered = np.sort(load, axis=1)
    best_pairs = (ordered[:, :4] + ordered[:, ::-1][:, :4]).max(axis=1)  # the hottest with the coldest, and so on
    assert np.allclose(rank_loads(greedy.target_phy2log, load, 4).max(axis=1), best_pairs)
    # On ranks of 2 the fresh plan is a best pairing too, the least even of them (policy_lookahead).
    fresh_ranks = rank_loads(fresh.target_phy2log, load, 4)
    greedy_ranks = rank_loads(greedy.target_phy2log, load, 4)
    assert np.allclose(fresh_ranks.max(axis=1), best_pairs)
    assert np.all((fresh_ranks**2).sum(axis=1) >= (greedy_ranks**2).sum(axis=1) - 1e-6)
    assert np.any((fresh_ranks**2).sum(axis=1) > (greedy_ranks**2).sum(axis=1) + 1e-6)


def test_the_price_holds_back_moves_that_gain_too_little_and_ties_keep_the_layout():
    """The price per slot is what separates a plan from the best layout: a small drift moves
    nothing at the price and something without it; a layer where every layout ties stays."""
    shape = PlacementShape(32, 8, 10, 2)
    rng = np.random.default_rng(11)
    load = rng.gamma(0.8, 100.0, size=(32, 8))
    current = exact_phy2log(initial_phy2log(shape), load, 2, move_price=0.0)
    drifted = load * rng.uniform(0.9, 1.1, size=load.shape)  # a few percent per expert
    free = exact_phy2log(current, drifted, 2, move_price=0.0)
    priced = exact_phy2log(current, drifted, 2, move_price=0.05)
    assert (free != current).sum() > (priced != current).sum()
    # Whatever the priced plan moved gained more than its price per slot.
    space = layouts(8, 2, 5)
    mean = drifted.sum(axis=1) / 2
    before = rank_loads(current, drifted, 2).max(axis=1) / mean
    after = rank_loads(priced, drifted, 2).max(axis=1) / mean
    changed = (priced != current).sum(axis=1)
    assert (before - after >= 0.05 * changed - 1e-9).all() and len(space) == 280
    # Every layout carries an even load equally (4 experts' worth per rank): all tie, none moves.
    even = np.ones((32, 8))
    assert np.array_equal(exact_phy2log(current, even, 2, move_price=0.0), current)


def test_the_policy_prices_exact_layers_by_the_controller_s_cheaper_scale_only(monkeypatch):
    """``spend_scale`` below 1 makes moves cheaper here; above 1 it changes nothing (these layers
    have no fine-pass room to narrow) and the balance lead's ``price_scale`` is not applied."""
    from eplb_service.coordinator import policy_exact

    prices = []

    def spy(current, load, num_ranks, *, move_price, layer_price=0.0):
        prices.append(move_price if layer_price == 0.0 else (move_price, layer_price))
        return exact_phy2log(current, load, num_ranks, move_price=move_price, layer_price=layer_price)

    monkeypatch.setattr(policy_exact, "exact_phy2log", spy)
    shape = PlacementShape(4, 8, 10, 2)
    load = np.random.default_rng(1).gamma(0.5, 100.0, size=(4, 8))
    current = initial_phy2log(shape)
    for spend_scale, price_scale in ((1.0, 1.0), (0.25, 1.0), (4.0, 1.0), (1.0, 8.0)):
        plan_rebalance("migration", current, load, shape, spend_scale=spend_scale, price_scale=price_scale)
    plan_rebalance("migration", current, load, shape, fresh=True)
    # Redundant slots: the spare prices, the slot price scaled, the layer price not; a fresh plan free.
    spare, layer = SPARE_MOVE_PRICE, SPARE_LAYER_PRICE
    assert prices == [(spare, layer), (spare / 4, layer), (spare, layer), (spare, layer), 0.0]
    # The lead's factor for these layers (exact_price_scale) multiplies the slot price only.
    prices.clear()
    plan_rebalance("migration", current, load, shape, spend_scale=0.5, exact_price_scale=4.0)
    assert prices == [(pytest.approx(spare * 0.5 * 4.0), layer)]
    with pytest.raises(PlacementError, match=r"exact_price_scale must be a number in \[1, 8\], got 0.5"):
        plan_rebalance("migration", current, load, shape, exact_price_scale=0.5)
    # Shapes outside the exact path never reach it: no redundant slot with a lasting load, or too
    # many layouts.
    prices.clear()
    for other in (PlacementShape(4, 8, 8, 4), PlacementShape(4, 8, 12, 4), PlacementShape(4, 16, 20, 2)):
        other_load = np.ones((4, other.num_logical)) + load[:, :1]
        plan_rebalance("migration", initial_phy2log(other), other_load, other, persistence=0.9)
    assert prices == []
    # Without redundant slots, a load whose imbalance mostly fades is planned here, at its own
    # price whatever the lead's factor.
    no_spare = PlacementShape(4, 8, 8, 4)
    plan_rebalance("migration", initial_phy2log(no_spare), load, no_spare, persistence=0.3, exact_price_scale=8.0)
    assert prices == [EXACT_MOVE_PRICE]
    # So is a fresh plan on ranks of 4 slots (at no price), not one on ranks of 2.
    prices.clear()
    plan_rebalance("migration", initial_phy2log(no_spare), load, no_spare, fresh=True)
    four_per_rank = PlacementShape(4, 8, 8, 2)
    plan_rebalance("migration", initial_phy2log(four_per_rank), load, four_per_rank, fresh=True)
    assert prices == [0.0]


def brute_force_best_within_two(
    row: np.ndarray, load: np.ndarray, ranks: int, price: float, *, layer_price: float = 0.0
) -> float:
    """The smallest ``peak / mean + price x changed (+ layer_price where any)`` over every valid row
    within two changed slots, found by plain loops."""
    per_rank, experts = len(row) // ranks, len(load)
    best = np.inf
    for a, b in itertools.combinations_with_replacement(range(len(row)), 2):
        for x in range(experts):
            for y in range(experts):
                new = row.copy()
                new[a], new[b] = x, y
                counts = np.bincount(new, minlength=experts)
                if (counts == 0).any() or any(
                    len(set(new[r * per_rank : (r + 1) * per_rank])) < per_rank for r in range(ranks)
                ):
                    continue
                peak = max(
                    sum(load[e] / counts[e] for e in new[r * per_rank : (r + 1) * per_rank]) for r in range(ranks)
                )
                changed = int((new != row).sum())
                best = min(best, peak / (load.sum() / ranks) + price * changed + layer_price * (changed > 0))
    return best


def test_layers_with_too_many_layouts_take_the_cheapest_change_of_up_to_two_slots():
    """Mixtral 8+4 on 4 ranks of 3 (74 900 layouts): every row within two changed slots weighed."""
    assert plans_locally(8, 12, 4) and not plans_exactly(8, 12, 4)
    assert not plans_locally(8, 10, 2)  # weighed whole instead
    assert not plans_locally(8, 8, 4) and not plans_locally(64, 80, 8)  # no redundancy; too many rows
    assert local_candidates(12, 8) == 12 * 8 + 66 * 64
    shape = PlacementShape(6, 8, 12, 4)
    rng = np.random.default_rng(5)
    current = plan_rebalance(
        "deepseek", initial_phy2log(shape), rng.gamma(0.6, 100.0, size=(6, 8)), shape
    ).target_phy2log
    load = rng.gamma(0.6, 100.0, size=(6, 8))  # a new load: something is worth moving
    for price in (0.0, 0.05):
        planned = local_phy2log(current, load, 4, move_price=price)
        validate_phy2log(planned, shape)
        assert ((planned != current).sum(axis=1) <= 2).all()
        mean = load.sum(axis=1) / 4
        cost = rank_loads(planned, load, 4).max(axis=1) / mean + price * (planned != current).sum(axis=1)
        for layer in range(6):
            assert cost[layer] == pytest.approx(brute_force_best_within_two(current[layer], load[layer], 4, price))
    # At a prohibitive price a row stays, unless it holds an expert twice on a rank (DeepSeek's
    # packing can): that is mended, as cheaply as it can be.
    kept = local_phy2log(current, load, 4, move_price=100.0)
    doubled = np.array([any(len(set(row[r * 3 : (r + 1) * 3])) < 3 for r in range(4)) for row in current])
    assert (kept[~doubled] == current[~doubled]).all()
    assert all(len(set(row[r * 3 : (r + 1) * 3])) == 3 for row in kept for r in range(4))


def test_without_redundant_slots_a_fading_load_takes_the_cheapest_pairing_of_all():
    """Mixtral 8 + 0 on 4 ranks of 2 where most of the imbalance fades (persistence 0.3): each layer
    takes, of all 105 pairings, the one with the least ``peak / mean + price x slots moved`` under
    the forecast the policy plans for, re-pairing several ranks at once where that pays."""
    from eplb_service.coordinator.load_forecast import forecast_load, planning_persistence

    rng = np.random.default_rng(5)
    shape = PlacementShape(24, 8, 8, 4)
    load = rng.gamma(0.4, 100.0, size=(24, 8))
    current = np.argsort(-load, axis=1)  # the hottest two on rank 0, the next two on rank 1, ...
    plan = plan_rebalance("migration", current, load, shape, persistence=0.3)
    validate_phy2log(plan.target_phy2log, shape)
    planned_for = forecast_load(load, planning_persistence(0.3))
    space = layouts(8, 4, 2)
    index = {tuple(tuple(int(e) for e in rank) for rank in m): i for i, m in enumerate(space.members)}
    mean = planned_for.sum(axis=1) / 4
    peaks = space.max_loads(planned_for) / mean[:, None]
    changed = (plan.target_phy2log != current).sum(axis=1)
    for layer in range(24):
        before = index[layout_key(current[layer], 2)]
        after = index[layout_key(plan.target_phy2log[layer], 2)]
        costs = peaks[layer] + EXACT_MOVE_PRICE * space.moves[before]
        assert costs[after] == pytest.approx(costs.min(), abs=1e-6)
        assert changed[layer] == space.moves[before, after]  # every slot whose expert stays kept its place
    assert (changed > 2).any()  # some layers re-paired more than one exchange's worth
