"""Migration-aware placement: reach DeepSeek's balance from where experts already are.

DeepSeek's policy rebuilds every layer from scratch, so after a rebalance nearly every slot
holds a different expert, and nearly every expert's bytes cross ranks. This policy starts from
the current placement and changes only what the new load needs, with one exception: **the
first plan, from the placement serving started with** (vLLM's own layout, which no plan chose;
``plan_rebalance(fresh=True)``, which the coordinator sets until a plan has committed and
``eplb-plan`` from vLLM's initial placement), is DeepSeek's packing. A packing is a better base
than a repaired arbitrary layout: the repair stops at a tolerance and keeps whatever pairs the
layout happened to have, which drift then pushes over the target sooner. It costs one full move
at the start (vLLM's EPLB moves that much at every rebalance), which the spend controller does
not tally. Otherwise, per layer (all layers advance together, vectorised):

1. **Replica counts.** The counts that minimise the largest load per replica (one redundant
   slot at a time to the largest load per replica, as in DeepSeek's step 2) give the bound
   ``T*``. An expert must have at least ``ceil(load / cap)`` replicas, with
   ``cap = max(T*, count_cap_share * mean rank load) * (1 + count_slack)``; otherwise it keeps
   its current count. If that asks for more slots than there are, replicas are taken back where
   the resulting load per replica stays smallest. So counts only change where the load forces
   them to. The slack (10%) is hysteresis: under slow drift an expert whose load per replica
   hovers at the bound would gain and lose a replica window after window, two or more slots
   each time, for a bound the swaps can mostly absorb with the rank's other slots. Not with two
   slots per rank (``count_slack`` is then 0): there the partner is fixed by the pairing, so a
   replica above the bound is that much more on its rank. Nor where it provably costs balance
   (:func:`_slack_where_harmless`): where hot replicas each fill half a rank, one more of them
   than there are ranks puts two on one rank, which no swap undoes; such a layer takes the
   counts without slack when their packing lower bound (with the pigeonhole: the ``R + 1``
   largest replicas on ``R`` ranks) is lower by more than the layer's tolerance.
2. **Count changes, keeping each expert's copies spread.** An expert losing replicas gives them
   up on the ranks holding most copies of it, then on the most loaded ranks. Freed slots go to
   the experts gaining replicas, heaviest replica first, each to the lightest of the ranks with
   a freed slot that hold fewest copies of that expert. So count changes move an expert's copies
   toward even, and when its load changes in the next window (a new hot expert fading, a
   popular one cooling) every rank changes alike instead of the ranks with few copies carrying
   the layer.
3. **Swap search**, toward a *target* for the layer's most loaded rank:

   - the **reference**: the best a packing of these replicas can reach. A lower bound
     (:func:`packing_lower_bound`: the mean rank load, and what the ranks holding the heaviest
     replicas must carry besides them, since each also holds ``S - 1`` others); for layers of
     at most ``reference_max_slots`` slots also the largest rank load of DeepSeek's greedy
     packing of the same replicas, which is cheap there and shows what coarse layers (few
     slots per rank) can really reach, where the bound cannot be met;
   - plus a **tolerance**, a share of the mean rank load (:func:`swap_tolerance`): the largest
     of ``tolerance``; ``replica_share`` of a mean replica's load (packing is no finer than a
     replica, and with few slots per rank one swap moves a large share of a rank); and the
     sampling noise of a rank's load, ``noise_sigmas / sqrt(tokens per rank)`` (the load is a
     count of routed tokens, so finer differences are noise and buy nothing in the next window),
     at most :data:`MAX_TOLERANCE`.

   In a layer without redundant slots a hot expert cannot be split, so the rank holding it sets
   that target; there every other rank also aims at its own floor (its heaviest expert plus the
   lightest companions, or the mean rank load), so the rest of the layer is levelled as well.
   Not with two slots per rank: there the bound is already the best pairing (largest with
   smallest), and a floor of "heaviest plus the lightest" could be met by one rank only.

   While some rank is above its target, ranks are paired hottest-with-coolest and, per pair
   whose hot rank is above its target, one replica of the hot rank is exchanged with one of the
   cool rank: the exchange moving load closest to half the pair's gap (a nearest-neighbour
   search on sorted replica loads), so one swap evens the pair as much as any single swap can.
   The rank furthest above its target, if no pair exchange touched it, then tries every other
   rank and takes the exchange that leaves the pair's larger load smallest. **A swap is made
   only if it lowers its hot rank by at least** ``min_swap_share`` **of the tolerance**: two
   slots are worth moving for a real gain, not for a difference the noise will undo. A layer
   stops at the target, when no swap is worth making, or after ``max_rounds`` rounds; a layer
   already at its target costs nothing.

4. **A fine pass that spreads the top**, **in the slots a layer has left of**
   ``fine_move_share`` **of its slots** after steps 2 and 3 (one exchange per two of them; none
   where steps 2-3 already moved that many), in layers of at most ``reference_max_slots``
   slots. Step 3 stops once every rank is under its target, which leaves a slowly drifting layer
   with many ranks just under it; after a window of drift the largest rank is the largest of
   those, so such a layer does worse in the next window than a packing with the same largest
   rank and fewer ranks near it. **The room goes first to spreading** the copies of every
   expert with more replicas than ranks (:mod:`.replica_spread`; step 2 puts a hot expert's new
   copies where the shrinking experts freed slots, and when it cools the ranks with few of its
   copies carry the layer): each exchange moves one copy from its fullest rank to its emptiest
   and may take the pair up to half that replica's load above the layer's largest rank. What is
   left goes to exchanges that lower the layer's *soft maximum* of rank loads,
   ``tau * log(sum exp(load / tau))`` with ``tau`` 3% of the mean rank load
   (:func:`soft_max_search`), which counts the ranks near the top: each exchange evens one of
   the 8 most loaded ranks with the other rank that lowers it most, so it spends the room on
   the top ranks first and never raises the largest. Step 3's tolerance keeps a layer hit by a
   change from re-levelling every rank; this pass spends a small, bounded number of slots where
   little else moved. Under 25 slots the default room holds no exchange; from 16 slots on the
   spend controller's cheaper scale opens it
   (:func:`~eplb_service.coordinator.spend_control.room_follows_scale`). In larger layers it runs
   only where the spend controller widened the room (the deployment spends far below its slot
   budget), and only in layers where evening the most loaded rank with the least loaded one
   would lower the soft maximum (a screen that keeps the Qwen3.5 shape's plan within 20 ms).
5. **The packing itself, relabelled**, in layers of at most ``reference_max_slots`` slots
   (where step 3 already computed DeepSeek's greedy packing of these replicas): a packing fixes
   which replicas share a rank, not which rank, so its packs are laid on the ranks that already
   hold most of their replicas and each rank's slots keep what they can
   (:mod:`.pack_matching`; rank loads are the packing's, up to a permutation). A layer takes it
   **where it moves no more slots than the swap searches' result and leaves no rank more loaded**,
   so it never costs a slot or balance. It wins in small layers (8-12 slots), where a hot expert
   changing or gaining a replica reorders the whole layer. It is the packing of the replicas
   step 1 settled on, not of DeepSeek's own counts, which would need a second packing and move
   replicas between experts too.
6. **A price on moves where the imbalance does not last.** The coordinator measures the
   load's *persistence* ``a``: how much of each expert's deviation from its layer's mean
   survives from one window to the next (:mod:`.load_forecast`; pooled over all layers, so two
   windows give a stable number). Where most of the imbalance fades (``a`` below 0.6) the policy
   is given the forecast load (each deviation scaled by ``a``; by
   :func:`~eplb_service.coordinator.load_forecast.planning_persistence`, the load as it is from
   0.6 on, since a shrunk forecast under-provisions the hot experts that do last), and each
   layer keeps its change only where the drop of its most loaded rank under that load pays
   ``move_price * (1 - a) ** 2`` of a mean replica's load per moved slot; the other layers
   keep their rows (a layer whose change step 4's swaps made too dear keeps the change of steps
   2-3 where that alone pays). Where hot experts hop to other experts every window (``a`` about
   0.1-0.3), a change tuned to the last window's hot expert mostly buys nothing in the next one,
   and DeepSeek's policy (which cannot tell) spends slots on it all the same. The square keeps
   the price negligible where most of the imbalance lasts (``a >= 0.8``: at most 4% of
   ``move_price``): layers that gain a lasting new hot expert answer it with many slots, and a
   price there delays the answer. With ``a = 1`` (no history yet, or a load that keeps its
   shape) the step does nothing and the plan is made for the load itself. **Except in layers
   too small for step 4** (under 25 slots, :func:`fine_pass_fits`), where ``(1 - a) ** 2``
   counts as at least :data:`SMALL_LAYER_PRICE_FLOOR` (0.08, its value at ``a = 0.72``): there
   one exchange is 8% of the layer or more, and under slow drift such layers chased every
   window's small drift with exchanges that cost more of DeepSeek's slots than the balance they
   bought. The spend controller (:mod:`.spend_control`) scales ``move_price`` and
   ``fine_move_share`` per deployment from what it spends against DeepSeek's shadow, and while
   its balance lead raises the price (``price_floor``) the square counts as at least the same
   floor in every layer.

Small layers are planned by :mod:`.policy_lookahead` or :mod:`.policy_exact` instead, where those
apply (:func:`~eplb_service.coordinator.policy.propose_phy2log`). With
DeepSeek's groups on several nodes (``--groups G --nodes N``, ``G`` a multiple of ``N``) the steps
run on each node's ranks and experts as a sub-problem of the same shape, every group's replicas
on one node (:mod:`.policy_hierarchy`).

Every swap keeps the per-rank slot counts and the replica counts, and every unchanged slot
keeps its expert, so at most two slots change per swap plus one per count change. The result
is a valid placement (each expert keeps >= 1 replica) by construction.

The defaults were chosen with the workload matrix of ``bench/planner.py --matrix`` (18 shapes from
8 to 512 experts and 2 to 68 slots per rank, 24 workloads each), with the spend controller
carried as the coordinator carries it: a stricter tolerance keeps more coarse cells within 0.5 pp
of DeepSeek's next-window balance but moves more than a fifth of its slots in others, a looser
one the reverse. ``bench/README.md`` has what each step bought there, the cells that still miss
and why (Mixtral's 8-slot layers without redundant slots), and how the policy fares off the
matrix.
"""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.load_forecast import replica_shares
from eplb_service.coordinator.pack_matching import pack_overlap, relabel_packs
from eplb_service.coordinator.policy_deepseek import balanced_packing
from eplb_service.coordinator.replica_spread import spread_search
from eplb_service.placement import HOLDINGS_BLOCK_ENTRIES, logical_replica_count, rank_holdings, rank_loads

DEFAULT_TOLERANCE = 0.003
"""Smallest stopping tolerance, as a share of the mean rank load."""
DEFAULT_REPLICA_SHARE = 0.1
"""Stopping tolerance of at least this share of a mean replica's load."""
DEFAULT_NOISE_SIGMAS = 1.0
"""Rank-load sampling noise (in standard deviations) the tolerance covers."""
MAX_TOLERANCE = 0.05
"""Largest tolerance the noise term can ask for (tiny loads, e.g. shares, are not counts)."""
DEFAULT_MIN_SWAP_SHARE = 0.25
"""A swap must lower its hot rank by at least this share of the tolerance."""
DEFAULT_REFERENCE_MAX_SLOTS = 384
"""Layers with at most this many slots also aim at DeepSeek's greedy packing's level."""
DEFAULT_MAX_ROUNDS = 256
DEFAULT_FINE_MOVE_SHARE = 0.08
"""Step 4 (the fine pass) moves slots while steps 2-4 have moved less than this share of a layer's."""
DEFAULT_SOFT_TAU = 0.03
"""Step 4's temperature: the scale of the soft maximum, as a share of the mean rank load."""
DEFAULT_SOFT_TOP = 8
"""Step 4 tries exchanges of each layer's this many most loaded ranks with every other rank."""
DEFAULT_SOFT_MIN_DROP = 1e-4
"""Step 4 makes an exchange only if it lowers the soft maximum by this share of the mean rank load."""
DEFAULT_COUNT_CAP_SHARE = 0.0
DEFAULT_COUNT_SLACK = 0.1
"""Step 1's hysteresis: a replica may carry this share above the bound before its expert gains one
(layers of more than two slots per rank)."""
DEFAULT_MOVE_PRICE = 0.4
"""Step 6: a moved slot costs this share of a mean replica's load, times ``(1 - persistence) ** 2``."""
SMALL_LAYER_PRICE_FLOOR = 0.08
"""Step 6 in layers too small for step 4 (:func:`fine_pass_fits`): ``(1 - persistence) ** 2`` is
taken as at least this (its value at persistence 0.72)."""


def price_fading(persistence: float, num_physical: int, floor: float = 0.0) -> float:
    """The factor on a moved slot's price for a load this persistent: ``(1 - persistence) ** 2``
    (a move pays for itself only while the imbalance it answers lasts), at least
    :data:`SMALL_LAYER_PRICE_FLOOR` in layers of ``num_physical`` slots too small for step 4 (there
    a lasting drift would otherwise be chased window by window at no price), and at least
    ``floor`` (the spend controller's while the balance leads:
    :attr:`~eplb_service.coordinator.spend_control.SpendOptions.price_floor`). Step 6 and the
    hierarchy's group exchanges both price moves with it."""
    fading = max((1.0 - persistence) ** 2, floor)
    return fading if fine_pass_fits(num_physical) else max(fading, SMALL_LAYER_PRICE_FLOOR)


def fine_pass_fits(num_physical: int, share: float = DEFAULT_FINE_MOVE_SHARE) -> bool:
    """Whether step 4's room, ``share`` of a layer's ``num_physical`` slots, holds one exchange
    (two slots). At the default share: from 25 slots on; in smaller layers (Mixtral's 8-12 slots)
    one exchange is 8% of the layer or more."""
    return int(share * num_physical) >= 2


def optimal_replica_counts(load: np.ndarray, num_physical: int) -> np.ndarray:
    """``[L, N_log]`` replica counts minimising the largest load per replica.

    Greedy: start at one replica each, hand each redundant slot to the expert with the largest
    load per replica. Vectorised over layers.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_logical = load.shape
    rows = np.arange(num_layers)
    counts = np.ones((num_layers, num_logical), dtype=np.int64)
    per_replica = load.copy()
    for _ in range(num_physical - num_logical):
        expert = per_replica.argmax(axis=1)
        counts[rows, expert] += 1
        per_replica[rows, expert] = load[rows, expert] / counts[rows, expert]
    return counts


def _group_positions(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values in a sorted array."""
    if sorted_groups.size == 0:
        return sorted_groups.copy()
    first = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(sorted_groups.size), 0))
    return np.arange(sorted_groups.size) - start


def target_replica_counts(
    load: np.ndarray,
    current_counts: np.ndarray,
    num_physical: int,
    num_ranks: int,
    count_cap_share: float = DEFAULT_COUNT_CAP_SHARE,
    count_slack: float = 0.0,
    slack_tolerance: np.ndarray | None = None,
) -> np.ndarray:
    """``[L, N_log]`` new replica counts: the current ones, changed only where the load forces.

    See step 1 of the module docstring (``count_slack``: the hysteresis share above the bound;
    ``slack_tolerance``: ``[L]`` shares of the mean rank load; given, the slack gives way in a
    layer where it provably costs more balance than that, :func:`_slack_where_harmless`).
    """
    load = np.asarray(load, dtype=np.float64)
    best = optimal_replica_counts(load, num_physical)
    counts = _counts_under_cap(load, current_counts, best, num_physical, num_ranks, count_cap_share, count_slack)
    if count_slack > 0 and slack_tolerance is not None:
        exact = _counts_under_cap(load, current_counts, best, num_physical, num_ranks, count_cap_share, 0.0)
        counts = _slack_where_harmless(counts, exact, load, num_ranks, slack_tolerance)
    return counts


def _counts_under_cap(
    load: np.ndarray,
    current_counts: np.ndarray,
    best: np.ndarray,
    num_physical: int,
    num_ranks: int,
    count_cap_share: float,
    count_slack: float,
) -> np.ndarray:
    """:func:`target_replica_counts` for one slack, ``best`` being :func:`optimal_replica_counts`."""
    bound = (load / best).max(axis=1)
    cap = np.maximum(bound, count_cap_share * load.sum(axis=1) / num_ranks) * (1.0 + count_slack)
    safe_cap = np.where(cap > 0, cap, 1.0)[:, None]
    needed = np.maximum(np.ceil(load / safe_cap - 1e-9).astype(np.int64), 1)
    needed = np.minimum(needed, best)  # guards the rounding above; best always fits
    counts = np.maximum(needed, current_counts)
    excess = counts.sum(axis=1) - num_physical  # >= 0 since counts >= current counts
    if not excess.any():
        return counts
    # Candidate removals (layer, expert, k-th removal); cost = load per replica after it.
    spare = counts - needed
    layer_idx, expert_idx = np.nonzero(spare * (excess > 0)[:, None])
    reps = spare[layer_idx, expert_idx]
    cand_layer = np.repeat(layer_idx, reps)
    cand_expert = np.repeat(expert_idx, reps)
    k = _group_positions(np.repeat(np.arange(layer_idx.size), reps)) + 1
    cost = load[cand_layer, cand_expert] / (counts[cand_layer, cand_expert] - k)
    order = np.lexsort((cost, cand_layer))
    take = _group_positions(cand_layer[order]) < excess[cand_layer[order]]
    np.subtract.at(counts, (cand_layer[order][take], cand_expert[order][take]), 1)
    return counts


def apply_count_changes(
    current: np.ndarray,
    load: np.ndarray,
    current_counts: np.ndarray,
    new_counts: np.ndarray,
    num_ranks: int,
) -> np.ndarray:
    """Step 2: ``[L, P]`` placement with ``new_counts`` replicas, changing as few slots as
    possible (exactly ``sum(max(current - new, 0))`` per layer).

    Layers are independent, so they go in blocks of at most :data:`HOLDINGS_BLOCK_ENTRIES`
    holdings each: in one block, 100 layers of 1024 experts on 2048 ranks (one slot each) built a
    1.6 GB table, and 1000 layers ran out of memory."""
    block = max(1, HOLDINGS_BLOCK_ENTRIES // (num_ranks * load.shape[1]))
    if block >= current.shape[0]:
        return _apply_count_changes(current, load, current_counts, new_counts, num_ranks)
    return np.concatenate(
        [
            _apply_count_changes(
                current[s : s + block],
                load[s : s + block],
                current_counts[s : s + block],
                new_counts[s : s + block],
                num_ranks,
            )
            for s in range(0, current.shape[0], block)
        ]
    )


def _apply_count_changes(
    current: np.ndarray,
    load: np.ndarray,
    current_counts: np.ndarray,
    new_counts: np.ndarray,
    num_ranks: int,
) -> np.ndarray:
    """:func:`apply_count_changes` on one block of layers."""
    num_layers, num_physical = current.shape
    num_logical = load.shape[1]
    slots_per_rank = num_physical // num_ranks
    out = current.copy()
    drop_need = np.maximum(current_counts - new_counts, 0)
    if not drop_need.any():
        return out
    layers = np.arange(num_layers)[:, None]
    slot_rank = np.arange(num_physical) // slots_per_rank
    # An expert losing every replica (the hierarchy's placeholder for another node's experts) counts 0.
    new_slot_load = load[layers, current] / np.maximum(new_counts[layers, current], 1)
    rank_load = new_slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)

    # Which slots give up their expert: from the ranks holding most copies of it (the k-th copy
    # on a rank ranked by the copies the rank holds once k copies before it have gone, so two
    # ranks of 3 give up one each before either gives up a second), then the hottest ranks.
    holdings = rank_holdings(current, num_logical, num_ranks)
    cand_layer, cand_slot = np.nonzero(drop_need[layers, current] > 0)
    cand_expert = current[cand_layer, cand_slot]
    cand_rank = slot_rank[cand_slot]
    cell = (cand_layer * num_logical + cand_expert) * num_ranks + cand_rank
    by_cell = np.lexsort((cand_slot, cell))
    kth_on_rank = np.empty_like(cell)
    kth_on_rank[by_cell] = _group_positions(cell[by_cell])
    held_when_dropped = holdings[cand_layer, cand_rank, cand_expert] - kth_on_rank
    order = np.lexsort(
        (
            -rank_load[cand_layer, cand_rank],
            -held_when_dropped,
            cand_layer * num_logical + cand_expert,
        )
    )
    group = (cand_layer * num_logical + cand_expert)[order]
    drop = _group_positions(group) < drop_need[cand_layer[order], cand_expert[order]]
    free_layer = cand_layer[order][drop]
    free_slot = cand_slot[order][drop]
    holdings[free_layer, slot_rank[free_slot], current[free_layer, free_slot]] -= 1
    np.subtract.at(rank_load, (free_layer, slot_rank[free_slot]), new_slot_load[free_layer, free_slot])

    # Freed slots, per (layer, rank), as a padded table.
    free_cell = free_layer * num_ranks + slot_rank[free_slot]
    by_cell = np.lexsort((free_slot, free_cell))
    free_cell, free_slot_sorted = free_cell[by_cell], free_slot[by_cell]
    free_table = np.full((num_layers * num_ranks, slots_per_rank), -1, dtype=np.int64)
    free_table[free_cell, _group_positions(free_cell)] = free_slot_sorted
    free_left = np.bincount(free_cell, minlength=num_layers * num_ranks).reshape(num_layers, num_ranks)
    free_used = np.zeros((num_layers, num_ranks), dtype=np.int64)

    # Replicas to add, heaviest first within each layer, placed LPT-style.
    add_need = np.maximum(new_counts - current_counts, 0)
    add_layer, add_expert = np.nonzero(add_need)
    reps = add_need[add_layer, add_expert]
    add_layer = np.repeat(add_layer, reps)
    add_expert = np.repeat(add_expert, reps)
    add_load = load[add_layer, add_expert] / new_counts[add_layer, add_expert]
    order = np.lexsort((-add_load, add_layer))
    add_layer, add_expert, add_load = add_layer[order], add_expert[order], add_load[order]
    position = _group_positions(add_layer)
    for k in range(int(position.max()) + 1 if position.size else 0):
        pick = position == k
        lay, exp, wgt = add_layer[pick], add_expert[pick], add_load[pick]
        has_free = free_left[lay] > 0
        # The lightest of the ranks with a freed slot that hold fewest copies of the expert.
        copies = np.where(has_free, holdings[lay, :, exp], np.iinfo(np.int64).max)
        fewest = has_free & (copies == copies.min(axis=1, keepdims=True))
        rank = np.where(fewest, rank_load[lay], np.inf).argmin(axis=1)
        slot = free_table[lay * num_ranks + rank, free_used[lay, rank]]
        out[lay, slot] = exp
        free_used[lay, rank] += 1
        free_left[lay, rank] -= 1
        rank_load[lay, rank] += wgt
        holdings[lay, rank, exp] += 1
    return out


def _best_exchanges(a_val: np.ndarray, b_val: np.ndarray, gap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``n`` rank pairs, the one-for-one exchange that evens each pair the most.

    Args:
        a_val: ``[n, S]`` replica loads of the first (more loaded) rank of each pair.
        b_val: ``[n, S]`` replica loads of the second rank.
        gap: ``[n]`` first rank's load minus the second's (>= 0).

    Returns:
        ``(miss, i, j)``, each ``[n]``: the exchange of ``a_val[i]`` for ``b_val[j]`` moves
        ``delta = a - b`` from the first rank to the second with ``0 < delta < gap``, as close to
        ``gap / 2`` as any exchange; ``miss = |delta - gap / 2|``, ``inf`` where no exchange
        lowers the pair's larger load. The pair's larger load becomes ``mid + miss``.
    """
    n, slots = a_val.shape
    b_order = np.argsort(b_val, axis=1)
    b_sorted = np.take_along_axis(b_val, b_order, axis=1)
    # Nearest b to (a - gap / 2), every pair in one search: each pair's values and queries are
    # shifted by a multiple of the span of all of them, so no pair's range reaches another's.
    # (A fixed span of 4 assumed shares of a layer; the fine pass scales loads to a mean rank
    # of 1, so at EP 64+ one hot replica exceeds it and pairs searched in each other's values.)
    target = a_val - gap[:, None] / 2
    if n and slots:
        low = min(float(b_sorted[:, 0].min()), float(target.min()))
        span = max(float(b_sorted[:, -1].max()), float(target.max())) - low + 1.0
    else:
        low, span = 0.0, 1.0
    offset = (np.arange(n, dtype=np.float64) * span - low)[:, None]
    query = target + offset
    pos = np.searchsorted((b_sorted + offset).ravel(), query.ravel()).reshape(n, slots)
    pos -= (np.arange(n) * slots)[:, None]
    rows = np.arange(n)
    half_gap = gap[:, None] / 2
    best_miss = np.full(n, np.inf)
    best_i = np.zeros(n, dtype=np.int64)
    best_j = np.zeros(n, dtype=np.int64)
    for cand in (pos - 1, pos):
        j = np.clip(cand, 0, slots - 1)
        delta = a_val - np.take_along_axis(b_sorted, j, axis=1)
        valid = (delta > 1e-12) & (delta < gap[:, None] - 1e-12)
        miss = np.where(valid, np.abs(delta - half_gap), np.inf)
        i = miss.argmin(axis=1)
        m = miss[rows, i]
        better = m < best_miss
        best_miss = np.where(better, m, best_miss)
        best_i = np.where(better, i, best_i)
        best_j = np.where(better, j[rows, i], best_j)
    return best_miss, best_i, b_order[rows, best_j]


def packing_lower_bound(slot_load: np.ndarray, num_ranks: int, *, pigeonhole: bool = False) -> np.ndarray:
    """``[L]`` a lower bound on the largest rank load of any placement of these replicas.

    Args:
        slot_load: ``[L, P]`` replica loads (each layer's replicas, in any order).
        num_ranks: EP ranks; every rank holds ``S = P / num_ranks`` replicas.
        pigeonhole: also ``j = num_ranks + 1``, where the ``j`` largest cannot be on distinct
            ranks: ``x_R + x_(R+1) + the S-2 smallest``. Step 1's slack check asks for it; step
            3's targets and the hierarchy's rank floor have not been measured with it.

    The largest of: the mean rank load; and, for every ``j`` in ``1..num_ranks``, with
    ``x_1 >= x_2 >= ...`` the replica loads, the smaller of
    ``(x_1 + .. + x_j + the j(S-1) smallest replicas) / j`` (the ranks of the ``j`` largest
    replicas, if distinct, hold them and ``j(S-1)`` others) and ``x_(j-1) + x_j + the S-2
    smallest`` (two of them share a rank). With few slots per rank this is much tighter than
    ``max(mean, x_1)``: a rank with a hot replica also holds ``S - 1`` others.
    """
    num_layers, num_physical = slot_load.shape
    slots = num_physical // num_ranks
    desc = -np.sort(-slot_load, axis=1)
    zero = np.zeros((num_layers, 1))
    top = np.concatenate([zero, np.cumsum(desc, axis=1)], axis=1)  # top[:, j]: sum of the j largest
    low = np.concatenate([zero, np.cumsum(desc[:, ::-1], axis=1)], axis=1)  # low[:, m]: the m smallest
    j = np.arange(1, num_ranks + 1)
    bound = (top[:, j] + low[:, j * (slots - 1)]) / j
    if slots >= 2 and num_ranks >= 2:
        shared = desc[:, j[1:] - 2] + desc[:, j[1:] - 1] + low[:, [slots - 2]]
        bound[:, 1:] = np.minimum(bound[:, 1:], shared)
    if pigeonhole and slots >= 2:
        crowded = desc[:, num_ranks - 1] + desc[:, num_ranks] + low[:, slots - 2]
        bound = np.concatenate([bound, crowded[:, None]], axis=1)
    return np.maximum(bound.max(axis=1), top[:, -1] / num_ranks)


def swap_tolerance(
    load: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    tolerance: float = DEFAULT_TOLERANCE,
    replica_share: float = DEFAULT_REPLICA_SHARE,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
) -> np.ndarray:
    """``[L]`` the stopping tolerance of each layer, as a share of its mean rank load.

    The largest of ``tolerance``; ``replica_share`` of a mean replica's load (``1 / S`` of a
    rank's): packing is no finer than one replica; and ``noise_sigmas / sqrt(tokens per rank)``,
    at most :data:`MAX_TOLERANCE`: with loads in routed tokens a rank's load is a count whose
    sampling noise is about ``1 / sqrt(count)`` of it, so finer differences are noise, not load.
    """
    rank_tokens = np.asarray(load, dtype=np.float64).sum(axis=1) / num_ranks
    noise = np.minimum(noise_sigmas / np.sqrt(np.maximum(rank_tokens, 1e-300)), MAX_TOLERANCE)
    return np.maximum(np.maximum(tolerance, replica_share / slots_per_rank), noise)


def packed_phy2log(phy2log: np.ndarray, slot_load: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L, P]`` the replicas of ``phy2log`` laid out as DeepSeek's greedy packing of ``slot_load``.

    Rank ``r``'s slots hold the ``r``-th pack of :func:`balanced_packing` (heaviest replica first
    into the lightest pack with room), in the order the packing filled it. The ranks are the
    packer's numbering; :func:`~eplb_service.coordinator.pack_matching.relabel_packs` moves each
    pack to the rank that already holds most of it.
    """
    num_layers, num_physical = phy2log.shape
    packing = balanced_packing(slot_load, num_ranks)
    dest = packing.pack_index * (num_physical // num_ranks) + packing.rank_in_pack
    out = np.empty_like(phy2log)
    out[np.arange(num_layers)[:, None], dest] = phy2log
    return out


def reference_level(slot_load: np.ndarray, num_ranks: int, packed_max: np.ndarray | None = None) -> np.ndarray:
    """``[L]`` the level a packing of these replicas can reach (see step 3 of the module docstring).

    Args:
        slot_load: ``[L, P]`` replica loads; num_ranks: EP ranks.
        packed_max: ``[L]`` the largest rank load of DeepSeek's greedy packing of the same
            replicas, where it was computed (layers of at most ``reference_max_slots`` slots).
    """
    level = packing_lower_bound(slot_load, num_ranks)
    return level if packed_max is None else np.maximum(level, packed_max)


def _uses_packing(num_physical: int, num_ranks: int, reference_max_slots: int) -> bool:
    """Whether layers of this shape also compute DeepSeek's greedy packing (few slots, > 1 per rank)."""
    return num_ranks < num_physical <= reference_max_slots


def _normalised_slot_load(phy2log: np.ndarray, load: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[L, P]`` each slot's share of its layer's load (a layer's slots sum to 1; 0 if idle)."""
    return replica_shares(load, counts)[np.arange(load.shape[0])[:, None], phy2log]


def swap_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    replica_share: float = DEFAULT_REPLICA_SHARE,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
    min_swap_share: float = DEFAULT_MIN_SWAP_SHARE,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    packed_max: np.ndarray | None = None,
) -> np.ndarray:
    """Step 3: one-for-one replica exchanges that lower the ranks above their targets (a new array).

    Args:
        phy2log: ``[L, P]`` starting placement whose replica counts are ``counts``.
        load: ``[L, N_log]`` load per logical expert, in routed tokens.
        counts: ``[L, N_log]`` replicas per expert in ``phy2log``.
        num_ranks: EP ranks.
        tolerance, replica_share, noise_sigmas: the stopping tolerance (see :func:`swap_tolerance`).
        min_swap_share: a swap must lower its hot rank by this share of the tolerance.
        max_rounds: upper bound on rounds.
        packed_max: see :func:`reference_level` (as a share of each layer's load).
    """
    out = phy2log.copy()
    num_layers, num_physical = out.shape
    slots_per_rank = num_physical // num_ranks
    half = num_ranks // 2
    if half == 0 or slots_per_rank == 0:
        return out
    # Loads normalised per layer (total 1) so one search can stack every layer's values.
    totals = load.sum(axis=1)
    slot_load = _normalised_slot_load(out, load, counts)  # [L, P]
    rank_load = slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)
    step = swap_tolerance(load, num_ranks, slots_per_rank, tolerance, replica_share, noise_sigmas) / num_ranks
    target = reference_level(slot_load, num_ranks, packed_max) + step
    gate = np.maximum(min_swap_share * step, 1e-12)
    local = np.arange(slots_per_rank)
    # Without redundant slots a hot expert cannot be split: every rank also aims at its own floor.
    companions = np.sort(slot_load, axis=1)[:, : slots_per_rank - 1].sum(axis=1)
    unsplit = (counts.max(axis=1) <= 1) & (slots_per_rank > 2)

    def limits_of(lay: np.ndarray) -> np.ndarray:
        """``[len(lay), R]`` the load each rank of these layers must get under."""
        limits = np.repeat(target[lay][:, None], num_ranks, axis=1)
        own = unsplit[lay]
        if own.any():
            heaviest = slot_load[lay[own]].reshape(own.sum(), num_ranks, slots_per_rank).max(axis=2)
            floor = np.maximum(1.0 / num_ranks, heaviest + companions[lay[own]][:, None]) + step[lay[own]][:, None]
            limits[own] = np.minimum(floor, limits[own])
        return limits

    def exchange(lay: np.ndarray, rank_a: np.ndarray, rank_b: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
        slot_a = rank_a * slots_per_rank + i
        slot_b = rank_b * slots_per_rank + j
        val_a, val_b = slot_load[lay, slot_a], slot_load[lay, slot_b]
        out[lay, slot_a], out[lay, slot_b] = out[lay, slot_b], out[lay, slot_a]
        slot_load[lay, slot_a], slot_load[lay, slot_b] = val_b, val_a
        rank_load[lay, rank_a] -= val_a - val_b
        rank_load[lay, rank_b] += val_a - val_b

    all_layers = np.arange(num_layers)
    active = all_layers[(totals > 0) & (rank_load > limits_of(all_layers)).any(axis=1)]
    for _ in range(max_rounds):
        if active.size == 0:
            break
        rows = np.arange(active.size)
        swapped = np.zeros((active.size, num_ranks), dtype=bool)
        # Pairs: the k-th hottest rank with the k-th coolest, for every hot rank above its limit.
        loads = rank_load[active]
        limits = limits_of(active)
        by_load = np.argsort(loads, axis=1, kind="stable")
        hot, cool = by_load[:, ::-1][:, :half], by_load[:, :half]
        row, k = np.nonzero(loads[rows[:, None], hot] > limits[rows[:, None], hot])
        lay = active[row]
        rank_a, rank_b = hot[row, k], cool[row, k]
        gap = rank_load[lay, rank_a] - rank_load[lay, rank_b]
        miss, i, j = _best_exchanges(
            slot_load[lay[:, None], rank_a[:, None] * slots_per_rank + local],
            slot_load[lay[:, None], rank_b[:, None] * slots_per_rank + local],
            gap,
        )
        ok = gap / 2 - miss >= gate[lay]  # the hot rank drops by gap/2 - miss (inf miss: no exchange)
        exchange(lay[ok], rank_a[ok], rank_b[ok], i[ok], j[ok])
        swapped[row[ok], rank_a[ok]] = swapped[row[ok], rank_b[ok]] = True
        # The rank furthest above its limit now, if no pair exchange touched it, tries every other rank.
        excess = rank_load[active] - limits_of(active)
        hottest = excess.argmax(axis=1)
        idx = np.flatnonzero(~swapped[rows, hottest] & (excess[rows, hottest] > 0))
        if idx.size:
            lay_b, hottest = active[idx], hottest[idx]
            others = np.argsort(np.arange(num_ranks)[None, :] == hottest[:, None], axis=1, kind="stable")[:, :-1]
            lay = np.repeat(lay_b, num_ranks - 1)
            rank_a = np.repeat(hottest, num_ranks - 1)
            rank_b = others.ravel()
            load_a, load_b = rank_load[lay, rank_a], rank_load[lay, rank_b]
            miss, i, j = _best_exchanges(
                slot_load[lay[:, None], rank_a[:, None] * slots_per_rank + local],
                slot_load[lay[:, None], rank_b[:, None] * slots_per_rank + local],
                np.maximum(load_a - load_b, 0.0),
            )
            pair_max = ((load_a + load_b) / 2 + miss).reshape(idx.size, num_ranks - 1)
            pick = pair_max.argmin(axis=1)
            ok = pair_max[np.arange(idx.size), pick] <= rank_load[lay_b, hottest] - gate[lay_b]
            sel = (np.arange(idx.size) * (num_ranks - 1) + pick)[ok]
            exchange(lay[sel], rank_a[sel], rank_b[sel], i[sel], j[sel])
            swapped[idx[ok], hottest[ok]] = True
        done = ~swapped.any(axis=1) | ~(rank_load[active] > limits_of(active)).any(axis=1)
        active = active[~done]
    return out


def soft_maximum(rank_load: np.ndarray, tau: float) -> np.ndarray:
    """``[L]`` ``tau * log(sum_r exp(rank_load / tau))`` of ``rank_load [L, R]``, computed stably.

    At least the largest rank load and at most ``tau * log(R)`` above it; the more ranks sit
    within a few ``tau`` of the largest, the higher it is.
    """
    peak = rank_load.max(axis=1)
    return peak + tau * np.log(np.exp((rank_load - peak[:, None]) / tau).sum(axis=1))


def _soft_max_drop(
    load_a: np.ndarray,
    load_b: np.ndarray,
    shift: np.ndarray,
    peak: np.ndarray,
    weight_a: np.ndarray,
    weight_b: np.ndarray,
    total: np.ndarray,
    tau: float,
) -> np.ndarray:
    """How much moving ``shift`` from rank a to rank b lowers the layer's soft maximum.

    ``weight_*`` are ``exp((load - peak) / tau)`` of the two ranks and ``total`` their sum over
    the layer's ranks, so only the two changed terms are recomputed."""
    change = np.exp((load_a - shift - peak) / tau) + np.exp((load_b + shift - peak) / tau) - weight_a - weight_b
    return -tau * np.log(np.maximum(1.0 + change / total, 1e-300))


def soft_max_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    *,
    room: np.ndarray,
    tau: float = DEFAULT_SOFT_TAU,
    top: int = DEFAULT_SOFT_TOP,
    min_drop: float = DEFAULT_SOFT_MIN_DROP,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    screen: bool = False,
) -> np.ndarray:
    """Step 4: one-for-one exchanges that lower each layer's soft maximum of rank loads (a new array).

    Loads are in units of the layer's mean rank load. Each round, in every layer with room, each
    of its ``top`` most loaded ranks is paired with every other less loaded rank, each pair takes
    the exchange that evens it the most (:func:`_best_exchanges`; for two ranks of fixed total,
    the most even split is the one with the smallest soft maximum), and the layer makes the one
    exchange that lowers :func:`soft_maximum` the most, if by at least ``min_drop``. No exchange
    raises a rank above the more loaded rank of its pair, so the largest rank load never rises.

    Args:
        phy2log, load, counts, num_ranks: as :func:`swap_search`.
        room: ``[L]`` slots each layer may still change (two per exchange).
        tau: the soft maximum's temperature; top: ranks tried per layer and round;
        min_drop: smallest drop of the soft maximum worth an exchange; max_rounds: upper bound.
        screen: first drop the layers where evening the most loaded rank with the least loaded
            one would not lower the soft maximum by ``min_drop`` (a round over every pair of a
            large layer costs more than the rest of the plan; those layers mostly gain nothing).
    """
    out = phy2log.copy()
    num_layers, num_physical = out.shape
    slots_per_rank = num_physical // num_ranks
    if num_ranks < 2 or slots_per_rank == 0:
        return out
    slot_load = _normalised_slot_load(out, load, counts) * num_ranks  # mean rank load = 1
    rank_load = slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)
    room = np.asarray(room, dtype=np.float64).copy()
    local = np.arange(slots_per_rank)
    hot_count = min(top, num_ranks)
    pairs = hot_count * num_ranks
    active = np.flatnonzero((room >= 2) & (load.sum(axis=1) > 0))
    if screen and active.size:
        order = np.argsort(-rank_load[active], axis=1, kind="stable")
        hot, cold = order[:, 0], order[:, -1]
        gap = rank_load[active, hot] - rank_load[active, cold]
        miss, _, _ = _best_exchanges(
            slot_load[active[:, None], hot[:, None] * slots_per_rank + local],
            slot_load[active[:, None], cold[:, None] * slots_per_rank + local],
            np.maximum(gap, 0.0),
        )
        loads = rank_load[active]
        peak = loads.max(axis=1)
        weight = np.exp((loads - peak[:, None]) / tau)
        rows = np.arange(active.size)
        shift = np.where((gap > 0) & np.isfinite(miss), gap / 2 - miss, 0.0)
        drop = _soft_max_drop(
            loads[rows, hot],
            loads[rows, cold],
            shift,
            peak,
            weight[rows, hot],
            weight[rows, cold],
            weight.sum(axis=1),
            tau,
        )
        active = active[drop >= min_drop]
    for _ in range(max_rounds):
        if active.size == 0:
            break
        loads = rank_load[active]
        peak = loads.max(axis=1)
        weight = np.exp((loads - peak[:, None]) / tau)  # in (0, 1]: no overflow
        row = np.repeat(np.arange(active.size), pairs)
        lay = active[row]
        rank_a = np.repeat(np.argsort(-loads, axis=1, kind="stable")[:, :hot_count].ravel(), num_ranks)
        rank_b = np.tile(np.arange(num_ranks), active.size * hot_count)
        gap = rank_load[lay, rank_a] - rank_load[lay, rank_b]
        # Only pairs whose second rank is less loaded can gain (about half of them): search those.
        miss = np.full(gap.shape, np.inf)
        i = np.zeros(gap.shape, dtype=np.int64)
        j = np.zeros(gap.shape, dtype=np.int64)
        down = np.flatnonzero(gap > 0)
        miss[down], i[down], j[down] = _best_exchanges(
            slot_load[lay[down, None], rank_a[down, None] * slots_per_rank + local],
            slot_load[lay[down, None], rank_b[down, None] * slots_per_rank + local],
            gap[down],
        )
        valid = (gap > 0) & np.isfinite(miss)
        shift = np.where(valid, gap / 2 - miss, 0.0)  # load moved from rank a to rank b, < gap
        drop = _soft_max_drop(
            rank_load[lay, rank_a],
            rank_load[lay, rank_b],
            shift,
            peak[row],
            weight[row, rank_a],
            weight[row, rank_b],
            weight.sum(axis=1)[row],
            tau,
        )
        drop = np.where(valid, drop, -np.inf)
        pick = np.arange(active.size) * pairs + drop.reshape(active.size, pairs).argmax(axis=1)
        pick = pick[drop[pick] >= min_drop]
        lay, a, b = lay[pick], rank_a[pick], rank_b[pick]
        slot_a = a * slots_per_rank + i[pick]
        slot_b = b * slots_per_rank + j[pick]
        val_a, val_b = slot_load[lay, slot_a], slot_load[lay, slot_b]
        out[lay, slot_a], out[lay, slot_b] = out[lay, slot_b], out[lay, slot_a]
        slot_load[lay, slot_a], slot_load[lay, slot_b] = val_b, val_a
        rank_load[lay, a] -= val_a - val_b
        rank_load[lay, b] += val_a - val_b
        room[lay] -= 2
        active = lay[room[lay] >= 2]
    return out


def migration_phy2log(
    current_phy2log: np.ndarray,
    logical_load: np.ndarray,
    num_ranks: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    replica_share: float = DEFAULT_REPLICA_SHARE,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
    min_swap_share: float = DEFAULT_MIN_SWAP_SHARE,
    reference_max_slots: int = DEFAULT_REFERENCE_MAX_SLOTS,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    count_cap_share: float = DEFAULT_COUNT_CAP_SHARE,
    count_slack: float = DEFAULT_COUNT_SLACK,
    repack: bool = True,
    spread: bool = True,
    fine_move_share: float = DEFAULT_FINE_MOVE_SHARE,
    soft_tau: float = DEFAULT_SOFT_TAU,
    persistence: float = 1.0,
    move_price: float = DEFAULT_MOVE_PRICE,
    price_floor: float = 0.0,
) -> np.ndarray:
    """The migration-aware placement for ``logical_load``, starting from ``current_phy2log``.

    Args:
        current_phy2log: ``[L, P]`` valid current placement.
        logical_load: ``[L, N_log]`` load per logical expert, in routed tokens (>= 0, finite).
        num_ranks: EP ranks (divides ``P``).
        tolerance, replica_share, noise_sigmas, min_swap_share, max_rounds: see :func:`swap_search`.
        reference_max_slots: layers of at most this many slots also compute DeepSeek's greedy
            packing of their replicas (step 3's reference, step 5's candidate).
        count_cap_share, count_slack: see :func:`target_replica_counts`; ``count_slack`` applies
            only with more than two slots per rank.
        repack: take the relabelled greedy packing where it is no dearer and no less balanced
            (step 5 of the module docstring); ``False`` keeps the swap searches' result.
        spread: step 4 first evens the copies of experts with more replicas than ranks
            (:mod:`.replica_spread`); ``False`` leaves all of step 4's room to the soft maximum.
        fine_move_share, soft_tau: step 4 (the fine pass): the share of a layer's slots steps
            2-4 may move in all (``0`` skips the pass), and the soft maximum's temperature (see
            :func:`soft_max_search`).
        persistence, move_price: step 6: ``persistence`` in ``[0, 1]`` is how much of the
            load's imbalance lasts from one window to the next
            (:func:`~eplb_service.coordinator.load_forecast.persistence`; 1: all of it, which
            skips the step); a layer's change is kept only where its gain pays
            ``move_price * (1 - persistence) ** 2`` mean replica loads per moved slot;
            ``price_floor``: the least ``(1 - persistence) ** 2`` counts as (:func:`price_fading`).

    Returns:
        ``phy2log [L, P]`` int64; see the module docstring for the algorithm.
    """
    current = np.asarray(current_phy2log, dtype=np.int64)
    load = np.asarray(logical_load, dtype=np.float64)
    num_layers, num_physical = current.shape
    current_counts = logical_replica_count(current, load.shape[1])
    slack = count_slack if num_physical > 2 * num_ranks else 0.0
    new_counts = target_replica_counts(
        load,
        current_counts,
        num_physical,
        num_ranks,
        count_cap_share,
        slack,
        slack_tolerance=swap_tolerance(
            load, num_ranks, num_physical // num_ranks, tolerance, replica_share, noise_sigmas
        ),
    )
    placed = apply_count_changes(current, load, current_counts, new_counts, num_ranks)
    packed = packed_max = None
    if _uses_packing(num_physical, num_ranks, reference_max_slots):
        slot_load = _normalised_slot_load(placed, load, new_counts)
        packed = packed_phy2log(placed, slot_load, num_ranks)
        packed_load = _normalised_slot_load(packed, load, new_counts)
        packed_max = packed_load.reshape(num_layers, num_ranks, -1).sum(axis=2).max(axis=1)
    swapped = swap_search(
        placed,
        load,
        new_counts,
        num_ranks,
        tolerance=tolerance,
        replica_share=replica_share,
        noise_sigmas=noise_sigmas,
        min_swap_share=min_swap_share,
        max_rounds=max_rounds,
        packed_max=packed_max,
    )
    # Step 4: in the slots each layer has left of its fine_move_share (none where the steps
    # above already moved that many), spread the experts with more replicas than ranks, then
    # lower the soft maximum of rank loads; only in layers of at most reference_max_slots slots
    # (as step 3's reference and step 5), or where the spend controller widened the room.
    room = np.floor(fine_move_share * num_physical) - (swapped != current).sum(axis=1)
    wide = packed_max is None and fine_move_share > DEFAULT_FINE_MOVE_SHARE
    fine = bool((packed_max is not None or wide) and (room >= 2).any())
    before_fine = swapped  # steps 2-3's result: the fine pass works on copies
    if fine:
        room = np.maximum(room, 0)
        if spread:
            swapped, room = spread_search(swapped, load, new_counts, num_ranks, room=room, max_rounds=max_rounds)
        swapped = soft_max_search(
            swapped,
            load,
            new_counts,
            num_ranks,
            room=room,
            tau=soft_tau,
            max_rounds=max_rounds,
            screen=wide,
        )
    if packed is not None and repack:
        swapped = _relabelled_where_no_dearer(current, swapped, packed, load, num_ranks)
    slot_price = move_price * price_fading(persistence, num_physical, price_floor)
    priced = priced_layers(current, swapped, load, num_ranks, slot_price)
    if not fine:
        return priced
    # Step 6 prices a layer's change whole: where the fine pass's swaps made it too dear, the
    # change of steps 2-3 alone (with step 5 as it would have been) may still pay (a layer of 21
    # slots kept its row at 3.87 where steps 2-3 had reached 3.73). Only those layers are redone.
    lost = np.flatnonzero((priced == current).all(axis=1) & (swapped != current).any(axis=1))
    if lost.size:
        fallback = before_fine[lost]
        if packed is not None and repack:
            fallback = _relabelled_where_no_dearer(current[lost], fallback, packed[lost], load[lost], num_ranks)
        priced = priced.copy()
        priced[lost] = priced_layers(current[lost], fallback, load[lost], num_ranks, slot_price)
    return priced


def replica_loads(load: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[L, P]`` every replica's share of its layer's load under ``counts`` (rows sum to 1), in
    expert order: what a packing of these counts has to place."""
    per_replica = replica_shares(load, counts)
    return np.repeat(per_replica.ravel(), counts.ravel()).reshape(load.shape[0], -1)


def _slack_where_harmless(
    slack_counts: np.ndarray, exact_counts: np.ndarray, load: np.ndarray, num_ranks: int, tolerance: np.ndarray
) -> np.ndarray:
    """Step 1's counts with the slack only in layers where it costs no provable balance.

    The slack reasons per replica (one a tenth above the bound is absorbed by the rank's other
    slots), but packing is per rank: where hot replicas each fill half a rank or more, one more
    of them than there are ranks puts two on one rank, and no swap undoes that. Such a layer
    takes the counts without slack when their packing lower bound is lower by more than its
    tolerance (both as shares of the mean rank load)."""
    differs = np.flatnonzero((slack_counts != exact_counts).any(axis=1))
    if differs.size == 0:
        return slack_counts
    mean_rank = 1.0 / num_ranks
    with_slack = packing_lower_bound(replica_loads(load[differs], slack_counts[differs]), num_ranks, pigeonhole=True)
    without = packing_lower_bound(replica_loads(load[differs], exact_counts[differs]), num_ranks, pigeonhole=True)
    costly = differs[with_slack - without > tolerance[differs] * mean_rank]
    out = slack_counts.copy()
    out[costly] = exact_counts[costly]
    return out


def _relabelled_where_no_dearer(
    current: np.ndarray, swapped: np.ndarray, packed: np.ndarray, load: np.ndarray, num_ranks: int
) -> np.ndarray:
    """Step 5: ``swapped`` with the greedy packing, each pack on the rank holding most of it, in
    the layers where that moves no more slots than the swaps and leaves no rank more loaded.

    Only layers that can win are relabelled: no more loaded, and each pack keeping at most its
    best overlap. ``swapped`` is updated in place and returned.
    """
    num_physical = current.shape[1]
    swapped_moves = (swapped != current).sum(axis=1)
    slack = 1e-12 * load.sum(axis=1)
    flatter = (
        rank_loads(packed, load, num_ranks).max(axis=1) <= rank_loads(swapped, load, num_ranks).max(axis=1) + slack
    )
    layers = np.flatnonzero(flatter)
    overlap = pack_overlap(packed[layers], current[layers], num_ranks)
    can_win = num_physical - overlap.max(axis=2).sum(axis=1) <= swapped_moves[layers]
    layers, overlap = layers[can_win], overlap[can_win]
    if layers.size == 0:
        return swapped
    relabelled = relabel_packs(packed[layers], current[layers], num_ranks, overlap)
    take = (relabelled != current[layers]).sum(axis=1) <= swapped_moves[layers]
    swapped[layers[take]] = relabelled[take]
    return swapped


def priced_layers(
    current: np.ndarray, proposed: np.ndarray, load: np.ndarray, num_ranks: int, slot_price: float
) -> np.ndarray:
    """Step 6: ``proposed`` with the layers whose gain does not pay for their moved slots reset.

    A layer's gain is how far its most loaded rank drops under ``load``; its cost is
    ``slot_price`` mean replica loads (a layer's load / its slots) per slot it changes.
    ``slot_price <= 0`` keeps every layer.
    """
    if slot_price <= 0:
        return proposed
    moved = (proposed != current).sum(axis=1)
    gain = rank_loads(current, load, num_ranks).max(axis=1) - rank_loads(proposed, load, num_ranks).max(axis=1)
    mean_replica = load.sum(axis=1) / current.shape[1]
    unpaid = (moved > 0) & (gain < slot_price * mean_replica * moved)
    if not unpaid.any():
        return proposed
    out = proposed.copy()
    out[unpaid] = current[unpaid]
    return out
