"""Can *any* planner that sees only past windows meet issue 16's targets in Mixtral 8+0's swap cells?

Why: of the workload matrix's last misses (``bench/planner.py --matrix --seeds 0,1,2``), two are
Mixtral 8+0 swap cells on 4 ranks, and over ten seeds both log-normal swap cells miss.
``bench/online_bound.py`` bounds the abrupt cells, where a layer's scenario tree only branches
at the windows with a new hot expert; under *swap* drift every window moves the hottest
expert's popularity to another expert, so that tree would branch eight ways every window. This
bound needs no tree.

How (an information relaxation with a penalty, per layer, the layers sharing the slot budget
through a price per slot ``lam``, the Lagrangian way, as in ``bench/online_bound.py``):

- A layer is one of the 105 pairings of its 8 experts (``bench/oracle_pairs.py``'s ``PAIRS``).
  As in the matrix, the warm-up pairing (window 0) is free, and rebalance ``t = 1..10`` plans on
  window ``t`` and is scored on window ``t + 1``.
- The law (``bench/planner.py``'s ``drift_window`` under ``swap``): each window every expert's log
  popularity reverts by a tenth toward its base and takes a normal step; then the hottest expert
  trades popularity (and base) with an expert drawn uniformly from all 8 (itself included: no
  change). :func:`hop_cases` rebuilds, from two successive windows' hidden popularity, the eight
  equally likely next windows given the normal step that was drawn.
- The relaxed planner knows every window in advance (the whole path, normal steps and hops),
  but a pairing chosen at rebalance ``t`` is charged the largest rank of window ``t + 1``
  averaged over its eight hop cases, not the case that came. For a planner that cannot see the
  next window that charge has the same expectation as its score (the penalty's mean is zero
  given what it knew, and the normal step only refines the condition), so its expected score
  is the same under both; the relaxed planner's best is exact dynamic programming on its path.
- Scored on expected shares (``popularity_shares``), not a multinomial sample of them: the largest
  rank of a sample is on average no lower (Jensen), so this raises the bound. Here it raises it
  little: DeepSeek's pairings, on the expected shares of the hop that came, read within 0.07
  points of their score on the sampled windows in the high-noise cells (seeds 0-2). Like
  ``bench/online_bound.py``, the step from the summed largest ranks to the mean of per-window
  ratios (``bench/oracle_pairs.py``'s ``balance_bound``) treats each window's sum over 64 layers
  as its expectation.

Beside the bound:

- **DeepSeek's own pairings charged the same way**: its expected next-window balance over the
  hops, with its realised one (one draw of the hops) beside it; the difference is how lucky that
  draw was. The bound is compared with this expectation: both are read on the same paths, and
  each has the mean of what it stands for (the bound's, of an upper bound on every online
  planner's expected balance; DeepSeek's, of its own), so their difference bounds how far any
  online planner can lead DeepSeek in expectation. The target compares realised numbers, where
  one draw's luck is shared by both.
- **An online planner** (:func:`robust_planner`) that knows only the law's shape: each rebalance it
  takes, from the previous pairing, the one of least largest rank averaged over the hottest
  expert moving to each expert (itself included) plus ``lam`` per moved slot, on the window's
  routed-token shares as seen. The best price within the budget, pooled over the seeds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from bench.online_bound import SHAPE, WINDOWS, parse_cells
from bench.oracle_pairs import PAIRS, balance_bound
from bench.planner import (
    BALANCE_TARGET_PP,
    MOVED_TARGET,
    MatrixWindow,
    Workload,
    cell_windows,
    popularity_shares,
    run_cell,
    run_sequence,
)
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_lookahead import cheapest_answers, expected_peaks
from eplb_service.coordinator.policy_lookahead import hop_cases as lookahead_hop_cases
from eplb_service.coordinator.surge_model import SurgeModel
from eplb_service.placement import PlacementShape, initial_phy2log, model_balancedness

LAMBDA_GRID = tuple(np.linspace(0.0, 0.02, 81))
"""Prices per moved slot (in a layer's load shares) the dual is evaluated at; the best is refined."""
PLANNER_PRICES = (0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.01, 0.012)
"""Prices per slot the online planner is run at; its column takes the best within the budget."""


def uniform_hops(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cases [L, N, N], odds [N])``: the policy's hop cases (:func:`~eplb_service.coordinator.
    policy_lookahead.hop_cases`: as it is, then the hottest expert trading places with each other
    one) at the swap law's odds, the hottest expert's popularity landing on each expert alike."""
    num = logits.shape[1]
    law = SurgeModel(level=logits, rate=0.0, reversion=0.0, jump=0.0, windows=0, hop=(num - 1) / num)
    return lookahead_hop_cases(logits, law)


def hop_cases(before: MatrixWindow, after: MatrixWindow, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cases [L, N, N], odds [N], realised [L])``: window ``after``'s expected shares in each of
    its ``N`` equally likely hop cases (:func:`uniform_hops`) given the normal step drawn since
    ``before``, their odds, and which case came.

    The hop exchanged two experts' popularity and base, so where the base changed the two experts
    are found, and exchanging them back gives the window before its hop.

    Raises:
        ValueError: ``after`` is not one swap away from a step of ``before`` (not a swap cell's windows).
    """
    layers, num = after.logits.shape
    stepped = after.logits.copy()
    for layer in range(layers):
        changed = np.flatnonzero(after.base[layer] != before.base[layer])
        if len(changed) not in (0, 2):
            raise ValueError(f"layer {layer}: {len(changed)} experts' base changed; a swap changes 0 or 2")
        if len(changed) == 2:
            stepped[layer, changed] = stepped[layer, changed[::-1]]
    logits, odds = uniform_hops(stepped)
    came = np.all(np.isclose(logits, after.logits[:, None, :]), axis=2)  # [L, N]
    if not came.any(axis=1).all():
        raise ValueError(f"layer {int(np.argmin(came.any(axis=1)))}: the next window is none of its hop cases")
    cases = popularity_shares(logits.reshape(-1, num), top_k).reshape(logits.shape)
    return cases, odds, came.argmax(axis=1)


@dataclass(frozen=True)
class CellCharges:
    """One cell's charges under one seed.

    Attributes:
        charged: ``[T, L, S]`` each pairing's largest rank share of window ``t + 1``, averaged over
            its hop cases (rebalances ``t = 1..10``).
        realised: ``[T, L, S]`` the same in the case that came.
    """

    charged: np.ndarray
    realised: np.ndarray


def cell_charges(windows: list[MatrixWindow], top_k: int) -> CellCharges:
    """:class:`CellCharges` of one cell's windows (the matrix's, ``cell_windows``)."""
    charged, realised = [], []
    for t in range(1, len(windows) - 1):
        cases, odds, came = hop_cases(windows[t], windows[t + 1], top_k)
        peaks = PAIRS.max_loads(cases)  # [L, N, S]
        charged.append(np.einsum("c,lcs->ls", odds, peaks))
        realised.append(peaks[np.arange(len(came)), came])
    return CellCharges(np.stack(charged), np.stack(realised))


def relaxed_cost(charged: np.ndarray, lam: float) -> float:
    """Summed over layers: the least ``sum_t charge_t + lam x slots`` over pairing sequences, the
    warm-up pairing free (so the first rebalance's pairing costs no slots)."""
    ahead = np.zeros(charged.shape[1:])
    for t in range(len(charged) - 1, -1, -1):
        q = charged[t] + ahead
        ahead = q if t == 0 else cheapest_answers(q, PAIRS.moves, lam)
    return float(ahead.min(axis=1).sum())


def best_dual(charges: list[np.ndarray], budget: float) -> float:
    """``max over lam >= 0 of sum J(lam) - lam budget``: on a grid, then refined around its best."""

    def dual(lam: float) -> float:
        return sum(relaxed_cost(c, lam) for c in charges) - lam * budget

    values = {float(lam): dual(float(lam)) for lam in LAMBDA_GRID}
    best = max(values, key=values.__getitem__)
    step = LAMBDA_GRID[1] - LAMBDA_GRID[0]
    for lam in np.linspace(max(0.0, best - step), best + step, 21):
        values[float(lam)] = dual(float(lam))
    return max(values.values())


PAIR_KEYS = {
    tuple(sorted(tuple(sorted(map(int, rank))) for rank in members)): i for i, members in enumerate(PAIRS.members)
}
"""Each pairing's index in ``PAIRS`` by its ranks' expert pairs (each pair and the pairs sorted)."""


def pairing_index(phy2log: np.ndarray) -> np.ndarray:
    """``[L]`` each layer's pairing in ``PAIRS`` (ranks of 2 slots, slots in rank order)."""
    ranks = np.sort(phy2log.reshape(len(phy2log), -1, 2), axis=2)
    return np.array([PAIR_KEYS[tuple(sorted(map(tuple, row.tolist())))] for row in ranks])


def deepseek_pairings(windows: list[MatrixWindow]) -> np.ndarray:
    """``[T, L]`` DeepSeek's pairing at each measured rebalance, planned as the matrix plans it."""
    layers = windows[0].loads.shape[0]
    shape = PlacementShape(layers, SHAPE.experts, SHAPE.slots, SHAPE.ranks)
    current = initial_phy2log(shape)
    out = []
    for t in range(len(windows) - 1):
        current = plan_rebalance("deepseek", current, windows[t].loads, shape).target_phy2log
        if t >= 1:
            out.append(pairing_index(current))
    return np.stack(out)


def robust_planner(windows: list[MatrixWindow], lam: float) -> tuple[float, int]:
    """``(next-window balancedness, slots moved)`` of the online planner (module docstring)."""
    layers = windows[0].loads.shape[0]
    rows = np.arange(layers)
    current = PAIRS.max_loads(windows[0].loads).argmin(axis=1)  # the warm-up: a best pairing, free
    balance, moved = [], 0
    for t in range(1, len(windows) - 1):
        seen = windows[t].loads
        logits = np.log(np.maximum(seen, 0.5) / seen.sum(axis=1, keepdims=True))
        expected = expected_peaks(PAIRS, *uniform_hops(logits))
        chosen = (expected + lam * PAIRS.moves[current]).argmin(axis=1)
        moved += int(PAIRS.moves[current, chosen].sum())
        current = chosen
        balance.append(model_balancedness(PAIRS.rank_loads(windows[t + 1].loads)[rows, current]))
    return float(np.mean(balance)), moved


@dataclass(frozen=True)
class SwapBound:
    """One swap cell pooled over some seeds (balances are means over the seeds' rebalances).

    Attributes:
        deepseek_balance: DeepSeek's realised next-window balancedness; deepseek_slots its slots.
        deepseek_expected: DeepSeek's pairings charged over the hop cases (its expectation).
        unlimited: the largest any online planner can expect with slots free.
        bound: the same within a fifth of DeepSeek's slots.
        planner: the online planner's best ``(balancedness, slots share)`` within the budget, or None.
        policy: the migration policy's ``(Δ pp, slots share)``.
    """

    workload: Workload
    deepseek_balance: float
    deepseek_slots: int
    deepseek_expected: float
    unlimited: float
    bound: float
    planner: tuple[float, float] | None
    policy: tuple[float, float]


def swap_bound(workload: Workload, seeds: tuple[int, ...], layers: int | None = None, policy: bool = True) -> SwapBound:
    """The bound, DeepSeek's expectation and the online planner for one swap cell over ``seeds``."""
    if workload.drift != "swap":
        raise ValueError(f"workload {workload.label!r}: the bound is for swap drift only")
    cells = [cell_windows(SHAPE, workload, WINDOWS, seed, layers) for seed in seeds]
    charges = [cell_charges(windows, SHAPE.top_k) for windows in cells]
    rows = [run_cell(SHAPE, workload, seed=seed, layers=layers, decayed=False) for seed in seeds] if policy else []
    ds_runs = [deepseek_pairings(windows) for windows in cells]
    num_layers = cells[0][0].loads.shape[0]
    mean = num_layers / SHAPE.ranks  # a window's summed mean rank share

    def balance_of(peaks: np.ndarray, seq: np.ndarray) -> np.ndarray:
        return mean / np.take_along_axis(peaks, seq[:, :, None], axis=2)[:, :, 0].sum(axis=1)

    # run_cell plans DeepSeek's sequence as the matrix does; without it, the same call alone.
    ds = [r.deepseek for r in rows] or [
        run_sequence("deepseek", SHAPE, [w.loads for w in windows]) for windows in cells
    ]
    ds_balance = float(np.mean([d.next_window for d in ds]))
    ds_slots = sum(d.moved for d in ds)
    expected = float(np.mean([balance_of(c.charged, s) for c, s in zip(charges, ds_runs, strict=True)]))
    floors = np.concatenate([c.charged.min(axis=2).sum(axis=1) for c in charges])
    means = np.full(len(floors), mean)
    dual = best_dual([c.charged for c in charges], MOVED_TARGET * ds_slots)
    bound = balance_bound(dual, np.ones(len(floors)), floors, means)
    runs = {lam: [robust_planner(windows, lam) for windows in cells] for lam in PLANNER_PRICES}
    inside = [
        (float(np.mean([b for b, _ in r])), sum(m for _, m in r) / max(ds_slots, 1))
        for r in runs.values()
        if sum(m for _, m in r) <= MOVED_TARGET * ds_slots
    ]
    planner = max(inside) if inside else None
    policy_row = (
        (float(np.mean([r.balance_pp for r in rows])), sum(r.migration.moved for r in rows) / max(ds_slots, 1))
        if rows
        else (float("nan"), float("nan"))
    )
    return SwapBound(
        workload, ds_balance, ds_slots, expected, float((means / floors).mean()), bound, planner, policy_row
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-policy", action="store_true", help="leave out the migration policy's column (faster)")
    args, seeds, chosen = parse_cells(parser, argv, "swap")
    pooled = ", ".join(map(str, seeds))
    print(f"{SHAPE.label}; seeds {pooled} pooled; budget {100 * MOVED_TARGET:.0f}% of DeepSeek's slots\n")
    print(
        "| workload | DeepSeek: next window | DeepSeek: expected over the hops | DeepSeek's slots "
        "| any online planner, slots free (Δ pp on DeepSeek's expected) | within the budget (Δ pp) | ruled out? "
        "| online planner, best price within the budget (Δ pp at slots) | this policy (Δ pp at slots) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    start = time.perf_counter()
    for workload in chosen:
        r = swap_bound(workload, seeds, policy=not args.no_policy)
        bound_pp = 100 * (r.bound - r.deepseek_expected)
        planner = (
            "none within the budget"
            if r.planner is None
            else f"{100 * (r.planner[0] - r.deepseek_balance):+.2f} at {100 * r.planner[1]:.1f}%"
        )
        policy = "not run" if np.isnan(r.policy[0]) else f"{r.policy[0]:+.2f} at {100 * r.policy[1]:.1f}%"
        print(
            f"| {workload.label} | {r.deepseek_balance:.4f} | {r.deepseek_expected:.4f} | {r.deepseek_slots} "
            f"| {100 * (r.unlimited - r.deepseek_expected):+.2f} | {bound_pp:+.2f} "
            f"| {'**yes**' if bound_pp < BALANCE_TARGET_PP else 'no'} "
            f"| {planner} | {policy} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
