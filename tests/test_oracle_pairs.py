"""The online price-per-slot rule of ``bench/oracle_pairs.py`` (the evidence for the Mixtral cells)."""

from __future__ import annotations

import numpy as np

from bench.oracle_pairs import (
    PAIRS,
    best_responses,
    controlled_responses,
    generator_inputs,
    online_inputs,
    scenario_inputs,
    scored_windows,
)
from bench.planner import MATRIX_SHAPES, Workload, cell_windows, run_sequence
from eplb_service.coordinator.spend_control import MIN_SCALE


def windows(count: int, layers: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(0.8, 100.0, size=(layers, 8)) for _ in range(count)]


def test_a_prohibitive_price_keeps_the_warm_up_pairing_and_no_price_takes_the_best_each_time():
    moves = PAIRS.moves
    loads = windows(6)
    inputs, scored = online_inputs(loads, forecast=False), scored_windows(loads)
    _, moved = best_responses(inputs, scored, 10.0, moves)
    assert moved == 0
    score, moved = best_responses(inputs, scored, 0.0, moves)
    assert moved > 0
    # With no price every rebalance takes a pairing of the smallest largest rank for its window,
    # so on the next window it scores exactly as the per-window best pairings do.
    best = [PAIRS.max_loads(loads[t]).argmin(axis=1) for t in range(1, len(loads) - 1)]
    rows = np.arange(loads[0].shape[0])
    expected = np.mean(
        [
            loads[t + 1].sum() / 4 / PAIRS.max_loads(loads[t + 1])[rows, best[t - 1]].sum()
            for t in range(1, len(loads) - 1)
        ]
    )
    assert np.isclose(score, expected)


def test_moves_between_pairings_is_a_symmetric_count_of_changed_slots():
    moves = PAIRS.moves
    assert moves.shape == (105, 105)
    assert (np.diag(moves) == 0).all() and (moves == moves.T).all()
    off = moves[~np.eye(105, dtype=bool)]
    assert off.min() == 2 and off.max() <= 8  # one exchange changes two slots; a layer has 8


def test_the_scenario_rule_matches_the_plain_rule_when_the_load_never_moves_and_spreads_when_it_does():
    rng = np.random.default_rng(3)
    still = windows(1) * 5  # the same window every time: no forecast error to sample
    plain, _ = online_inputs(still, forecast=True)
    sampled, _ = scenario_inputs(still, True, 16, rng)
    assert np.allclose(sampled, plain)
    moving = windows(5, seed=4)
    plain, _ = online_inputs(moving, forecast=False)
    sampled, warm = scenario_inputs(moving, False, 16, rng)
    assert sampled.shape == plain.shape and warm.shape == (6,)
    # A largest rank is never below the mean, and the sampled errors change what a pairing costs.
    assert (sampled >= 1.0).all() and not np.allclose(sampled, plain)


def test_the_controlled_rule_is_the_fixed_price_rule_until_the_controller_moves_its_scale():
    moves = PAIRS.moves
    loads = windows(7, seed=5)
    inputs, scored = online_inputs(loads, forecast=True), scored_windows(loads)
    nothing_to_compare = [0] * len(loads)  # no DeepSeek slots tallied: the scale stays 1
    assert controlled_responses(inputs, scored, 0.05, moves, nothing_to_compare) == best_responses(
        inputs, scored, 0.05, moves
    )
    # Far below DeepSeek's slots, every rebalance halves the scale (down to MIN_SCALE): from the
    # second rebalance on the rule pays less than the fixed price, and here moves more for it.
    far_below = [10**6] * len(loads)
    _, fixed = best_responses(inputs, scored, 0.05, moves)
    _, cheaper = controlled_responses(inputs, scored, 0.05, moves, far_below)
    assert fixed < cheaper
    # The warm-up's DeepSeek slots ([0]) are not tallied, as in the coordinator.
    warm_up_only = [10**6] + [0] * (len(loads) - 1)
    assert controlled_responses(inputs, scored, 0.05, moves, warm_up_only)[1] == fixed
    # Far above DeepSeek's slots the scale stays at 1: never dearer than the fixed price (at 0.01
    # the fixed rule moves in 3 of the 5 rebalances; a scale doubling above the cap moves less).
    far_above = [0] + [1] * (len(loads) - 1)
    assert controlled_responses(inputs, scored, 0.01, moves, far_above) == best_responses(inputs, scored, 0.01, moves)
    # A price so high that even MIN_SCALE of it keeps the warm-up pairing moves nothing.
    assert controlled_responses(inputs, scored, 1e3 / MIN_SCALE, moves, far_below)[1] == 0


def test_a_sequence_records_each_plans_slots_the_warm_up_first():
    """The controlled rule is fed DeepSeek's slots plan by plan from the matrix's own sequence."""
    (shape,) = [s for s in MATRIX_SHAPES if s.experts == 8 and s.redundant == 0]
    loads = windows(6, layers=5, seed=2)
    deepseek = run_sequence("deepseek", shape, loads)
    per_plan = deepseek.plan_moves
    assert len(per_plan) == len(loads) - 1 and all(m >= 0 for m in per_plan)
    # The matrix counts the plans after the warm-up ([0]).
    assert per_plan[0] == deepseek.warmup_moved
    assert sum(per_plan[1:]) == deepseek.moved > 0


def test_the_generator_rule_judges_pairings_by_the_windows_the_cell_would_draw_next():
    """A slowly drifting, low-noise cell changes little in a window: the pairing the generator's
    rule judges best is the one that turns out best on the real next window in most layers, and
    its costs are largest-rank-over-mean ratios (at least 1)."""
    (shape,) = [s for s in MATRIX_SHAPES if s.experts == 8 and s.redundant == 0]
    workload = Workload("zipf-0.6", "slow", "low")
    cell = cell_windows(shape, workload, 6, seed=0, layers=16)
    costs, warm = generator_inputs(cell, workload, shape.top_k, 1, 32, np.random.default_rng(0))
    assert costs.shape == (4, 16, 105) and warm.shape == (16,)
    assert (costs >= 1.0 - 1e-12).all()
    chosen = costs.argmin(axis=2)  # [T, L]
    actual = np.stack([PAIRS.max_loads(cell[t + 1].loads) for t in range(1, 5)])  # the next windows
    rows = np.arange(16)
    regret = np.array([actual[t][rows, chosen[t]] / actual[t].min(axis=1) - 1.0 for t in range(4)])
    assert np.median(regret) < 0.01
    # Under abrupt changes the rule hedges: its costs are not the last window's as it is.
    jumpy = Workload("zipf-0.6", "abrupt", "low")
    cell = cell_windows(shape, jumpy, 6, seed=0, layers=16)
    hedged, _ = generator_inputs(cell, jumpy, shape.top_k, 1, 32, np.random.default_rng(0))
    plain, _ = online_inputs([w.loads for w in cell], forecast=False)
    assert not np.allclose(hedged, plain, rtol=0.02)
