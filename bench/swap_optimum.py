"""The best any online planner can expect in Mixtral 8+0's swap cells, in a model it solves exactly.

Why: ``bench/swap_bound.py`` bounds these cells from above, but loosely: within a fifth of
DeepSeek's slots it allows up to 0.1 points below DeepSeek's expected balance, since its relaxed
planner knows where later hot experts go. The online planners measured sit 0.4-0.8 points below
DeepSeek in the log-normal cells. Where between the two the best online planner lies decides
whether those cells can meet issue 16's half point at all. This module answers it in a model
small enough to solve exactly.

The model (per layer; the swap law of ``bench/planner.py``'s ``drift_window`` without its slow
random walk and without sampling noise):

- A layer's expert shares are fixed at its base popularity (``popularity_shares`` of the base
  the log popularity reverts to; a swap trades base too, so the sorted shares never change).
  Label the experts by that order, hottest first. What a placement is worth then depends only
  on which *labels* share ranks: a **state** is one of the 105 pairings of the 8 labels.
- Each window the hottest expert trades popularity with an expert drawn uniformly from all 8,
  itself included (:func:`label_hops`): in labels, the pairing's label 0 and label ``r`` trade
  places. The physical pairing is unchanged; which labels it pairs is not.
- As in the matrix: a free warm-up pairing, then 10 rebalances. Each takes the state after a
  hop, picks any pairing (paying its slots, ``PAIRS.moves``) and is scored on the largest rank
  share of the window after the next hop.
- The planner knows the shares and the law exactly. Its best policy at a price ``lam`` per slot
  is exact finite-horizon dynamic programming over the 105 states (:func:`optimal_policy`), its
  expected peaks and slots exact too (the state's distribution carried forward, no sampling).
  One price is shared by all layers (the Lagrangian way); mixing two prices across layers gives
  every point between them, so the best expected balance within a slot budget is read off the
  lower hull of (slots, summed peaks) (:func:`best_within`).

What it is and is not. In the model this is the exact optimum of every online planner: one that
must estimate the shares and the law from sampled windows does no better. It is not a strict
bound on the matrix's cells: there the shares also drift (a random walk of step 0.05 reverting
by a tenth, about 0.12 in log popularity at rest), every window is sampled, and one draw of the
hops can be lucky. DeepSeek is charged the same way: each rebalance it re-packs the labels it
sees (its own packing of the sorted shares, :func:`deepseek_labels`), paying the slots the hop
cost it. Two budgets are shown: a fifth of DeepSeek's slots in the model (1.5 slots per layer and
rebalance: six of the eight hops break its pairing, and two slots mend it), and a fifth of what
it moved in the matrix's sequence on the same cell, larger, since sampling noise also re-pairs
experts of near-equal load. The target is set on the latter.

Beside the optimum, :func:`receding_policy` re-plans each rebalance as if only ``depth`` were
left (depth 1: the myopic hop-robust rule of ``bench/swap_bound.py``'s ``robust_planner``, on
exact shares): how much of the optimum a short look ahead keeps.

**With the slow walk** (``--walk-paths N``): whether leaving the walk out is what favours the
frugal planner. Each label's log popularity walks as ``drift_window`` walks every expert (a hop
trades popularity and base together, so it moves labels between experts and leaves each label's
walk alone), ``N`` draws a layer (:func:`walk_logits`). Window ``w``'s pairings then have their own
largest rank shares, and its hottest label is the one that trades places in the hop into it. The
optimum is told each draw's whole walk in advance, but not the hops: an information relaxation, so
no online planner expects more, even one that knows each window's shares exactly. DeepSeek packs,
and the myopic rule plans, each window's shares as they are (an online planner that knows them).
Still no sampling noise.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from bench.online_bound import SHAPE, WINDOWS, parse_cells
from bench.oracle_pairs import PAIRS
from bench.planner import MOVED_TARGET, Workload, cell_windows, drift_window, popularity_shares, run_sequence
from bench.swap_bound import pairing_index
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.placement import PlacementShape, initial_phy2log

REBALANCES = WINDOWS - 2
"""Measured rebalances per cell, as the matrix runs them (the warm-up's window and the last,
scored only, are the other two)."""
PRICES = tuple(np.concatenate([np.linspace(0.0, 0.02, 41), np.linspace(0.0225, 0.1, 32)]))
"""Prices per moved slot (in a layer's load shares) the optimum is solved at: the frontier's points."""
TIE = 1e-9
"""Added per moved slot to break exact ties toward staying (at price 0 every pairing is free)."""


def label_hops(hot: int = 0) -> np.ndarray:
    """``[N, S]``: pairing ``s`` after label ``hot`` (the hottest, 0 where the shares are fixed) trades
    places with label ``r`` (``r = hot``: itself, no change). Each row is a permutation of the
    pairings and its own inverse."""
    num = SHAPE.experts
    out = np.empty((num, len(PAIRS)), dtype=np.int64)
    for r in range(num):
        swap = np.arange(num)
        swap[hot], swap[r] = r, hot
        out[r] = pairing_index(swap[PAIRS.members].reshape(len(PAIRS), -1))
    return out


HOT_HOPS = np.stack([label_hops(hot) for hot in range(SHAPE.experts)])
"""``[N, N, S]``: Mixtral 8+0's pairings under each of the eight equally likely hops of each label
as the hottest (under the random walk the hottest label changes now and then)."""
HOPS = HOT_HOPS[0]
"""Mixtral 8+0's pairings under each of the eight equally likely hops of the hottest label, 0."""


def over_hops(table: np.ndarray, hot: np.ndarray | None = None) -> np.ndarray:
    """``[L, S]``: ``table [L, S]`` read at each pairing's eight hops and averaged, the hop's hottest
    label being ``hot [L]`` (label 0 where ``None``). Since each hop is its own inverse, this both
    carries a distribution over states one hop forward and gives each pairing taken now the mean
    of a value of the state a hop later."""
    if hot is None:
        return np.mean([table[:, hop] for hop in HOPS], axis=0)
    rows = np.arange(len(table))[:, None]
    return np.mean([table[rows, HOT_HOPS[hot, r]] for r in range(SHAPE.experts)], axis=0)


def _at(values: np.ndarray, window: int, fixed_ndim: int) -> np.ndarray:
    """``values`` at ``window`` where it has a leading window axis (more than ``fixed_ndim``
    dimensions), else as it is: the same every window."""
    return values if values.ndim == fixed_ndim else values[window]


def _hot_at(hot: np.ndarray | None, window: int) -> np.ndarray | None:
    """``hot [W, L]`` at ``window``; ``None`` (label 0 the hottest) stays ``None``."""
    return None if hot is None else hot[window]


def deepseek_labels(shares: np.ndarray) -> np.ndarray:
    """``[L]``: the pairing DeepSeek's packing gives each layer's ``shares [L, N]`` (by label), in
    labels, planned by the policy the matrix runs as DeepSeek."""
    layers = len(shares)
    shape = PlacementShape(layers, SHAPE.experts, SHAPE.slots, SHAPE.ranks)
    plan = plan_rebalance("deepseek", initial_phy2log(shape), shares, shape)
    return pairing_index(plan.target_phy2log)


@dataclass(frozen=True)
class Outcome:
    """A policy's expected totals per layer over the rebalances.

    Attributes:
        peaks: ``[L]`` summed expected largest rank share of the windows scored.
        moves: ``[L]`` summed expected slots moved (the warm-up's not counted).
    """

    peaks: np.ndarray
    moves: np.ndarray


def run_policy(
    cost: np.ndarray, actions: list[np.ndarray], start: np.ndarray, hot: np.ndarray | None = None
) -> Outcome:
    """The exact expectation of playing ``actions[t] [L, S]`` (the pairing taken from each state at
    rebalance ``t``) from the warm-up pairing ``start [L]``, a hop before each rebalance.

    ``cost`` is ``[L, S]`` (the same every window) or ``[W, L, S]`` (window ``w``'s largest rank
    share of each pairing), ``hot`` ``None`` (label 0 hops) or ``[W, L]`` (the hottest label of
    window ``w``, the one that trades places in the hop into it)."""
    layers = cost.shape[-2]
    rows = np.arange(layers)
    dist = np.zeros(cost.shape[-2:])
    dist[rows, start] = 1.0
    dist = over_hops(dist, _hot_at(hot, 1))  # the window rebalance 1 plans on
    peaks, moves = np.zeros(layers), np.zeros(layers)
    for t, act in enumerate(actions, start=1):
        moves += (dist * PAIRS.moves[np.arange(dist.shape[1])[None, :], act]).sum(axis=1)
        taken = np.zeros_like(dist)
        np.add.at(taken, (np.broadcast_to(rows[:, None], act.shape), act), dist)
        dist = over_hops(taken, _hot_at(hot, t + 1))  # the window scored, and the one the next rebalance plans on
        peaks += (dist * _at(cost, t + 1, 2)).sum(axis=1)
    return Outcome(peaks, moves)


def best_actions(ahead: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``(actions [L, S], values [L, S])``: from each state, the pairing of least
    ``lam x slots + ahead``, and that least value (``ahead [L, S]``: each pairing's expected cost
    from taking it on)."""
    q = ahead[:, None, :] + (lam + TIE) * PAIRS.moves[None, :, :]
    act = q.argmin(axis=2)
    return act, np.take_along_axis(q, act[:, :, None], axis=2)[:, :, 0]


def optimal_policy(
    cost: np.ndarray, lam: float, rebalances: int = REBALANCES, hot: np.ndarray | None = None
) -> tuple[Outcome, float]:
    """``(outcome, objective)``: the online optimum at ``lam`` per slot for layers whose pairings (in
    labels) have largest rank share ``cost`` (as in :func:`run_policy`, with ``hot``); ``objective``
    is its least expected summed ``peaks + lam x slots``, every layer together. Where ``cost`` changes
    from window to window the planner knows every window's in advance, but not the hops."""
    values = np.zeros(cost.shape[-2:])
    actions: list[np.ndarray] = []
    for t in range(rebalances, 0, -1):
        act, values = best_actions(over_hops(_at(cost, t + 1, 2) + values, _hot_at(hot, t + 1)), lam)
        actions.append(act)
    actions.reverse()
    ahead = over_hops(values, _hot_at(hot, 1))
    start = ahead.argmin(axis=1)  # the warm-up: free, a hop before rebalance 1
    outcome = run_policy(cost, actions, start, hot)
    return outcome, float(ahead.min(axis=1).sum())


def receding_policy(
    cost: np.ndarray, lam: float, depth: int, rebalances: int = REBALANCES, hot: np.ndarray | None = None
) -> Outcome:
    """Each rebalance plans as if ``depth`` were left, on the window it plans on as if it stayed (the
    same rule every time); the warm-up a best pairing for the next window. ``cost`` and ``hot`` as
    in :func:`run_policy`."""
    if depth < 1:
        raise ValueError(f"depth {depth}: expected at least 1 rebalance ahead")
    actions: list[np.ndarray] = []
    for t in range(1, rebalances + 1):
        if actions and cost.ndim == 2 and hot is None:
            actions.append(actions[-1])  # the same window every time: the same rule
            continue
        values = np.zeros(cost.shape[-2:])
        act = np.zeros(cost.shape[-2:], dtype=np.int64)
        for _ in range(depth):
            act, values = best_actions(over_hops(_at(cost, t, 2) + values, _hot_at(hot, t)), lam)
        actions.append(act)
    start = over_hops(_at(cost, 0, 2), _hot_at(hot, 0)).argmin(axis=1)
    return run_policy(cost, actions, start, hot)


def deepseek_policy(
    cost: np.ndarray, packed: np.ndarray, rebalances: int = REBALANCES, hot: np.ndarray | None = None
) -> Outcome:
    """DeepSeek in the model: every rebalance back to its packing ``packed`` of the labels, ``[L]``
    (the same every window) or ``[W, L]`` (its packing of window ``w``); ``cost`` and ``hot`` as in
    :func:`run_policy`."""
    states = cost.shape[-1]
    actions = [np.repeat(_at(packed, t, 1)[:, None], states, axis=1) for t in range(1, rebalances + 1)]
    return run_policy(cost, actions, _at(packed, 0, 1), hot)


def best_within(points: list[tuple[float, float]], budget: float) -> float:
    """The least summed peaks within ``budget`` slots, given ``(slots, peaks)`` points of policies
    that can be mixed across layers (so every point between two is reached); inf where none fits."""
    best = min((p for m, p in points if m <= budget), default=np.inf)
    for m0, p0 in points:
        for m1, p1 in points:
            if m0 <= budget < m1:
                best = min(best, p0 + (p1 - p0) * (budget - m0) / (m1 - m0))
    return float(best)


@dataclass(frozen=True)
class SwapOptimum:
    """One swap cell pooled over some seeds; balances in the model (mean rank over summed peaks).

    Attributes:
        deepseek: DeepSeek's expected next-window balance; deepseek_slots its expected slots.
        matrix_slots: DeepSeek's slots in the matrix's own sequences of the same cells.
        free: the optimum with slots free.
        at_matrix_budget / at_model_budget: the optimum within a fifth of ``matrix_slots`` /
            of ``deepseek_slots``; ``price`` the least price on the frontier within the first.
        myopic: the depth-1 rule's best within a fifth of ``matrix_slots``.
        stay: the optimum at a price no move pays (the warm-up's pairing kept).
    """

    workload: Workload
    deepseek: float
    deepseek_slots: float
    matrix_slots: int
    free: float
    at_matrix_budget: float
    at_model_budget: float
    price: float
    myopic: float
    stay: float


def cell_bases(workload: Workload, seeds: tuple[int, ...], layers: int | None = None) -> tuple[list[np.ndarray], int]:
    """``(bases, slots)``: the base log popularity ``[L, N]`` of the cell under each seed, and
    DeepSeek's slots over the matrix's sequences of those cells."""
    bases, slots = [], 0
    for seed in seeds:
        windows = cell_windows(SHAPE, workload, WINDOWS, seed, layers)
        bases.append(windows[0].base)
        slots += run_sequence("deepseek", SHAPE, [w.loads for w in windows]).moved
    return bases, slots


def layer_shares(workload: Workload, seeds: tuple[int, ...], layers: int | None = None) -> tuple[np.ndarray, int]:
    """``(shares [L, N], slots)``: each layer's base shares, hottest first, of the cell under each
    seed, stacked, and DeepSeek's slots over the matrix's sequences of those cells."""
    bases, slots = cell_bases(workload, seeds, layers)
    return np.concatenate([-np.sort(-popularity_shares(base, SHAPE.top_k), axis=1) for base in bases]), slots


def walk_logits(base: np.ndarray, paths: int, rng: np.random.Generator) -> np.ndarray:
    """``[W, L * paths, N]``: ``paths`` draws per layer of its labels' log popularity over the
    cell's windows, the labels ordered by ``base [L, N]`` (hottest first): from the base, each window
    stepped by ``drift_window``'s slow walk, as the matrix steps every expert. A hop trades an
    expert's popularity and base together, so it moves labels between experts and leaves each
    label's walk alone."""
    level = np.repeat(-np.sort(-base, axis=1), paths, axis=0)
    logits = level.copy()
    out = [logits]
    for _ in range(1, WINDOWS):
        logits, _ = drift_window(logits, level, "slow", rng)
        out.append(logits)
    return np.array(out)


def layer_walks(
    workload: Workload, seeds: tuple[int, ...], paths: int, layers: int | None = None
) -> tuple[np.ndarray, int]:
    """``(logits [W, L, N], slots)``: :func:`walk_logits` of each layer of the cell under each seed
    (``paths`` draws a layer, drawn from the seed), stacked, and DeepSeek's slots over the matrix's
    sequences of those cells."""
    bases, slots = cell_bases(workload, seeds, layers)
    walks = [walk_logits(base, paths, np.random.default_rng(seed)) for seed, base in zip(seeds, bases, strict=True)]
    return np.concatenate(walks, axis=1), slots


def swap_optimum(
    workload: Workload, seeds: tuple[int, ...], layers: int | None = None, walk_paths: int = 0
) -> SwapOptimum:
    """The model's optimum, DeepSeek and the myopic rule for one swap cell over ``seeds``.

    ``walk_paths`` 0: the shares fixed at the base (the module docstring's model). Above 0: the
    shares also walk, ``walk_paths`` draws a layer, and the optimum knows each draw's walk in
    advance but not the hops (an information relaxation: no online planner expects more); DeepSeek
    packs and the myopic rule plans each window's shares as they are."""
    if workload.drift != "swap":
        raise ValueError(f"workload {workload.label!r}: the model is of swap drift only")
    if walk_paths < 0:
        raise ValueError(f"walk_paths {walk_paths}: expected 0 (no walk) or more draws a layer")
    hot: np.ndarray | None = None
    if walk_paths:
        logits, matrix_slots = layer_walks(workload, seeds, walk_paths, layers)
        shares = np.array([popularity_shares(window, SHAPE.top_k) for window in logits])
        cost = np.array([PAIRS.max_loads(window) for window in shares])
        hot = logits.argmax(axis=2)
        packed = np.array([deepseek_labels(window) for window in shares])
    else:
        base_shares, matrix_slots = layer_shares(workload, seeds, layers)
        cost = PAIRS.max_loads(base_shares)
        packed = deepseek_labels(base_shares)
    copies = max(1, walk_paths)  # each layer of the cells this many times
    mean = cost.shape[-2] * REBALANCES / SHAPE.ranks  # the mean rank share, summed over layers and windows
    ds = deepseek_policy(cost, packed, hot=hot)
    optimum = [optimal_policy(cost, lam, hot=hot)[0] for lam in PRICES]
    points = [(float(o.moves.sum()), float(o.peaks.sum())) for o in optimum]
    myopic = [receding_policy(cost, lam, 1, hot=hot) for lam in PRICES]
    budget = MOVED_TARGET * matrix_slots * copies
    within = [lam for lam, (m, _) in zip(PRICES, points, strict=True) if m <= budget]
    return SwapOptimum(
        workload,
        deepseek=mean / float(ds.peaks.sum()),
        deepseek_slots=float(ds.moves.sum()) / copies,
        matrix_slots=matrix_slots,
        free=mean / points[0][1],
        at_matrix_budget=mean / best_within(points, budget),
        at_model_budget=mean / best_within(points, MOVED_TARGET * float(ds.moves.sum())),
        price=float(min(within)) if within else float("nan"),
        myopic=mean / best_within([(float(o.moves.sum()), float(o.peaks.sum())) for o in myopic], budget),
        stay=mean / points[-1][1],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--walk-paths",
        type=int,
        default=0,
        help="0: the shares fixed (the module docstring's model); N: they also walk, N draws a layer, "
        "the optimum knowing each draw's walk in advance",
    )
    args, seeds, chosen = parse_cells(parser, argv, "swap")
    if args.walk_paths < 0:
        parser.error(f"--walk-paths {args.walk_paths}: expected 0 or more draws a layer")
    model = "the module docstring" if not args.walk_paths else f"the slow walk too ({args.walk_paths} draws a layer)"
    print(f"{SHAPE.label}; seeds {', '.join(map(str, seeds))} pooled; the model of {model}\n")
    print(
        "| workload | DeepSeek: expected balance | its slots, model / matrix "
        "| optimum, slots free (Δ pp) | optimum within a fifth of DeepSeek's model slots (Δ pp) "
        "| within a fifth of its matrix slots (Δ pp) | price there | myopic rule there (Δ pp) "
        "| no move after the warm-up (Δ pp) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for workload in chosen:
        r = swap_optimum(workload, seeds, walk_paths=args.walk_paths)

        def pp(value: float, r: SwapOptimum = r) -> str:
            return f"{100 * (value - r.deepseek):+.2f}"

        print(
            f"| {workload.label} | {r.deepseek:.4f} | {r.deepseek_slots:.0f} / {r.matrix_slots} | {pp(r.free)} "
            f"| {pp(r.at_model_budget)} | {pp(r.at_matrix_budget)} | {r.price:.4f} | {pp(r.myopic)} | {pp(r.stay)} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
