"""The bound on any online planner in Mixtral 8+0's abrupt cells (``bench/online_bound.py``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.online_bound import (
    PAIRS,
    SHAPE,
    WINDOWS,
    as_seen,
    build_tree,
    cell_draws,
    law_planner,
    main,
    relaxed_cost,
    window_floors,
)
from bench.planner import WORKLOADS, cell_windows
from eplb_service.coordinator.policy_lookahead import cheapest_answers

LAYERS = 6
ABRUPT = next(w for w in WORKLOADS if w.label == "zipf-1.0, abrupt, low noise")


@pytest.fixture(scope="module")
def draws():
    return cell_draws(SHAPE, ABRUPT, seed=0, layers=LAYERS)


@pytest.fixture(scope="module")
def tree(draws):
    return build_tree(draws, SHAPE.top_k)


def test_the_kept_draws_replay_the_matrix_windows_along_each_layers_own_path(draws, tree):
    matrix = cell_windows(SHAPE, ABRUPT, WINDOWS, 0, LAYERS)
    assert all(np.array_equal(a.loads, b.loads) for a, b in zip(draws.windows, matrix, strict=True))
    assert draws.hits.any() and not draws.hits.all()  # some windows bring a hot expert, some do not
    for t, level in enumerate(tree.logits):
        assert np.array_equal(level[tree.realised[t]], matrix[t].logits)
        # Within a layer the nodes of a level are the equally likely cases, so their odds sum to 1.
        assert np.allclose(np.bincount(tree.layer[t], weights=tree.weight[t]), 1.0)
    # A layer only branches where its window has a new hot expert, four ways (the colder half of 8).
    hits_so_far = draws.hits[1:].cumsum(axis=0)
    for t in range(1, len(tree.logits)):
        assert np.array_equal(np.bincount(tree.layer[t], minlength=LAYERS), 4 ** hits_so_far[t - 1])


def test_free_moves_give_the_window_floors_and_a_prohibitive_price_the_best_pairing_kept_throughout(tree):
    assert np.isclose(relaxed_cost(tree, 0.0), window_floors(tree).sum())
    prices = [0.0, 0.01, 0.03, 0.1, 10.0]
    costs = [relaxed_cost(tree, lam) for lam in prices]
    assert all(a <= b + 1e-9 for a, b in zip(costs, costs[1:], strict=False))
    kept = np.zeros((LAYERS, len(PAIRS)))  # each layer's expected cost of holding one pairing throughout
    for t in range(1, len(tree.costs)):
        np.add.at(kept, tree.layer[t], tree.weight[t][:, None] * tree.costs[t])
    assert np.isclose(costs[-1], kept.min(axis=1).sum())


def test_no_policy_on_the_tree_costs_less_than_the_relaxed_planners_best(tree):
    """Any policy of the relaxed planner's information, here the greedy one, costs at least ``J``."""
    lam = 0.03
    total = 0.0
    state = None
    for t in range(1, len(tree.costs)):
        cost = tree.costs[t]
        if state is None:
            state = cost.argmin(axis=1)  # the free warm-up takes window 1's best pairing
            moved = np.zeros(len(cost))
        else:
            state = state[tree.parents[t]]
            choice = (cost + lam * PAIRS.moves[state]).argmin(axis=1)
            moved = PAIRS.moves[state, choice]
            state = choice
        total += float((tree.weight[t] * (cost[np.arange(len(cost)), state] + lam * moved)).sum())
    assert relaxed_cost(tree, lam) <= total + 1e-9
    assert relaxed_cost(tree, lam) < total  # and here the dynamic programme finds better


def test_the_cheapest_answers_on_pairings_are_the_least_price_of_moves_plus_cost_over_every_pairing():
    rng = np.random.default_rng(1)
    cost = rng.random((3, len(PAIRS)))
    for lam in (0.0, 0.05, 1.0):
        direct = (cost[:, None, :] + lam * PAIRS.moves[None]).min(axis=2)
        assert np.allclose(cheapest_answers(cost, PAIRS.moves, lam), direct)


def test_the_law_knowing_planner_moves_nothing_at_a_prohibitive_price_and_balances_better_with_moves(draws):
    still, none = law_planner(draws, 10.0, 2, SHAPE.top_k)
    moving, some = law_planner(draws, 0.01, 2, SHAPE.top_k)
    assert none == 0 and some > 0
    assert moving > still


def test_the_estimated_popularity_is_the_window_as_seen_reverting_to_the_mean_so_far_and_never_the_future(draws):
    seen = as_seen(draws)
    shares = [w.loads / w.loads.sum(axis=1, keepdims=True) for w in draws.windows]
    assert np.allclose(
        np.exp(seen.windows[3].logits), np.maximum(shares[3], 0.5 / draws.windows[3].loads.sum(axis=1, keepdims=True))
    )
    assert np.array_equal(seen.windows[0].base, seen.windows[0].logits)
    assert np.allclose(seen.windows[4].base, np.mean([w.logits for w in seen.windows[:5]], axis=0))
    # What it plans on at window 4 is the same whatever the windows after it hold.
    later = [replace(w, loads=w.loads[:, ::-1].copy()) if t > 4 else w for t, w in enumerate(draws.windows)]
    other = as_seen(replace(draws, windows=later))
    for t in range(5):
        assert np.array_equal(other.windows[t].logits, seen.windows[t].logits)
        assert np.array_equal(other.windows[t].base, seen.windows[t].base)
    assert not np.array_equal(other.windows[6].base, seen.windows[6].base)


def test_the_command_names_a_bad_value(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "0,x"])
    assert "--seeds '0,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--workloads", "swap"])
    assert "--workloads 'swap'" in capsys.readouterr().err
