"""The bound on any online planner in Mixtral 8+0's swap cells (``bench/swap_bound.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.planner import WORKLOADS, cell_windows, popularity_shares
from bench.swap_bound import (
    PAIRS,
    SHAPE,
    WINDOWS,
    cell_charges,
    deepseek_pairings,
    hop_cases,
    main,
    relaxed_cost,
    robust_planner,
    swap_bound,
)

LAYERS = 6
SWAP = next(w for w in WORKLOADS if w.label == "lognormal, swap, low noise")


@pytest.fixture(scope="module")
def windows():
    return cell_windows(SHAPE, SWAP, WINDOWS, 0, LAYERS)


@pytest.fixture(scope="module")
def charges(windows):
    return cell_charges(windows, SHAPE.top_k)


def test_each_window_is_one_of_the_eight_hop_cases_of_the_window_before(windows):
    for before, after in zip(windows[1:], windows[2:], strict=False):
        cases, odds, came = hop_cases(before, after, SHAPE.top_k)
        assert np.allclose(odds, 1 / SHAPE.experts)  # the hot expert lands on each expert alike
        assert cases.shape == (LAYERS, SHAPE.experts, SHAPE.experts)
        assert np.allclose(cases[np.arange(LAYERS), came], popularity_shares(after.logits, SHAPE.top_k))
        assert np.allclose(cases.sum(axis=2), 1.0)
        # Every case holds the same shares, only on other experts: a hop moves popularity, no more.
        assert np.allclose(np.sort(cases, axis=2), np.sort(cases[:, :1], axis=2))


def test_windows_that_are_not_a_swap_apart_are_refused(windows):
    abrupt = next(w for w in WORKLOADS if w.label == "lognormal, abrupt, low noise")
    other = cell_windows(SHAPE, abrupt, 3, 0, LAYERS)
    with pytest.raises(ValueError, match="none of its hop cases|base changed"):
        hop_cases(windows[1], other[2], SHAPE.top_k)


def test_free_moves_give_each_windows_best_pairing_and_a_prohibitive_price_one_pairing_throughout(charges):
    charged = charges.charged
    assert np.isclose(relaxed_cost(charged, 0.0), charged.min(axis=2).sum())
    held = charged.sum(axis=0).min(axis=1).sum()  # each layer's best single pairing, kept throughout
    assert np.isclose(relaxed_cost(charged, 10.0), held)
    costs = [relaxed_cost(charged, lam) for lam in (0.0, 0.002, 0.01, 0.05, 10.0)]
    assert all(a <= b + 1e-12 for a, b in zip(costs, costs[1:], strict=False))
    assert costs[0] < costs[-1]  # the hops make some change of pairing worth its slots


def test_deepseek_is_an_online_planner_so_its_charged_cost_is_at_least_the_relaxed_one_at_its_own_slots(
    windows, charges
):
    seq = deepseek_pairings(windows)
    assert seq.shape == (WINDOWS - 2, LAYERS)
    charged_cost = np.take_along_axis(charges.charged, seq[:, :, None], axis=2).sum()
    slots = sum(int(PAIRS.moves[a, b].sum()) for a, b in zip(seq, seq[1:], strict=False))
    for lam in (0.0, 0.003, 0.02):
        # The relaxation may also pick the warm-up pairing freely: never more than DeepSeek's cost.
        assert relaxed_cost(charges.charged, lam) <= charged_cost + lam * slots + 1e-9


def test_the_online_planner_moves_less_at_a_dearer_price_and_nothing_at_a_prohibitive_one(windows):
    runs = [robust_planner(windows, lam) for lam in (0.0, 0.005, 1.0)]
    moved = [m for _, m in runs]
    assert moved[0] > moved[1] > moved[2] == 0
    assert all(0.0 < b <= 1.0 for b, _ in runs)


def test_the_bound_is_above_deepseeks_expectation_with_free_slots_and_falls_within_the_budget():
    r = swap_bound(SWAP, (0,), layers=LAYERS, policy=False)
    assert r.unlimited >= r.deepseek_expected - 1e-12
    assert r.bound <= r.unlimited + 1e-12
    assert abs(r.deepseek_expected - r.deepseek_balance) < 0.05  # low noise: one draw near its mean


def test_main_prints_a_row_per_chosen_swap_cell_and_refuses_other_drifts(capsys, monkeypatch):
    import bench.swap_bound as sb

    monkeypatch.setattr(sb, "PLANNER_PRICES", (0.005,))
    monkeypatch.setattr(sb, "LAMBDA_GRID", tuple(np.linspace(0.0, 0.02, 5)))
    real = sb.cell_windows
    monkeypatch.setattr(sb, "cell_windows", lambda shape, w, n, seed, layers=None: real(shape, w, n, seed, LAYERS))
    main(["--seeds", "0", "--workloads", "lognormal", "--no-policy"])
    out = capsys.readouterr().out
    assert "| lognormal, swap, low noise |" in out and "| lognormal, swap, high noise |" in out
    assert "zipf" not in out and "not run" in out
    with pytest.raises(SystemExit):
        main(["--workloads", "nothing-like-this"])
    assert "matches no swap workload" in capsys.readouterr().err
