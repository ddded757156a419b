"""The exact online optimum of Mixtral 8+0's swap cells in a model (``bench/swap_optimum.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.planner import REVERSION, WALK_STEP, WORKLOADS, popularity_shares
from bench.swap_optimum import (
    HOPS,
    HOT_HOPS,
    PAIRS,
    REBALANCES,
    WINDOWS,
    best_within,
    deepseek_labels,
    deepseek_policy,
    layer_shares,
    layer_walks,
    main,
    optimal_policy,
    over_hops,
    receding_policy,
    run_policy,
    swap_optimum,
    walk_logits,
)

LAYERS = 4
SWAP = next(w for w in WORKLOADS if w.label == "lognormal, swap, low noise")


@pytest.fixture(scope="module")
def shares():
    return layer_shares(SWAP, (0,), LAYERS)[0]


@pytest.fixture(scope="module")
def cost(shares):
    return PAIRS.max_loads(shares)


def test_each_hop_relabels_the_pairings_and_undoes_itself():
    num, count = HOPS.shape
    assert (num, count) == (8, len(PAIRS))
    assert np.array_equal(HOPS[0], np.arange(count))  # the hottest landing on itself changes nothing
    for hop in HOPS:
        assert np.array_equal(np.sort(hop), np.arange(count))  # a permutation of the pairings
        assert np.array_equal(hop[hop], np.arange(count))  # its own inverse
    members = PAIRS.members
    for r in range(1, num):
        for s in (0, 17, 104):
            swapped = np.where(members[s] == 0, -1, members[s])
            swapped = np.where(swapped == r, 0, swapped)
            swapped = np.where(swapped == -1, r, swapped)
            after = {tuple(sorted(rank)) for rank in members[HOPS[r][s]].tolist()}
            assert after == {tuple(sorted(rank)) for rank in swapped.tolist()}


def test_a_hop_keeps_probability_and_spreads_a_state_over_its_eight_cases():
    dist = np.zeros((1, len(PAIRS)))
    dist[0, 5] = 1.0
    spread = over_hops(dist)
    assert np.isclose(spread.sum(), 1.0)
    assert np.isclose(spread[0, 5], np.mean(HOPS[:, 5] == 5))
    assert set(np.flatnonzero(spread[0])) == set(HOPS[:, 5].tolist())


def test_deepseek_packs_the_hottest_with_the_coldest_and_pays_for_six_hops_in_eight(shares, cost):
    packed = deepseek_labels(shares)
    for layer in range(LAYERS):
        ranks = {tuple(sorted(rank)) for rank in PAIRS.members[packed[layer]].tolist()}
        assert (0, 7) in ranks
    outcome = deepseek_policy(cost, packed)
    # Hops onto itself or onto its partner keep its pairing; the six others cost one exchange.
    assert np.allclose(outcome.moves, REBALANCES * 6 / 8 * 2)
    expected = np.mean([cost[np.arange(LAYERS), HOPS[r][packed]] for r in range(8)], axis=0)
    assert np.allclose(outcome.peaks, REBALANCES * expected)


def test_free_moves_take_each_rebalances_best_hedged_pairing(cost):
    outcome, objective = optimal_policy(cost, 0.0)
    hedged = np.mean([cost[:, hop] for hop in HOPS], axis=0).min(axis=1)
    assert np.allclose(outcome.peaks, REBALANCES * hedged)
    assert np.isclose(objective, outcome.peaks.sum(), rtol=1e-6)


def test_the_optimum_beats_every_other_online_policy_at_its_price(shares, cost):
    packed = deepseek_labels(shares)
    for lam in (0.0, 0.003, 0.01, 0.05):
        best, objective = optimal_policy(cost, lam)
        assert np.isclose(objective, best.peaks.sum() + lam * best.moves.sum(), rtol=1e-6)
        ds = deepseek_policy(cost, packed)
        assert objective <= ds.peaks.sum() + lam * ds.moves.sum() + 1e-6  # ties broken by 1e-9 a slot
        for depth in (1, 2):
            near = receding_policy(cost, lam, depth)
            assert objective <= near.peaks.sum() + lam * near.moves.sum() + 1e-6


def test_a_prohibitive_price_keeps_the_best_warm_up_pairing_throughout(cost):
    outcome, _ = optimal_policy(cost, 10.0)
    assert np.allclose(outcome.moves, 0.0)
    count = len(PAIRS)
    every_start = np.repeat(cost, count, axis=0)  # each layer once per warm-up pairing
    stay = [np.tile(np.arange(count), (len(every_start), 1))] * REBALANCES
    kept = run_policy(every_start, stay, np.tile(np.arange(count), len(cost))).peaks.reshape(len(cost), count)
    assert np.allclose(outcome.peaks, kept.min(axis=1))
    slots = [optimal_policy(cost, lam)[0].moves.sum() for lam in (0.0, 0.005, 0.02, 10.0)]
    assert all(a >= b - 1e-9 for a, b in zip(slots, slots[1:], strict=False))


def test_best_within_mixes_two_prices_and_refuses_what_no_policy_fits():
    points = [(0.0, 10.0), (100.0, 6.0), (200.0, 5.0)]
    assert best_within(points, 0.0) == 10.0
    assert np.isclose(best_within(points, 50.0), 8.0)
    assert np.isclose(best_within(points, 150.0), 5.5)
    assert best_within(points, 500.0) == 5.0
    assert best_within([(10.0, 1.0)], 5.0) == np.inf


def test_only_swap_cells_are_modelled():
    abrupt = next(w for w in WORKLOADS if w.label == "lognormal, abrupt, low noise")
    with pytest.raises(ValueError, match="swap drift only"):
        swap_optimum(abrupt, (0,), LAYERS)
    with pytest.raises(ValueError, match="depth 0"):
        receding_policy(np.zeros((1, len(PAIRS))), 0.01, 0)


def test_a_cell_reads_deepseek_free_and_the_budget_in_order():
    r = swap_optimum(SWAP, (0,), LAYERS)
    assert abs(r.free - r.deepseek) < 0.01  # DeepSeek's packing is as good as any, hedged over the hops
    assert r.stay < r.at_matrix_budget <= r.free + 1e-12
    assert r.myopic <= r.at_matrix_budget + 1e-12
    assert r.deepseek_slots == pytest.approx(LAYERS * REBALANCES * 1.5)
    assert r.matrix_slots > 0


def test_the_command_prints_a_row_per_cell(capsys):
    main(["--seeds", "0", "--workloads", "zipf-1.4"])
    out = capsys.readouterr().out
    assert "| zipf-1.4, swap, low noise |" in out
    assert "| zipf-1.4, swap, high noise |" in out
    assert out.count("| zipf-1.4") == 2
    assert out.count("\n| ") == 3  # the header and the two cells


def test_any_label_can_be_the_hottest_that_hops():
    num = HOT_HOPS.shape[0]
    assert np.array_equal(HOT_HOPS[0], HOPS)
    for hot in range(num):
        assert np.array_equal(HOT_HOPS[hot, hot], np.arange(len(PAIRS)))  # landing on itself
        for r in range(num):
            hop = HOT_HOPS[hot, r]
            assert np.array_equal(hop[hop], np.arange(len(PAIRS)))
            assert np.array_equal(hop, HOT_HOPS[r, hot])  # a trade of two labels, either way round
    table = np.random.default_rng(0).random((3, len(PAIRS)))
    assert np.allclose(over_hops(table, np.zeros(3, dtype=np.int64)), over_hops(table))
    spread = over_hops(np.eye(len(PAIRS))[[4, 4, 4]], np.array([0, 3, 7]))
    assert np.allclose(spread.sum(axis=1), 1.0)
    assert not np.allclose(spread[0], spread[1])  # another label hopping spreads the state elsewhere


def test_windows_that_do_not_change_read_as_the_fixed_model(shares, cost):
    windows = np.broadcast_to(cost, (WINDOWS, *cost.shape)).copy()
    hot = np.zeros((WINDOWS, len(cost)), dtype=np.int64)
    packed = deepseek_labels(shares)
    for lam in (0.0, 0.006):
        fixed, fixed_objective = optimal_policy(cost, lam)
        varying, varying_objective = optimal_policy(windows, lam, hot=hot)
        assert np.allclose(fixed.peaks, varying.peaks) and np.allclose(fixed.moves, varying.moves)
        assert np.isclose(fixed_objective, varying_objective)
        near, near_varying = receding_policy(cost, lam, 1), receding_policy(windows, lam, 1, hot=hot)
        assert np.allclose(near.peaks, near_varying.peaks) and np.allclose(near.moves, near_varying.moves)
    ds = deepseek_policy(cost, packed)
    ds_varying = deepseek_policy(windows, np.tile(packed, (WINDOWS, 1)), hot=hot)
    assert np.allclose(ds.peaks, ds_varying.peaks) and np.allclose(ds.moves, ds_varying.moves)


def test_the_walk_starts_at_the_base_and_steps_as_the_matrix_steps():
    base = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.3, 0.2]]))
    paths = 500
    logits = walk_logits(base, paths, np.random.default_rng(1))
    assert logits.shape == (WINDOWS, 2 * paths, 4)
    level = -np.sort(-base, axis=1)
    assert np.allclose(logits[0], np.repeat(level, paths, axis=0))  # labels hottest first
    step = logits[1:] - logits[:-1] - REVERSION * (np.repeat(level, paths, axis=0)[None] - logits[:-1])
    assert abs(step.std() - WALK_STEP) < 0.05 * WALK_STEP and abs(step.mean()) < 0.01 * WALK_STEP
    assert not np.allclose(logits[1], logits[0])


@pytest.fixture(scope="module")
def walk():
    logits, slots = layer_walks(SWAP, (0,), 2, LAYERS)
    shares = np.array([popularity_shares(window, 2) for window in logits])
    return np.array([PAIRS.max_loads(window) for window in shares]), logits.argmax(axis=2), shares, slots


def test_knowing_the_walk_the_optimum_beats_deepseek_and_the_myopic_rule_at_each_price(walk):
    cost, hot, shares, slots = walk
    assert cost.shape == (WINDOWS, 2 * LAYERS, len(PAIRS)) and slots > 0
    assert not np.array_equal(cost[1], cost[-1])  # the walk changes the windows
    packed = np.array([deepseek_labels(window) for window in shares])
    ds = deepseek_policy(cost, packed, hot=hot)
    for lam in (0.0, 0.004, 0.01):
        best, objective = optimal_policy(cost, lam, hot=hot)
        assert np.isclose(objective, best.peaks.sum() + lam * best.moves.sum(), rtol=1e-6)
        assert objective <= ds.peaks.sum() + lam * ds.moves.sum() + 1e-6
        near = receding_policy(cost, lam, 1, hot=hot)
        assert objective <= near.peaks.sum() + lam * near.moves.sum() + 1e-6


def test_a_cell_with_the_walk_reads_in_order_and_refuses_a_negative_count(capsys):
    r = swap_optimum(SWAP, (0,), LAYERS, walk_paths=2)
    assert r.stay < r.at_matrix_budget <= r.free + 1e-12
    assert r.myopic <= r.at_matrix_budget + 1e-12
    assert r.deepseek_slots > LAYERS * REBALANCES * 1.5  # the walk re-pairs DeepSeek now and then besides the hops
    with pytest.raises(ValueError, match="walk_paths -1"):
        swap_optimum(SWAP, (0,), LAYERS, walk_paths=-1)
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "--walk-paths", "-1"])
    assert "--walk-paths -1: expected 0 or more" in capsys.readouterr().err
