"""Hindsight oracle for the matrix's smallest Mixtral layers (8 experts on 4 ranks of 2; --shape for others).

Why: in the workload matrix (``bench/planner.py --matrix``) the migration policy misses the slots
target (<= 20% of DeepSeek's slots) in most Mixtral cells. This script asks whether that target
can be met at all in such a layer, by a planner that knows more than any real one: each
rebalance's *next* window.

A layer of 8 experts on 4 ranks of 2 slots is a pairing of the experts: 105 pairings, and which
pair goes on which rank is free (it changes no load), so the slots a rebalance moves between two
pairings are ``8 - (most slots kept over all ways to lay the new pairs on the ranks)``. Over the
cell's 10 measured rebalances the oracle picks, per layer, the sequence of pairings minimising
``sum_t w_t * max rank load_t + lam * slots moved`` by dynamic programming (exact for that sum;
the first pairing is free, like the matrix's uncounted warm-up), with ``w_t`` the gradient of
the window's balancedness (sum of mean / sum of max over layers) at DeepSeek's level. Sweeping
``lam`` gives sequences from "never move" to "always best"; each is scored exactly as the
matrix scores a policy (next-window balancedness, slots over the 10 rebalances).

Printed per cell: DeepSeek's next-window balancedness and slots; the best oracle sequence within
20% of DeepSeek's slots; and an upper bound on any sequence within that budget, knowing the next
window or not (Lagrangian bound on the weighted sum, then the largest mean balancedness that sum
allows given each window's best possible max loads).

Also printed: the best **online** rule of the family the migration policy belongs to, a price per
moved slot: at each rebalance, from the previous pairing, the pairing (of all 105) minimising
``max rank load / mean + lam * slots moved`` under the load planned on (the last window as it
is, or the forecast the migration policy plans for), best over a sweep of ``lam`` within the
budget. It sees only the windows up to the one it plans on, as a real planner does, and within
that family it is exact: no swap search can find a better response to the same price.

And the same rule with its price set **online by the coordinator's spend controller**
(:mod:`~eplb_service.coordinator.spend_control`): ``CONTROLLED_PRICE x scale`` per moved slot on
the forecast, the scale halved after a rebalance where the rule's faded slot tally is below 12% of
DeepSeek's (DeepSeek planned from its own previous plan, as the coordinator's shadow) and doubled
above 16%, never above 1. Unlike the best-``lam`` columns, it needs no hindsight to pick its price.

And the same rule judging a pairing by its **expected** largest rank over sampled next windows
instead of its largest rank under one planned load (a robust plan: a pairing that stays good
when the load moves the way it has been moving). Each layer's scenarios add to the planned
shares the forecast errors of the last step (``last - (mean + a (previous - mean))`` per expert),
each drawn from a random layer and laid on the experts in a random order, so a jump seen in any
layer can land on any expert. Same sweep of ``lam``, same budget.

And the same rule **knowing the generator** (:func:`generator_inputs`): a pairing judged by its
expected largest rank over the next one or three windows of futures drawn from the matrix's own
generator (``bench/planner.py``'s ``drift_window``), starting from the hidden popularity behind
the window planned on. It knows everything a forecast could learn (the popularity without
sampling noise, its reversion, how often and how big the next swap or hot expert is) and only
not where the next random change lands; best price and horizon per cell in hindsight. Where it
misses within the budget, no better forecast of the load makes a price-per-slot planner meet.

Other shapes of the matrix with at most 500 layouts (:mod:`eplb_service.coordinator.policy_exact`:
which experts each rank holds, each at least once and never twice on a rank) run the same way,
e.g. ``--shape '8+2 on 2'`` (Mixtral 8 + 2 on 2 ranks of 5: 280 layouts, about 5 minutes).

Usage: ``PYTHONPATH=. python bench/oracle_pairs.py [--seed N] [--shape LABEL-PART]`` (the matrix's seed; default 0)
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.planner import (
    MATRIX_SHAPES,
    MOVED_TARGET,
    NOISE_TOKENS_PER_EXPERT,
    SMALL_LAYER_SHAPES,
    WORKLOADS,
    MatrixShape,
    MatrixWindow,
    Workload,
    cell_seed,
    cell_windows,
    drift_window,
    matrix_layers,
    run_sequence,
    sample_window,
)
from eplb_service.coordinator.load_forecast import forecast_load, load_shares, persistence, planning_persistence
from eplb_service.coordinator.policy_exact import Layouts, layouts
from eplb_service.coordinator.spend_control import SpendState, update_spend

SCENARIOS = 64
"""Sampled next windows per layer and rebalance for the scenario rule and the generator's rule."""
GENERATOR_SAMPLES = 256
"""Sampled futures per layer and rebalance for the generator's rule (64 left it a few tenths of a
point short in some cells, from the sampling noise of its costs alone)."""
GENERATOR_HORIZONS = (1, 3)
"""Windows ahead the generator's rule judges a pairing on (the column takes the better per cell)."""
CONTROLLED_PRICE = 0.1
"""The controlled rule's price at the controller's scale 1, in mean rank loads per moved slot
(0.06 and 0.14 met 14 / 12 / 16 and 12 / 12 / 16 of the 24 cells with seeds 0 / 1 / 2, 0.1 met 15 / 13 / 16)."""


PAIRS = layouts(8, 4, 2)
"""Mixtral 8+0 on 4 ranks of 2 slots: the 105 pairings of the matrix's 2-slots-per-rank shape."""


def best_sequences(peaks: np.ndarray, weight: np.ndarray, lam: float, moves: np.ndarray) -> np.ndarray:
    """``[T, L]`` layout per rebalance and layer minimising ``sum w_t peak + lam * moves``."""
    num_windows, num_layers, _ = peaks.shape
    value = np.zeros((num_layers, moves.shape[0]))
    back = []
    for t in range(num_windows):
        total = value[:, :, None] + lam * moves[None]
        arg = total.argmin(axis=1)
        value = np.take_along_axis(total, arg[:, None, :], axis=1)[:, 0] + weight[t] * peaks[t]
        back.append(arg)
    state = value.argmin(axis=1)
    path = [state]
    for t in range(num_windows - 1, 0, -1):
        state = back[t][np.arange(num_layers), state]
        path.append(state)
    return np.array(path[::-1])


def scored_windows(loads: list[np.ndarray], space: Layouts = PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """``(peaks [T, L, S], mean [T])`` of the windows the matrix scores rebalances ``t = 1..T`` on
    (``loads[t + 1]``): every layout's largest rank load, and the mean rank load summed over layers."""
    nexts = loads[2:]
    return np.stack([space.max_loads(w) for w in nexts]), np.array([w.sum() / space.ranks for w in nexts])


def online_inputs(loads: list[np.ndarray], forecast: bool, space: Layouts = PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """``(costs [T, L, S], warm [L])`` for the online rule of the module docstring, computed once
    for every ``lam``: each layout's largest rank load over the mean under the load rebalance
    ``t`` plans on (``loads[t]`` or its forecast, as the matrix runs it), and the layout of the
    uncounted warm-up on ``loads[0]``."""
    costs = []
    for t in range(1, len(loads) - 1):
        load = loads[t]
        if forecast:
            load = forecast_load(load, planning_persistence(persistence(loads[t - 1], load)))
        mean = load.sum(axis=1, keepdims=True) / space.ranks
        costs.append(space.max_loads(load) / np.where(mean > 0, mean, 1.0))
    return np.stack(costs), space.max_loads(loads[0]).argmin(axis=1)


def scenario_inputs(
    loads: list[np.ndarray], forecast: bool, samples: int, rng: np.random.Generator, space: Layouts = PAIRS
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`online_inputs`, but each layout's cost is its mean largest rank load over the
    mean across ``samples`` sampled next windows per layer (module docstring): the planned shares
    plus last step's forecast errors of a random layer, in a random expert order."""
    costs = []
    for t in range(1, len(loads) - 1):
        previous, last = loads[t - 1], loads[t]
        kept = persistence(previous, last)
        planned = forecast_load(last, planning_persistence(kept)) if forecast else last
        before, now = load_shares(previous), load_shares(last)
        centre = before.mean(axis=1, keepdims=True)
        errors = now - (centre + kept * (before - centre))  # [L, N]
        layers = last.shape[0]
        drawn = errors[rng.integers(0, layers, size=(layers, samples))]  # [L, K, N]
        order = np.argsort(rng.random(drawn.shape), axis=2)
        shares = load_shares(planned)[:, None, :] + np.take_along_axis(drawn, order, axis=2)
        shares = np.clip(shares, 0.0, None)
        totals = shares.sum(axis=2, keepdims=True)
        shares /= np.where(totals > 0, totals, 1.0)
        costs.append((space.max_loads(shares) * space.ranks).mean(axis=1))
    return np.stack(costs), space.max_loads(loads[0]).argmin(axis=1)


def generator_inputs(
    windows: list[MatrixWindow],
    workload: Workload,
    top_k: int,
    horizon: int,
    samples: int,
    rng: np.random.Generator,
    space: Layouts = PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`online_inputs`, but judged by the matrix's own generator: each layout's cost is
    its largest rank load over the mean, averaged over the next ``horizon`` windows of ``samples``
    futures per layer drawn from the popularity that produced the window planned on
    (:func:`bench.planner.drift_window`, :func:`bench.planner.sample_window`).

    No real planner knows this much: the hidden popularity without sampling noise, its
    reversion, and the odds and size of the next swap or hot expert. What it cannot know is where
    the next random change lands, so its shortfall within the budget is what no forecast closes.
    """
    tokens = NOISE_TOKENS_PER_EXPERT[workload.noise] * windows[0].loads.shape[1]
    costs = []
    for window in windows[1:-1]:
        layers = window.logits.shape[0]
        logits = np.repeat(window.logits, samples, axis=0)
        base = np.repeat(window.base, samples, axis=0)
        total = np.zeros((layers * samples, len(space)))
        for _ in range(horizon):
            logits, base = drift_window(logits, base, workload.drift, rng)
            total += space.max_loads(sample_window(logits, top_k, tokens, rng)) / (tokens / space.ranks)
        costs.append((total / horizon).reshape(layers, samples, -1).mean(axis=1))
    return np.stack(costs), space.max_loads(windows[0].loads).argmin(axis=1)


def best_responses(
    inputs: tuple[np.ndarray, np.ndarray], scored: tuple[np.ndarray, np.ndarray], lam: float, moves: np.ndarray
) -> tuple[float, int]:
    """Next-window balancedness and slots of the online price-per-slot rule at price ``lam``
    (``inputs`` from :func:`online_inputs`, ``scored`` from :func:`scored_windows`)."""
    (costs, state), (peaks, mean) = inputs, scored
    rows = np.arange(state.size)
    moved, scores = 0, []
    for t in range(len(costs)):
        new = (costs[t] + lam * moves[state]).argmin(axis=1)
        moved += int(moves[state, new].sum())
        state = new
        scores.append(mean[t] / peaks[t][rows, state].sum())
    return float(np.mean(scores)), moved


def controlled_responses(
    inputs: tuple[np.ndarray, np.ndarray],
    scored: tuple[np.ndarray, np.ndarray],
    price: float,
    moves: np.ndarray,
    reference: list[int],
) -> tuple[float, int]:
    """Like :func:`best_responses`, at ``price x scale`` where ``scale`` is the coordinator's spend
    controller (:func:`~eplb_service.coordinator.spend_control.update_spend`) fed after each
    rebalance ``t`` with the rule's slots and ``reference[t + 1]`` (DeepSeek's per plan, from its
    own previous plan as the coordinator's shadow: :attr:`bench.planner.SequenceResult.plan_moves`;
    the warm-up is free and not tallied, as in the coordinator)."""
    (costs, state), (peaks, mean) = inputs, scored
    rows = np.arange(state.size)
    spend, moved, scores = SpendState(), 0, []
    for t in range(len(costs)):
        new = (costs[t] + price * spend.scale * moves[state]).argmin(axis=1)
        step = int(moves[state, new].sum())
        moved, state = moved + step, new
        scores.append(mean[t] / peaks[t][rows, state].sum())
        # Never above 1, as the module docstring says: this rule has only a price, and a dearer
        # scale in the coordinator narrows a room these layers do not have.
        spend = update_spend(spend, step, reference[t + 1], max_scale=1.0)
    return float(np.mean(scores)), moved


def balance_bound(dual: float, weight: np.ndarray, floor: np.ndarray, mean: np.ndarray) -> float:
    """Largest mean over windows of ``mean_t / S_t`` with ``S >= floor`` and ``weight . S >= dual``.

    The objective is convex in ``S``, so its maximum over that polyhedron is at a vertex: every
    window at its floor but one, which takes up the rest of ``dual``.
    """
    best = -np.inf
    for k in range(len(floor)):
        s_k = max(floor[k], (dual - float((weight * floor).sum()) + weight[k] * floor[k]) / weight[k])
        values = mean / floor
        values[k] = mean[k] / s_k
        best = max(best, float(values.mean()))
    return best


def analyse(workload_index: int, shape: MatrixShape, space: Layouts, seed: int = 0) -> str:
    """One row of the table: the cell of ``shape`` and ``WORKLOADS[workload_index]``."""
    moves = space.moves
    workload = WORKLOADS[workload_index]
    layers = matrix_layers(shape)
    windows = cell_windows(shape, workload, 12, seed, layers)
    loads = [window.loads for window in windows]
    deepseek = run_sequence("deepseek", shape, loads)
    peaks, mean = scored_windows(loads, space)  # plan t (t = 1..10) is scored on window t + 1
    floor = peaks.min(axis=2).sum(axis=1)  # best sum of max loads per window, any layout
    level = mean / deepseek.next_window
    weight = mean / level**2
    budget = MOVED_TARGET * deepseek.moved
    planned_peaks = np.stack([space.max_loads(w) for w in loads[1:-1]])  # what a real planner sees
    best, bound, seen = None, np.inf, None
    rows = np.arange(layers)
    for lam in [0.0, *np.geomspace(1e-7, 1e-1, 25)]:
        for informed in (True, False):
            path = best_sequences(peaks if informed else planned_peaks, weight, lam, moves)
            moved = int(sum(moves[path[t - 1], path[t]].sum() for t in range(1, len(path))))
            peak_sum = np.array([peaks[t][rows, path[t]].sum() for t in range(len(path))])
            score = float(np.mean(mean / peak_sum))
            if moved <= budget and not informed and (seen is None or score > seen[0]):
                seen = (score, moved)
            if moved <= budget and informed and (best is None or score > best[0]):
                best = (score, moved)
            # Any sequence within the budget has sum_t w_t S_t >= dual; the mean of mean_t / S_t
            # is convex in S, so over {S >= floor, w.S >= dual} it peaks at a vertex.
            if informed:
                dual = float((weight * peak_sum).sum() + lam * (moved - budget))
                bound = min(bound, balance_bound(dual, weight, floor, mean))
    rng = np.random.default_rng(int(cell_seed(shape, workload, seed).generate_state(2)[1]))
    online, robust, known = (
        max(
            (
                r
                for inputs in candidates
                for lam in [0.0, *np.geomspace(1e-3, 10.0, 41)]
                for r in [best_responses(inputs, (peaks, mean), lam, moves)]
                if r[1] <= budget
            ),
            key=lambda r: r[0],
        )  # the largest lam moves nothing after the warm-up, so some rule is within the budget
        for candidates in (
            [online_inputs(loads, forecast, space) for forecast in (False, True)],
            [scenario_inputs(loads, forecast, SCENARIOS, rng, space) for forecast in (False, True)],
            [
                generator_inputs(windows, workload, shape.top_k, h, GENERATOR_SAMPLES, rng, space)
                for h in GENERATOR_HORIZONS
            ],
        )
    )
    assert best is not None and seen is not None  # lam = 0.1 moves nothing
    controlled = controlled_responses(
        online_inputs(loads, True, space), (peaks, mean), CONTROLLED_PRICE, moves, list(deepseek.plan_moves)
    )

    def against_deepseek(result: tuple[float, int]) -> str:
        """Δ pp of next-window balance and slots as a share of DeepSeek's."""
        return f"{100 * (result[0] - deepseek.next_window):+.2f} at {100 * result[1] / max(deepseek.moved, 1):.1f}%"

    return (
        f"| {workload.label} | {deepseek.next_window:.4f} | {deepseek.moved} "
        f"| {against_deepseek(seen)} | {against_deepseek(best)} | {100 * (bound - deepseek.next_window):+.2f} "
        f"| {against_deepseek(online)} | {against_deepseek(robust)} | {against_deepseek(controlled)} "
        f"| {against_deepseek(known)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the matrix's seed (bench/planner.py --matrix --seed)")
    parser.add_argument(
        "--shape",
        default="8+0 on 4",
        help="part of one shape's label, of the matrix or bench/planner.py's SMALL_LAYER_SHAPES (default: "
        "Mixtral's 8+0 on 4 ranks; '8+2 on 2' for 8+2 on 2 ranks; 'top-2: 8+0 on 2' for a small layer)",
    )
    args = parser.parse_args()
    matches = [s for s in (*MATRIX_SHAPES, *SMALL_LAYER_SHAPES) if args.shape in s.label]
    if len(matches) != 1:
        labels = "; ".join(s.label for s in matches) or "none"
        parser.error(
            f"--shape {args.shape!r} must name one shape of the matrix or SMALL_LAYER_SHAPES, matched: {labels}"
        )
    (shape,) = matches
    try:
        space = layouts(shape.experts, shape.ranks, shape.slots // shape.ranks)
    except ValueError as exc:
        parser.error(f"--shape {args.shape!r}: {exc}")
    print(f"{shape.label}: {len(space)} layouts; seed {args.seed}\n")
    print(
        "| workload | DeepSeek: next window | slots | best on the windows planned on, Δ pp at slots "
        "| best knowing the next windows | upper bound, any sequence (Δ pp) "
        "| best online price-per-slot rule, Δ pp at slots | the same judged on sampled next windows "
        "| the same rule, price set by the spend controller "
        "| the same rule knowing the generator, best price |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index in range(len(WORKLOADS)):
        print(analyse(index, shape, space, args.seed), flush=True)


if __name__ == "__main__":
    main()
