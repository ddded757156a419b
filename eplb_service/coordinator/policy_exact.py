"""Small layers planned exactly: every layout weighed (or, where there are too many, every change
of up to two slots), the cheapest taken.

Why: in a layer of a few experts on a few ranks with redundant slots (Mixtral-8x7B's 8 experts
+ 2 on 2 GPUs: 5 slots per rank) the migration policy's swap search takes one exchange at a time
and stops where a single exchange no longer pays, while re-laying a layer can move the hot
expert's copy and a cold expert together for the price of two slots. There the whole space of
layouts is small enough to weigh every one of them, each rebalance, in well under a millisecond
per layer. On the workload matrix (``bench/planner.py --matrix``) 7 of the 8+2 shape's 8 abrupt
cells went from 24-37% of DeepSeek's slots at about its balance to 14-17% at 0.05-0.9 points
above it; pooled over seeds 0-2 the shape meets both targets in 23 of 24 cells instead of 16
(``bench/README.md``, "small layers planned exactly"), and with the layer price below in all 24.

A *layout* (:class:`Layouts`) is a set of ranks' expert sets: which rank holds which set, and the
order of slots in a rank, change no load. Every expert appears at least once and never twice on
one rank (a second copy there carries nothing the first does not). 8 experts on 2 ranks of 5
have 280 layouts; on 4 ranks of 2 (no redundant slot), 105.

The rule, per layer (:func:`exact_phy2log`): the layout minimising ``largest rank load / mean rank
load + price x slots moved (+ a layer price where any slot moves)`` under the load planned for
(the forecast the migration policy plans on), slots counted from the current row with its ranks
laid to keep the most; on a tie the fewer slots, and a current row that is a layout stays unless
another is strictly cheaper. The price (:func:`move_prices`) is :data:`EXACT_MOVE_PRICE` mean rank
loads per slot in layers without redundant slots; in layers with them :data:`SPARE_MOVE_PRICE`
per slot plus :data:`SPARE_LAYER_PRICE` once per changed layer, which holds back the one-slot
plans that follow a fading hot expert while a re-laid answer to a new one costs what it did. The
slot price is times the spend controller's ``scale`` where that is below 1 (moves get cheaper
where a deployment has spent far below DeepSeek's slots lately). The balance lead's
``price_scale`` applies only in layers with redundant slots and only while the deployment is
clearly ahead of DeepSeek's balance (``exact_price_scale``, :func:`.spend_control.exact_price_scale`:
a faded lead over half a point). Raised at any lead, up to 8, 2 or 1.5 times, it cost balance in
the abrupt cells, which answer a new hot expert late (the 8+2 cell above from -0.35 pp at 20.4%
of DeepSeek's slots to -0.70 pp at 19.4% at 1.5 times, seeds 0-2 pooled; -0.98 pp at 8 times with
the layer price); from half a point on it leaves that cell as it is and brings small layers off
the matrix that stayed 1-3 points ahead of DeepSeek at 20-38% of its slots within the budget
(``bench/planner.py --matrix --spare-layers``: 190 -> 206 of 240 cells pooled). A fresh plan (from the placement
serving started with) takes the best layout at no price.

A fresh plan of a layer without redundant slots is planned here too where its ranks hold more than
2 slots (Mixtral 8+0 on 2 GPUs: 35 layouts). Elsewhere a fresh plan lays DeepSeek's greedy packing,
which pairs the hottest expert with the coldest and so is the best layout on ranks of 2 slots, but
can miss the best split on ranks of more: the first measured plan then spent the difference
(Mixtral 8+0 on 2 GPUs, Zipf 1.0, slow drift, seed 0: 62 slots where DeepSeek moved 12, and 78 over
the ten rebalances where a fifth of DeepSeek's is 40; from the best split, 48). Layers of that kind
off the matrix (``bench/planner.py --matrix --small-layers``, pooled over seeds 0-2) met both
targets in 45 of 144 cells instead of 40; no matrix cell changed. Planning fresh plans on ranks of
2 slots here as well changes only which equally good pairing is laid and on which ranks, and that
lost 2 of the matrix's Mixtral 8+0 cells to chance (62 → 60 pooled); taking the most even of the
layouts that tie on the largest rank gained 1 cell-seed of 432 off the matrix: neither is done.

Which layers (:func:`plans_exactly`): at most :data:`EXACT_MAX_RANKS` ranks and
:data:`EXACT_MAX_LAYOUTS` layouts, no group/node hierarchy, and either redundant slots, a load
whose imbalance mostly fades, or (above) a fresh plan on ranks of more than 2 slots. Without
redundant slots (Mixtral 8+0 on 4 ranks of 2: 105 pairings) a layer is planned here only while the
migration policy plans for the forecast (persistence below
:data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM`, as when the hottest expert hops to
another every window): the forecast's gains are small and spread, each single exchange falls under
its price, and the swap search moved almost nothing after the first plan, where the cheapest
pairing re-pairs several ranks at once where that pays. Pooled over seeds 0-2 that met 3 of the
shape's 4 swap cells that missed on balance (their worst −0.76 pp → −0.50) and changed no other
cell. Where the load lasts (slow drift, a new hot expert that stays), the same rule traded the
abrupt cells' slot misses for balance misses of up to −1.3 pp at the same count of cells: there
:mod:`.policy_lookahead` plans layers of ranks of 2 slots a few windows ahead when the coordinator
gives it the law of surges, and the swap search plans the rest (and these, without that law, as
``eplb-plan`` plans them). A fresh plan on ranks of 2 slots is :mod:`.policy_lookahead`'s too.

Where a layer with redundant slots has too many layouts (Mixtral 8 + 4 on 4 ranks of 3: 74 900)
but at most :data:`LOCAL_MAX_CANDIDATES` rows within :data:`LOCAL_MAX_CHANGES` changed slots
(:func:`plans_locally`), each plan after the first (DeepSeek's packing) takes the cheapest of
those rows by the same cost and price (:func:`local_phy2log`). On the matrix the 8+4 shape met
both targets in 15 of 24 cells pooled over seeds 0-2; this way, 24. Larger layers keep the
migration policy.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from eplb_service.coordinator.load_forecast import PLAN_AS_IS_FROM

EXACT_MAX_LAYOUTS = 500
"""Layouts weighed at most (``bench/oracle_pairs.py`` runs a dynamic program over
``layers x layouts x layouts`` numbers on the same enumeration)."""
EXACT_MAX_RANKS = 4
"""Ranks a layer may span here: the slots two layouts share are counted over every way to lay one
on the other's ranks (``ranks!``: 24 at 4, 362 880 at 9)."""
EXACT_SEARCH_LIMIT = 200_000
"""Candidate sets of rank sets enumerated at most before giving up on a shape (8 + 2 on 2 ranks:
1 596; 8 + 4 on 4 ranks of 3: 455 126, with 74 900 layouts)."""
EXACT_MOVE_PRICE = 0.05
"""Mean rank loads per moved slot at the spend controller's scale 1, in layers without redundant
slots. It was the price of every layer here: on the matrix's Mixtral 8+2 cells pooled over seeds
0-2, 0.03 / 0.04 / 0.05 / 0.06 / 0.07 / 0.1 met 20 / 23 / 23 / 23 / 23 / 22 of 24; over seeds
0-9, 0.04 / 0.05 / 0.06 met 22 / 23 / 23 with the worst pooled balance at -0.20 / -0.35 / -0.91
pp: cheaper overspends the slots, dearer answers a new hot expert late. Layers with redundant
slots now take :data:`SPARE_MOVE_PRICE` and :data:`SPARE_LAYER_PRICE` instead."""
SPARE_MOVE_PRICE = 0.045
"""Mean rank loads per moved slot in layers with redundant slots, at the spend controller's scale 1
(beside :data:`SPARE_LAYER_PRICE`)."""
SPARE_LAYER_PRICE = 0.02
"""Mean rank loads a plan pays once for each layer with redundant slots that it changes at all,
besides :data:`SPARE_MOVE_PRICE` per slot (not scaled by the spend controller).

Why: with a price per slot alone, the one cell of Mixtral 8+2 that missed (Zipf 1.4, abrupt, low
noise) sat on a line no single price crosses: 0.04 / 0.05 / 0.06 per slot gave -0.14 / -0.35 /
-0.83 pp of DeepSeek's balance at 22.1 / 20.4 / 17.7% of its slots (seeds 0-2 pooled). There a
plan both answers new hot experts (a copy and the slot it takes, re-laid together) and follows
the slow fade of earlier ones one slot at a time, and the second kind buys the least for its
slots. A fixed charge per changed layer weighs against exactly those one-slot follow-ups while
costing a re-laid answer of 2-4 slots about what it did (one slot: 0.065 instead of 0.05; two:
0.11 instead of 0.10; four: 0.20 either way). Over seeds 0-9 that cell went from -0.35 pp at
20.4% of DeepSeek's slots to -0.38 pp at 19.6%, and Mixtral 8+4 Zipf 1.0 slow drift low noise
from -0.50 pp to -0.48 pp (both now within the targets pooled); Mixtral's 8+2 and 8+4 cells over
ten seeds pooled 46 -> 48 of 48, 44 -> 45 under every seed (``bench/README.md``, ninth section).
Layers without redundant slots keep :data:`EXACT_MOVE_PRICE` alone: the same charge there lost
two of Mixtral 8+0's swap cells."""


@dataclass(frozen=True)
class Layouts:
    """Every layout of a layer shape (module docstring), in lexicographic order of their ranks' sets.

    Attributes:
        members: ``[S, R, per_rank]`` each layout's experts per rank.
        copies: ``[S, R, N]`` 1 where a layout's rank holds an expert.
        weights: ``[S, R, N]`` the share of each expert's load a rank carries (its copies split
            its tokens evenly, as vLLM routes them).
        moves: ``[S, S]`` slots changed going from layout ``i`` to ``j``, ranks laid to keep the most.
    """

    members: np.ndarray
    copies: np.ndarray
    weights: np.ndarray
    moves: np.ndarray

    @property
    def ranks(self) -> int:
        return int(self.members.shape[1])

    def __len__(self) -> int:
        return int(self.members.shape[0])

    def rank_loads(self, load: np.ndarray) -> np.ndarray:
        """``[..., S, R]`` every layout's rank loads under ``load [..., N]``."""
        flat = load @ self.weights.reshape(-1, self.weights.shape[2]).T
        return flat.reshape(*load.shape[:-1], *self.weights.shape[:2])

    def max_loads(self, load: np.ndarray) -> np.ndarray:
        """``[..., S]`` every layout's largest rank load under ``load [..., N]``."""
        return self.rank_loads(load).max(axis=-1)


def layouts(experts: int, ranks: int, per_rank: int) -> Layouts:
    """Every layout of ``experts`` experts on ``ranks`` ranks of ``per_rank`` slots.

    Raises:
        ValueError: naming the shape, where no layout exists, the layer spans more than
            :data:`EXACT_MAX_RANKS` ranks, or there are more than :data:`EXACT_MAX_LAYOUTS`
            layouts (or more than :data:`EXACT_SEARCH_LIMIT` candidates).
    """
    if min(experts, ranks, per_rank) < 1 or per_rank > experts or ranks * per_rank < experts:
        raise ValueError(f"{experts} experts cannot each sit once on {ranks} ranks of {per_rank} slots")
    if ranks > EXACT_MAX_RANKS:
        raise ValueError(f"{ranks} ranks: layouts are weighed on at most {EXACT_MAX_RANKS} ranks")
    candidates = math.comb(math.comb(experts, per_rank) + ranks - 1, ranks)
    if candidates > EXACT_SEARCH_LIMIT:
        raise ValueError(
            f"{experts} experts on {ranks} ranks of {per_rank} slots: {candidates} candidate layouts to "
            f"enumerate, more than {EXACT_SEARCH_LIMIT}"
        )
    subsets = list(itertools.combinations(range(experts), per_rank))
    found = []
    for chosen in itertools.combinations_with_replacement(range(len(subsets)), ranks):
        if len(set().union(*(subsets[k] for k in chosen))) == experts:
            found.append([subsets[k] for k in chosen])
            if len(found) > EXACT_MAX_LAYOUTS:
                raise ValueError(
                    f"{experts} experts on {ranks} ranks of {per_rank} slots have more than {EXACT_MAX_LAYOUTS} layouts"
                )
    members = np.array(found, dtype=np.int64)
    copies = np.zeros((len(found), ranks, experts))
    np.put_along_axis(copies, members, 1.0, axis=2)
    weights = copies / copies.sum(axis=1, keepdims=True)
    kept = np.zeros((len(found), len(found)))
    for order in itertools.permutations(range(ranks)):
        kept = np.maximum(kept, sum(copies[:, r] @ copies[:, order[r]].T for r in range(ranks)))
    return Layouts(members, copies, weights, (ranks * per_rank - kept).astype(np.int64))


@functools.lru_cache(maxsize=32)
def small_layouts(experts: int, ranks: int, per_rank: int) -> Layouts | None:
    """:func:`layouts`, or None where the shape has too many (cached: a coordinator plans one shape)."""
    try:
        return layouts(experts, ranks, per_rank)
    except ValueError:
        return None


def plans_exactly(
    num_logical: int, num_physical: int, num_ranks: int, *, persistence: float = 1.0, fresh: bool = False
) -> bool:
    """Whether the migration policy plans layers of this shape here (module docstring): at most
    :data:`EXACT_MAX_RANKS` ranks and :data:`EXACT_MAX_LAYOUTS` layouts, and redundant slots or,
    without any, a load planned for its forecast (``persistence`` below
    :data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM`: most of its imbalance fades)
    or a ``fresh`` plan on ranks of more than 2 slots (DeepSeek's packing, which a fresh plan
    otherwise lays, may miss the best split there; on ranks of 2 it is the best pairing)."""
    if num_physical < num_logical or num_physical % num_ranks:
        return False
    per_rank = num_physical // num_ranks
    fresh_split = fresh and per_rank > 2
    if num_physical == num_logical and not (persistence < PLAN_AS_IS_FROM or fresh_split):
        return False
    return small_layouts(num_logical, num_ranks, per_rank) is not None


def exact_phy2log(
    current_phy2log: np.ndarray,
    load: np.ndarray,
    num_ranks: int,
    *,
    move_price: float,
    layer_price: float = 0.0,
    expected: np.ndarray | None = None,
) -> np.ndarray:
    """``[L, P]`` each layer laid out by the rule of the module docstring at ``move_price`` mean rank
    loads per moved slot (0 for a fresh plan) and ``layer_price`` per changed layer. Slots whose
    expert stays on their rank keep their place; a current row with an expert twice on a rank is
    no layout and is always re-laid.

    Args:
        current_phy2log: ``[L, P]`` valid current placement of a shape :func:`plans_exactly` accepts.
        load: ``[L, N]`` the load to plan for (>= 0, finite).
        num_ranks: EP ranks.
        move_price: >= 0.
        layer_price: >= 0.
        expected: ``[L, S]`` each layout's cost in mean rank loads to use instead of its largest
            rank load under ``load`` (:func:`.policy_lookahead.lookahead_costs`), or None.
    """
    current = np.asarray(current_phy2log, dtype=np.int64)
    num_layers, num_physical = current.shape
    num_logical = load.shape[1]
    per_rank = num_physical // num_ranks
    space = small_layouts(num_logical, num_ranks, per_rank)
    if space is None:
        raise ValueError(f"{num_logical} experts on {num_ranks} ranks of {per_rank} slots are not planned exactly")
    held = np.zeros((num_layers, num_ranks, num_logical))
    np.add.at(
        held,
        (np.arange(num_layers)[:, None], np.arange(num_physical)[None, :] // per_rank, current),
        1.0,
    )
    orders = list(itertools.permutations(range(num_ranks)))
    kept = np.full((num_layers, len(space)), -1.0)
    order_of = np.zeros((num_layers, len(space)), dtype=np.int64)
    for index, order in enumerate(orders):  # current rank r takes the layout's rank order[r]
        here = np.minimum(held[:, None], space.copies[None][:, :, list(order)]).sum(axis=(2, 3))
        better = here > kept
        kept = np.where(better, here, kept)
        order_of = np.where(better, index, order_of)
    moves = num_physical - kept
    relative = _over_mean(space.max_loads(load), load, num_ranks) if expected is None else expected
    cost = _costs(relative, moves, move_price, layer_price)
    best = cost.argmin(axis=1)
    rows = np.arange(num_layers)
    stays = moves[rows, best] == 0  # the current row is the cheapest layout (or ties with it)
    out = current.copy()
    for layer in np.flatnonzero(~stays):
        order = orders[order_of[layer, best[layer]]]
        for rank in range(num_ranks):
            slots = slice(rank * per_rank, (rank + 1) * per_rank)
            out[layer, slots] = _kept_in_place(current[layer, slots], space.members[best[layer], order[rank]])
    return out


def _over_mean(peak: np.ndarray, load: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L, C]`` each candidate's largest rank load ``peak`` over its layer's mean rank load (an
    idle layer: 0, so it weighs slots alone)."""
    mean = load.sum(axis=1) / num_ranks
    return peak / np.where(mean > 0, mean, 1.0)[:, None]


def _costs(relative: np.ndarray, moves: np.ndarray, move_price: float, layer_price: float) -> np.ndarray:
    """``[L, C]`` the module docstring's cost of each candidate: its largest rank load over the
    mean (``relative``, :func:`_over_mean`, or a caller's expected one), plus ``move_price`` per
    slot it ``moves`` (and a hair more, so a tie goes to the fewer slots), plus ``layer_price``
    once where it moves any."""
    return relative + (move_price + 1e-9) * moves + layer_price * (moves > 0)


def _kept_in_place(row: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """One rank's slots holding ``wanted``, each expert already there in its slot (once)."""
    left = Counter(int(e) for e in wanted)
    out = [-1] * len(row)
    for slot, expert in enumerate(row.tolist()):
        if left[expert] > 0:
            out[slot] = expert
            left[expert] -= 1
    missing = sorted(left.elements())
    return np.array([e if e >= 0 else missing.pop(0) for e in out], dtype=row.dtype)


LOCAL_MAX_CHANGES = 2
"""Slots a plan may change per layer where the layouts are too many to weigh them all."""
LOCAL_MAX_CANDIDATES = 5000
"""Rows weighed per layer at most there: every change of up to :data:`LOCAL_MAX_CHANGES` slots to
any expert (Mixtral 8 + 4 on 4 ranks of 3: 12 x 8 + 66 x 64 = 4 320)."""


def local_candidates(num_physical: int, num_logical: int) -> int:
    """How many rows :func:`local_phy2log` weighs per layer (the current one aside)."""
    return sum(math.comb(num_physical, d) * num_logical**d for d in range(1, LOCAL_MAX_CHANGES + 1))


def plans_locally(num_logical: int, num_physical: int, num_ranks: int) -> bool:
    """Whether the migration policy plans layers of this shape by :func:`local_phy2log`: redundant
    slots, too many layouts to weigh them all (:func:`plans_exactly`), and at most
    :data:`LOCAL_MAX_CANDIDATES` rows within :data:`LOCAL_MAX_CHANGES` changed slots."""
    if num_physical <= num_logical or num_physical % num_ranks:
        return False
    if plans_exactly(num_logical, num_physical, num_ranks):
        return False
    return local_candidates(num_physical, num_logical) <= LOCAL_MAX_CANDIDATES


@functools.lru_cache(maxsize=8)
def _edits(num_physical: int, num_logical: int) -> tuple[np.ndarray, np.ndarray]:
    """``(slots [C, D], experts [C, D])``: every change of up to :data:`LOCAL_MAX_CHANGES` slots
    (a change of fewer slots repeats its last one)."""
    slots, experts = [], []
    for count in range(1, LOCAL_MAX_CHANGES + 1):
        for where in itertools.combinations(range(num_physical), count):
            for what in itertools.product(range(num_logical), repeat=count):
                pad = LOCAL_MAX_CHANGES - count
                slots.append(list(where) + [where[-1]] * pad)
                experts.append(list(what) + [what[-1]] * pad)
    return np.array(slots, dtype=np.int64), np.array(experts, dtype=np.int64)


def local_phy2log(
    current_phy2log: np.ndarray, load: np.ndarray, num_ranks: int, *, move_price: float, layer_price: float = 0.0
) -> np.ndarray:
    """``[L, P]`` each layer's cheapest row within :data:`LOCAL_MAX_CHANGES` changed slots of its
    current one, by the cost of the module docstring (``largest rank load / mean + move_price x
    slots changed``, plus ``layer_price`` where any changes; every expert kept, none twice on a
    rank); the current row stays unless another is strictly cheaper, and a current row with an
    expert twice on a rank is re-laid where a change of up to two slots mends it.

    Why: where a layer has too many layouts to weigh them all (Mixtral 8 + 4 on 4 ranks of 3:
    74 900), the best of every one- or two-slot change still answers a new hot expert with its
    new copy and the slot it takes together, which the swap search prices one exchange at a time
    (``bench/README.md``, "small layers planned exactly").
    """
    current = np.asarray(current_phy2log, dtype=np.int64)
    num_layers, num_physical = current.shape
    num_logical = load.shape[1]
    per_rank = num_physical // num_ranks
    where, what = _edits(num_physical, num_logical)
    rows = np.repeat(current[:, None, :], len(where) + 1, axis=1)  # [L, C + 1, P]; 0 = stay
    body = rows[:, 1:]
    for d in range(where.shape[1]):
        np.put_along_axis(
            body,
            np.broadcast_to(where[None, :, d : d + 1], (num_layers, len(where), 1)),
            what[None, :, d : d + 1],
            axis=2,
        )
    # Per change: the slots it really changes, and the replicas per expert ``[L, C + 1, N]`` it
    # leaves (the current row's, less what each of its distinct slots overwrites, plus what it
    # writes; a one-slot change repeats its slot, counted once). Each step indexes one element per
    # (layer, change), so plain fancy indexing adds without collisions. The arrays' last axes are
    # a handful long (slots per rank, ranks, experts), where numpy's reductions along them cost
    # more than their work: they are summed slice by slice instead.
    changed = np.zeros((num_layers, len(where) + 1), dtype=np.int64)
    counts = np.repeat((current[..., None] == np.arange(num_logical)).sum(axis=1)[:, None, :], len(where) + 1, axis=1)
    layer_index = np.arange(num_layers)[:, None]
    steps = []
    for d in range(where.shape[1]):
        real = np.flatnonzero(np.ones(len(where), dtype=bool) if d == 0 else where[:, d] != where[:, d - 1])
        gone, wrote = current[:, where[real, d]], what[real, d][None, :]
        changed[:, real + 1] += gone != wrote
        counts[layer_index, real[None, :] + 1, gone] -= 1
        counts[layer_index, real[None, :] + 1, wrote] += 1
        steps.append((real, gone))
    # Every expert keeps a replica: only an overwritten expert can have lost its last one (unless
    # the current row already lacks one, where every row is checked whole).
    valid = np.ones(rows.shape[:2], dtype=bool)
    for real, gone in steps:
        valid[:, real + 1] &= counts[layer_index, real[None, :] + 1, gone] > 0
    lacking = (counts[:, 0] == 0).any(axis=1)
    valid[lacking] &= (counts[lacking] > 0).all(axis=2)
    # No expert twice on a rank: every pair of a rank's slots compared.
    by_rank = rows.reshape(num_layers, -1, num_ranks, per_rank)
    for i, j in itertools.combinations(range(per_rank), 2):
        for rank in range(num_ranks):
            valid &= by_rank[:, :, rank, i] != by_rank[:, :, rank, j]
    share = load[:, None, :] / np.maximum(counts, 1)
    carried = np.take_along_axis(share, rows, axis=2).reshape(num_layers, -1, num_ranks, per_rank)
    peak = np.zeros(rows.shape[:2])
    for rank in range(num_ranks):
        rank_load = carried[:, :, rank, 0].copy()
        for slot in range(1, per_rank):
            rank_load += carried[:, :, rank, slot]
        np.maximum(peak, rank_load, out=peak)
    cost = np.where(valid, _costs(_over_mean(peak, load, num_ranks), changed, move_price, layer_price), np.inf)
    best = np.where(np.isfinite(cost).any(axis=1), cost.argmin(axis=1), 0)  # nothing valid: stay
    return rows[np.arange(num_layers), best]


def small_layer_phy2log(
    current_phy2log: np.ndarray,
    load: np.ndarray,
    num_ranks: int,
    *,
    spend_scale: float,
    fresh: bool,
    persistence: float,
    price_scale: float = 1.0,
) -> np.ndarray | None:
    """The migration policy's plan where this module plans the layer shape (no group/node
    hierarchy: the caller checks), else None: every layout weighed (:func:`plans_exactly`, which
    the load's ``persistence`` decides for layers without redundant slots; a fresh plan at no
    price) or, after the first plan, the cheapest change of up to two slots
    (:func:`plans_locally`), at :func:`move_prices` (a fresh plan at none)."""
    num_logical, num_physical = load.shape[1], np.asarray(current_phy2log).shape[1]
    move_price, layer_price = move_prices(num_logical, num_physical, spend_scale, price_scale)
    if plans_exactly(num_logical, num_physical, num_ranks, persistence=persistence, fresh=fresh):
        if fresh:
            return exact_phy2log(current_phy2log, load, num_ranks, move_price=0.0)
        return exact_phy2log(current_phy2log, load, num_ranks, move_price=move_price, layer_price=layer_price)
    if not fresh and plans_locally(num_logical, num_physical, num_ranks):
        return local_phy2log(current_phy2log, load, num_ranks, move_price=move_price, layer_price=layer_price)
    return None


def move_prices(
    num_logical: int, num_physical: int, spend_scale: float, price_scale: float = 1.0
) -> tuple[float, float]:
    """``(per moved slot, per changed layer)`` in mean rank loads for a plan after the first:
    :data:`SPARE_MOVE_PRICE` and :data:`SPARE_LAYER_PRICE` where the layer has redundant slots,
    else :data:`EXACT_MOVE_PRICE` and nothing; the slot price times ``spend_scale`` where that is
    below 1 (moves get cheaper where a deployment has spent far below DeepSeek's slots lately)
    and, with redundant slots, times ``price_scale`` (the balance lead's price where the
    deployment is clearly ahead of DeepSeek: :func:`.spend_control.exact_price_scale`)."""
    scale = min(spend_scale, 1.0)
    if num_physical > num_logical:
        return SPARE_MOVE_PRICE * scale * price_scale, SPARE_LAYER_PRICE
    return EXACT_MOVE_PRICE * scale, 0.0
