"""Small layers without redundant slots, on ranks of 2 slots, planned a few windows ahead.

Why: where a layer has no redundant slot and two slots per rank (Mixtral-8x7B on 4 GPUs: 105
pairings of its 8 experts), every answer to a new hot expert re-pairs ranks. The swap search
answered each surge and then each step of its fade, a price per slot at a time; on the workload
matrix's Mixtral 8+0 abrupt cells that spent 32-50% of DeepSeek's slots at about its balance,
where issue 16 allows 20%, and no price per slot does better there (``bench/oracle_pairs.py``).
What does is planning with **recourse**: judging a pairing by the next window *and* by the best
answers still open after it, in every case of what may come (``bench/online_bound.py``: given
the matrix's law, such a planner met 6 of those 8 cells).

Two rules, per layer:

- **A fresh plan** (from the placement serving started with) takes a best pairing (least largest
  rank, as DeepSeek's packing), and of those the least even (:func:`roomy_costs`): the hottest
  expert beside the coldest sets the largest rank, and under it warm experts share ranks and cold
  ones share ranks, where DeepSeek's packing gives every cold expert a hot partner. A cold expert
  that turns hot then has a cold partner, and the answer costs nothing or one exchange. Over ten
  seeds of Mixtral 8+0's matrix cells this first pairing took the shape from 14 to 16 of 24
  cells, and with the lead's price below 18 (``bench/README.md``, twelfth section). It is a bet:
  where the hottest expert trades places with a random one every window (the *swap* cells), an
  even pairing serves better: over ten seeds two of those cells fell below the balance line
  (−0.47 → −0.56 and −0.47 → −0.60 pp) and one that missed fell further (−0.60 → −0.90 pp).
- **Later plans**, given the law of surges read from the windows
  (:class:`.surge_model.SurgeModel`, which the coordinator keeps) and a load whose imbalance
  mostly lasts (``persistence`` at least
  :data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM`; below it :mod:`.policy_exact`
  plans for the forecast): each pairing costs its expected largest rank load over the mean rank
  load in the next window, plus the expected cost of the best plans of the
  :data:`LOOKAHEAD_DEPTH` − 1 rebalances after it, each at the price per moved slot and each
  re-chosen in every case (:func:`lookahead_costs`). A window's cases: every expert's excess over
  its level fades by ``reversion``; with chance ``rate`` one expert of the colder half (each
  alike) lands ``jump`` above the hottest; no sampling noise is forecast. The plan takes the
  pairing of least ``cost + price x slots moved`` from the current one
  (:func:`.policy_exact.exact_phy2log` lays it, keeping slots in place). The price is
  :data:`LOOKAHEAD_SHARE_PRICE` of the layer's load per slot, times the spend controller's
  ``scale`` where that is below 1 and times the balance lead's ``price_scale`` (doubled while the
  deployment is over the slot cap with a lead over DeepSeek's balance, :mod:`.spend_control`):
  over ten seeds the lead's factor took the shape from 16 to 18 of 24 cells, all six Zipf abrupt
  cells within both targets.
- **Later plans, where the hottest expert hops** (``persistence`` below
  :data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM` and the model's ``hop``, the
  share of the hottest expert's lead gone a window later, at least :data:`HOP_FROM`): the same
  lookahead, :data:`HOP_DEPTH` rebalances deep, on the cases of a hop (:func:`hop_cases`: the
  hottest expert trades places with each other expert, at ``hop`` over them alike; the others
  stay as they are), at :data:`HOP_SHARE_PRICE`. :mod:`.policy_exact` planned these for the
  forecast, which shrinks every expert's deviation by the persistence, the experts that stay put
  as much as the one that hops. Over twenty seeds of Mixtral 8+0's eight swap cells, with the
  spend controller's brake on fading loads (:mod:`.spend_control`): next-window balance 0.48
  -> 0.46 points behind DeepSeek on average, at 16.4% of its slots instead of 15.7%, and every
  cell under a fifth of its slots pooled per ten seeds (two log-normal ones went over before);
  10 of the 16 ten-seed pools met both targets instead of 9 (``bench/README.md``, thirteenth
  section). Where ``hop`` is lower (surges that fade, sampling noise) :mod:`.policy_exact` still
  plans for the forecast.

Cost: the lookahead weighs 156 scenario nodes per layer (5 cases a window, 4 windows deep), each
with the cheapest answer from every pairing (:func:`cheapest_answers`); a hopping layer, 73 nodes
of 8 cases (3 windows deep). On a 2-core AMD EPYC a plan of Mixtral 8+0's 64 layers on 4 ranks
takes a median 271 ms over the matrix's 24 workloads (seed 0; 290 ms in the same session before
the distance tables were cached; the swap search took 1.4 ms). It runs in the coordinator's
planning thread, off the serving path.
"""

from __future__ import annotations

import functools

import numpy as np

from eplb_service.coordinator.load_forecast import PLAN_AS_IS_FROM
from eplb_service.coordinator.policy_exact import Layouts, exact_phy2log, small_layouts
from eplb_service.coordinator.surge_model import SurgeModel, centred_log_shares

LOOKAHEAD_DEPTH = 4
"""Rebalances judged per plan: the next one and three after it (3 and 5 gave within a few
tenths of a point of 4 on one matrix cell, ``bench/online_bound.py``)."""
LOOKAHEAD_MAX_LAYOUTS = 128
"""Pairings weighed at most (8 experts on 4 ranks: 105). The cheapest answers from every layout to
every other are ``layouts^2`` numbers per scenario node."""
CHUNK_NODES = 512
"""Scenario nodes whose rank loads (``[chunk x cases, S, R]`` floats) or cheapest answers are
computed at once."""


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """``[K, N]`` shares from log shares (rows sum to 1)."""
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    return prob / prob.sum(axis=1, keepdims=True)


def next_cases(logits: np.ndarray, level: np.ndarray, model: SurgeModel) -> tuple[np.ndarray, np.ndarray]:
    """``(cases [K, C + 1, N], odds [C + 1])``: each node's next window with no surge, then with
    a surge on each of its ``C`` colder experts (``C = N // 2``, at least 1), and their odds."""
    faded = logits + model.reversion * (level - logits)
    num = logits.shape[1]
    colder = max(1, num // 2)
    cold = np.argsort(faded, axis=1, kind="stable")[:, :colder]
    cases = np.repeat(faded[:, None, :], colder + 1, axis=1)
    peak = faded.max(axis=1)
    rows = np.arange(len(faded))
    for c in range(colder):
        cases[rows, c + 1, cold[:, c]] = peak + model.jump
    odds = np.array([1.0 - model.rate] + [model.rate / colder] * colder)
    return cases, odds


def hop_cases(logits: np.ndarray, model: SurgeModel) -> tuple[np.ndarray, np.ndarray]:
    """``(cases [K, N, N], odds [N])``: each node's next window as it is, then with its hottest
    expert trading places with each of the ``N - 1`` others, at ``model.hop`` over them alike."""
    num_nodes, num = logits.shape
    rows = np.arange(num_nodes)
    top = logits.argmax(axis=1)
    cases = np.repeat(logits[:, None, :], num, axis=1)
    others = np.array([[e for e in range(num) if e != t] for t in range(num)])[top]  # [K, N - 1]
    for c in range(num - 1):
        other = others[:, c]
        cases[rows, c + 1, top] = logits[rows, other]
        cases[rows, c + 1, other] = logits[rows, top]
    odds = np.array([1.0 - model.hop] + [model.hop / max(num - 1, 1)] * (num - 1))
    return cases, odds


def distance_tables(moves: np.ndarray) -> tuple[tuple[int, np.ndarray], ...]:
    """``((count, table [S, W]), ...)``: for each count of moved slots below the largest, every
    layout's neighbours that far away (a row with fewer is padded with the layout itself, which,
    counted at ``count`` slots, only costs more than at none, where it is already counted).

    Cached per ``moves`` (a coordinator plans one shape): rebuilt on every call, the tables took
    about a fourteenth of a plan of Mixtral 8+0's layers (290 → 271 ms, module docstring)."""
    moves = np.ascontiguousarray(moves, dtype=np.int64)
    return _distance_tables(moves.tobytes(), moves.shape)


@functools.lru_cache(maxsize=8)
def _distance_tables(raw: bytes, shape: tuple[int, ...]) -> tuple[tuple[int, np.ndarray], ...]:
    moves = np.frombuffer(raw, dtype=np.int64).reshape(shape)
    counts = np.unique(moves[moves > 0])
    layouts = np.arange(len(moves))
    tables = []
    for count in counts[:-1]:
        near = [np.flatnonzero(row == count) for row in moves]
        width = max(len(n) for n in near)
        table = np.array([np.r_[n, np.full(width - len(n), s)] for s, n in zip(layouts, near, strict=True)])
        table.setflags(write=False)
        tables.append((int(count), table))
    return tuple(tables)


def cheapest_answers(cost: np.ndarray, moves: np.ndarray, price: float) -> np.ndarray:
    """``[K, S]``: from each layout, the least ``price x slots moved + cost`` of the layout after it.

    By distance rather than over every pair: a layout's own cost; for each count of moved slots
    below the largest, the cheapest layout that far away (:func:`distance_tables`); and the row's
    cheapest at the largest count (a nearer layout counted that far only costs more there, and is
    also counted at its own distance). Exact, and about half the work of ``[K, S, S]`` on pairings."""
    best = cost.copy()
    largest = int(moves.max(initial=0))
    if largest <= 0:
        return best
    np.minimum(best, price * largest + cost.min(axis=1, keepdims=True), out=best)
    for count, table in distance_tables(moves):
        for lo in range(0, len(cost), CHUNK_NODES):
            part = cost[lo : lo + CHUNK_NODES]
            np.minimum(
                best[lo : lo + CHUNK_NODES], price * count + part[:, table].min(axis=2), out=best[lo : lo + CHUNK_NODES]
            )
    return best


def expected_peaks(space: Layouts, cases: np.ndarray, odds: np.ndarray) -> np.ndarray:
    """``[K, S]`` each node's largest rank share of every layout, averaged over its ``cases
    [K, C, N]`` (log shares) at ``odds [C]``; computed in blocks of :data:`CHUNK_NODES` nodes so a
    deep look holds a block's ``[nodes x cases, S, R]`` rank loads at a time, not the level's."""
    num_nodes, fan, num = cases.shape
    weights = space.weights.reshape(-1, num).T  # [N, S * R]
    layouts, ranks = space.weights.shape[:2]
    out = np.empty((num_nodes, layouts))
    for lo in range(0, num_nodes, CHUNK_NODES):
        part = cases[lo : lo + CHUNK_NODES]
        loads = (softmax_rows(part.reshape(-1, num)) @ weights).reshape(len(part), fan, layouts, ranks)
        peak = loads[..., 0].copy()
        for rank in range(1, ranks):  # pairwise: faster than a max over a short last axis
            np.maximum(peak, loads[..., rank], out=peak)
        out[lo : lo + CHUNK_NODES] = np.einsum("c,kcs->ks", odds, peak)
    return out


def lookahead_costs(
    space: Layouts,
    logits: np.ndarray,
    model: SurgeModel,
    price: float,
    depth: int = LOOKAHEAD_DEPTH,
    *,
    hops: bool = False,
) -> np.ndarray:
    """``[L, S]`` every layout's cost (module docstring) for layers whose load now has centred log
    shares ``logits [L, N]``, at ``price`` mean rank loads per moved slot in later rebalances;
    each window's cases are :func:`next_cases` (surges), or :func:`hop_cases` with ``hops``."""
    if depth < 1:
        raise ValueError(f"lookahead depth {depth}: expected at least 1")
    if logits.shape != model.level.shape:
        raise ValueError(f"load of shape {logits.shape} against a surge model of shape {model.level.shape}")
    ranks = space.ranks
    nodes, level = logits, model.level
    costs: list[np.ndarray] = []
    odds = np.ones(1)
    for d in range(depth):
        cases, odds = hop_cases(nodes, model) if hops else next_cases(nodes, level, model)
        fan = cases.shape[1]
        costs.append(ranks * expected_peaks(space, cases, odds))
        if d == depth - 1:
            break
        nodes = cases.reshape(-1, cases.shape[2])
        if not hops:  # a hop's cases do not read the level
            level = np.repeat(level, fan, axis=0)
    ahead: np.ndarray | None = None
    for d in range(len(costs) - 1, -1, -1):
        q = costs[d]
        if ahead is not None:
            q = q + (odds[None, :, None] * ahead.reshape(len(q), len(odds), -1)).sum(axis=1)
        if d == 0:
            return q
        ahead = cheapest_answers(q, space.moves, price)
    raise AssertionError("unreachable")


LOOKAHEAD_SHARE_PRICE = 0.0425
"""Price per moved slot in later rebalances and in this one, in shares of the layer's load (times
the ranks: mean rank loads). ``bench/online_bound.py``'s planner on the law read from the windows
met both targets at 0.04 in three of Mixtral 8+0's abrupt cells and came within 0.1 point of the
slot line in a fourth; 0.045 was the next price tried."""


HOP_FROM = 0.5
"""The model's ``hop`` (share of the hottest expert's lead gone a window later) from which a layer
whose load mostly fades is planned ahead as hopping; below it :mod:`.policy_exact` plans it for
the forecast. The matrix's Mixtral 8+0 cells read 0.84-0.92 where the hottest expert trades places
every window and at most 0.14 elsewhere (:mod:`.surge_model`)."""
HOP_SHARE_PRICE = 0.001
"""Price per moved slot where the layer hops, in the units of :data:`LOOKAHEAD_SHARE_PRICE`. The
lookahead already counts that an answer to the hottest expert serves about one window before it
hops again, so the price only holds back answers worth less than their slots. On Mixtral 8+0's
six Zipf swap cells (seeds 0-9 pooled, before the controller's brake) 0.001 met both targets in
all six, 0.0015 to 0.005 in five, 0.0005 in none (over the slot budget); log-normal's two swap
cells missed at every price, at 0.001 with 28-37% of DeepSeek's slots until the spend
controller's brake on fading loads held them under a fifth (:mod:`.spend_control`)."""
HOP_DEPTH = 3
"""Rebalances judged per plan where the layer hops: each window has ``N`` cases (8 experts: 73
scenario nodes at 3 deep, 585 at 4)."""


def plans_ahead(num_logical: int, num_physical: int, num_ranks: int) -> bool:
    """Whether layers of this shape are planned here: no redundant slot, ranks of 2 slots (a
    layer is a pairing of its experts, the kind ``bench/online_bound.py`` measured this on) and at
    most :data:`LOOKAHEAD_MAX_LAYOUTS` pairings (:func:`.policy_exact.small_layouts`)."""
    if num_physical != num_logical or num_physical != 2 * num_ranks:
        return False
    space = small_layouts(num_logical, num_ranks, 2)
    return space is not None and len(space) <= LOOKAHEAD_MAX_LAYOUTS


def roomy_costs(space: Layouts, load: np.ndarray) -> np.ndarray:
    """``[L, S]`` a fresh plan's cost of every layout: the layouts of least largest rank load tie
    on it, and of those the least even (most summed squared rank load) costs least; every other
    layout costs more than any of them."""
    ranks = space.rank_loads(load)  # [L, S, R]
    peak = ranks.max(axis=2)
    total = load.sum(axis=1)
    mean = np.where(total > 0, total / space.ranks, 1.0)[:, None]  # an idle layer: every layout ties
    best = peak <= peak.min(axis=1, keepdims=True) * (1.0 + 1e-12)
    spread = (ranks**2).sum(axis=2) / mean**2 / space.ranks**2  # in (0, 1]
    return np.where(best, -spread, 1.0 + peak / mean)


def lookahead_phy2log(
    current_phy2log: np.ndarray,
    load: np.ndarray,
    num_ranks: int,
    model: SurgeModel | None,
    *,
    spend_scale: float,
    persistence: float,
    fresh: bool,
    price_scale: float = 1.0,
) -> np.ndarray | None:
    """The migration policy's plan where this module plans the layer shape (:func:`plans_ahead`),
    else None. A fresh plan takes the roomiest of the best layouts (:func:`roomy_costs`). A later
    one, given a surge ``model``, takes each layer's pairing of least :func:`lookahead_costs` plus
    the price of the slots it moves: where the load's imbalance mostly lasts (``persistence`` at
    least :data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM`) on the cases of a
    surge at :data:`LOOKAHEAD_SHARE_PRICE`; where it mostly fades and the hottest expert hops
    (``model.hop`` at least :data:`HOP_FROM`) on the cases of a hop at :data:`HOP_SHARE_PRICE`;
    else None (:mod:`.policy_exact` plans for the forecast). The price is times the spend
    controller's ``spend_scale`` where that is below 1 (as :func:`.policy_exact.move_prices`) and
    times the balance lead's ``price_scale``."""
    current = np.asarray(current_phy2log, dtype=np.int64)
    num_logical, num_physical = load.shape[1], current.shape[1]
    if not plans_ahead(num_logical, num_physical, num_ranks):
        return None
    space = small_layouts(num_logical, num_ranks, num_physical // num_ranks)
    assert space is not None  # plans_ahead checked
    if fresh:
        return exact_phy2log(current, load, num_ranks, move_price=0.0, expected=roomy_costs(space, load))
    if model is None or model.level.shape != load.shape:
        return None
    hops = persistence < PLAN_AS_IS_FROM
    if hops and model.hop < HOP_FROM:
        return None
    share, depth = (HOP_SHARE_PRICE, HOP_DEPTH) if hops else (LOOKAHEAD_SHARE_PRICE, LOOKAHEAD_DEPTH)
    price = share * num_ranks * min(spend_scale, 1.0) * price_scale
    expected = lookahead_costs(space, centred_log_shares(load), model, price, depth, hops=hops)
    return exact_phy2log(current, load, num_ranks, move_price=price, expected=expected)
