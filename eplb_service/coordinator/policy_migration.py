"""Migration-aware placement: reach (near) the best balance from where experts already are.

DeepSeek's policy rebuilds every layer from scratch, so after a rebalance nearly every slot
holds a different expert, and nearly every expert's bytes cross ranks. This policy starts from
the current placement and changes only what the new load needs. Per layer (all layers advance
together, vectorised):

1. **Replica counts.** The counts that minimise the largest load per replica (one redundant
   slot at a time to the largest load per replica, as in DeepSeek's step 2) give the bound
   ``T*``. An expert must have at least ``ceil(load / cap)`` replicas, with
   ``cap = max(T*, count_cap_share * mean rank load)``; otherwise it keeps its current count.
   If that asks for more slots than there are, replicas are taken back where the resulting
   load per replica stays smallest. So counts only change where the load forces them to.
2. **Count changes.** An expert losing replicas gives up its replicas on the most loaded ranks
   (a second copy on the same rank first: it adds nothing to balance). Freed slots go to the
   experts gaining replicas, heaviest replica first, each to the lightest rank that still has a
   freed slot and, where possible, does not already hold that expert.
3. **Swap search.** While a layer's most loaded rank is above the target (the lower bound
   ``max(mean rank load, largest replica load)`` plus ``tolerance`` times the mean replica
   load: packing cannot be finer than about one replica, and a rank left a fraction of a
   replica above the bound is not worth two more copies), ranks are paired
   hottest-with-coolest and, per pair, one replica of the hot rank is exchanged with one of the
   cool rank. The exchange moving load closest to half the pair's gap is picked (a nearest
   neighbour search on sorted replica loads), so one swap evens the pair as much as any single
   swap can. Only pairs whose hot rank is above target swap, so a balanced layer costs nothing.
   A layer stops at the target, when its hottest rank has no improving swap, or after
   ``max_rounds`` rounds.

Every swap keeps the per-rank slot counts and the replica counts, and every unchanged slot
keeps its expert, so at most two slots change per swap plus one per count change. The result
is a valid placement (each expert keeps >= 1 replica) by construction.

Defaults (``tolerance=0.2``, ``max_rounds=48``, ``count_cap_share=0``) were picked with
``bench/planner.py``: on its drifting loads they keep balancedness within 0.15 pp of DeepSeek's
at 5-14% of its bytes; a larger ``count_cap_share`` saves a few more bytes but gives hot experts
fewer replicas, which cost 0.5-2 pp of balancedness in the next load window.
"""

from __future__ import annotations

import numpy as np

from eplb_service.placement import logical_replica_count, rank_holdings

DEFAULT_TOLERANCE = 0.2
DEFAULT_MAX_ROUNDS = 48
DEFAULT_COUNT_CAP_SHARE = 0.0


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
) -> np.ndarray:
    """``[L, N_log]`` new replica counts: the current ones, changed only where the load forces.

    See step 1 of the module docstring.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_logical = load.shape
    best = optimal_replica_counts(load, num_physical)
    bound = (load / best).max(axis=1)
    cap = np.maximum(bound, count_cap_share * load.sum(axis=1) / num_ranks)
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
    possible (exactly ``sum(max(current - new, 0))`` per layer)."""
    num_layers, num_physical = current.shape
    num_logical = load.shape[1]
    slots_per_rank = num_physical // num_ranks
    out = current.copy()
    drop_need = np.maximum(current_counts - new_counts, 0)
    if not drop_need.any():
        return out
    layers = np.arange(num_layers)[:, None]
    slot_rank = np.arange(num_physical) // slots_per_rank
    new_slot_load = load[layers, current] / new_counts[layers, current]
    rank_load = new_slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)

    # Which slots give up their expert: duplicates on a rank first, then the hottest ranks.
    holdings = rank_holdings(current, num_logical, num_ranks)
    duplicate = holdings[layers, slot_rank[None, :], current] > 1
    cand_layer, cand_slot = np.nonzero(drop_need[layers, current] > 0)
    cand_expert = current[cand_layer, cand_slot]
    order = np.lexsort((
        -rank_load[cand_layer, slot_rank[cand_slot]],
        ~duplicate[cand_layer, cand_slot],
        cand_layer * num_logical + cand_expert,
    ))
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
        cost = np.where(free_left[lay] > 0, rank_load[lay], np.inf)
        # Prefer a rank that does not hold the expert yet (a second copy there is useless).
        already = holdings[lay, :, exp] > 0
        preferred = np.where(already, np.inf, cost)
        usable = np.isfinite(preferred).any(axis=1)
        rank = np.where(usable, preferred.argmin(axis=1), cost.argmin(axis=1))
        slot = free_table[lay * num_ranks + rank, free_used[lay, rank]]
        out[lay, slot] = exp
        free_used[lay, rank] += 1
        free_left[lay, rank] -= 1
        rank_load[lay, rank] += wgt
        holdings[lay, rank, exp] += 1
    return out


def swap_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> np.ndarray:
    """Step 3: pairwise replica exchanges between hot and cool ranks, in place on a copy.

    Args:
        phy2log: ``[L, P]`` starting placement whose replica counts are ``counts``.
        load: ``[L, N_log]`` load per logical expert.
        counts: ``[L, N_log]`` replicas per expert in ``phy2log``.
        num_ranks: EP ranks.
        tolerance: stop a layer once its hottest rank is within ``tolerance`` times the mean
            replica load (layer load / P) of the lower bound ``max(mean rank load, largest
            replica load)``.
        max_rounds: upper bound on rounds (each round: one swap per hot/cool pair).
    """
    out = phy2log.copy()
    num_layers, num_physical = out.shape
    slots_per_rank = num_physical // num_ranks
    half = num_ranks // 2
    if half == 0 or slots_per_rank == 0:
        return out
    # Loads normalised per layer (total 1) so one search can stack every layer's values.
    totals = load.sum(axis=1, keepdims=True)
    norm = load / np.where(totals > 0, totals, 1.0)
    layers_all = np.arange(num_layers)[:, None]
    slot_load = (norm / np.maximum(counts, 1))[layers_all, out]  # [L, P]
    rank_load = slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(axis=2)
    bound = np.maximum(rank_load.mean(axis=1), slot_load.max(axis=1))
    # Packing granularity is one replica: the tolerance is a share of the mean replica load.
    target = bound + tolerance * norm.sum(axis=1) / num_physical
    active = np.flatnonzero((totals[:, 0] > 0) & (rank_load.max(axis=1) > target))
    local = np.arange(slots_per_rank)
    span = 4.0  # normalised values lie in [-1, 1]; offsets of 4 keep the stacked rows apart
    for _ in range(max_rounds):
        if active.size == 0:
            break
        n_act = active.size
        loads = rank_load[active]  # [a, R]
        by_load = np.argsort(loads, axis=1, kind="stable")
        hot = by_load[:, ::-1][:, :half]  # [a, H], hottest first
        cool = by_load[:, :half]  # [a, H], coolest first
        rows = np.arange(n_act)[:, None]
        hot_load = loads[rows, hot]
        gap = hot_load - loads[rows, cool]  # [a, H]
        wants = hot_load > target[active][:, None]
        hot_slots = hot[:, :, None] * slots_per_rank + local  # [a, H, S]
        cool_slots = cool[:, :, None] * slots_per_rank + local
        lay3 = active[:, None, None]
        a_val = slot_load[lay3, hot_slots]
        b_val = slot_load[lay3, cool_slots]
        b_order = np.argsort(b_val, axis=2)
        b_sorted = np.take_along_axis(b_val, b_order, axis=2)
        # Nearest cool replica to (hot replica - gap / 2), all pairs stacked in one search.
        offset = (np.arange(n_act * half, dtype=np.float64) * span).reshape(n_act, half, 1)
        query = a_val - gap[:, :, None] / 2 + offset
        pos = np.searchsorted((b_sorted + offset).ravel(), query.ravel()).reshape(query.shape)
        pos -= (np.arange(n_act * half) * slots_per_rank).reshape(n_act, half, 1)
        best_score = np.full(gap.shape, np.inf)
        best_i = np.zeros(gap.shape, dtype=np.int64)
        best_j = np.zeros(gap.shape, dtype=np.int64)
        for cand in (pos - 1, pos):
            j = np.clip(cand, 0, slots_per_rank - 1)
            delta = a_val - np.take_along_axis(b_sorted, j, axis=2)
            valid = (delta > 1e-12) & (delta < gap[:, :, None] - 1e-12)
            score = np.where(valid, np.abs(delta - gap[:, :, None] / 2), np.inf)
            i = score.argmin(axis=2)
            s = np.take_along_axis(score, i[:, :, None], axis=2)[:, :, 0]
            better = s < best_score
            best_score = np.where(better, s, best_score)
            best_i = np.where(better, i, best_i)
            best_j = np.where(better, np.take_along_axis(j, i[:, :, None], axis=2)[:, :, 0], best_j)
        ok = wants & np.isfinite(best_score)
        # A layer whose hottest rank cannot improve stops (the rest would not lower its max).
        stuck = ~ok[:, 0]
        if ok.any():
            r_idx, p_idx = np.nonzero(ok)
            lay = active[r_idx]
            slot_a = hot[r_idx, p_idx] * slots_per_rank + best_i[r_idx, p_idx]
            slot_b = cool[r_idx, p_idx] * slots_per_rank + b_order[r_idx, p_idx, best_j[r_idx, p_idx]]
            val_a = slot_load[lay, slot_a]
            val_b = slot_load[lay, slot_b]
            exp_a = out[lay, slot_a]
            out[lay, slot_a] = out[lay, slot_b]
            out[lay, slot_b] = exp_a
            slot_load[lay, slot_a] = val_b
            slot_load[lay, slot_b] = val_a
            rank_load[lay, hot[r_idx, p_idx]] -= val_a - val_b
            rank_load[lay, cool[r_idx, p_idx]] += val_a - val_b
        done = stuck | (rank_load[active].max(axis=1) <= target[active])
        active = active[~done]
    return out


def migration_phy2log(
    current_phy2log: np.ndarray,
    logical_load: np.ndarray,
    num_ranks: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    count_cap_share: float = DEFAULT_COUNT_CAP_SHARE,
) -> np.ndarray:
    """The migration-aware placement for ``logical_load``, starting from ``current_phy2log``.

    Args:
        current_phy2log: ``[L, P]`` valid current placement.
        logical_load: ``[L, N_log]`` load per logical expert (>= 0, finite).
        num_ranks: EP ranks (divides ``P``).
        tolerance, max_rounds: see :func:`swap_search`.
        count_cap_share: see :func:`target_replica_counts`.

    Returns:
        ``phy2log [L, P]`` int64; see the module docstring for the algorithm.
    """
    current = np.asarray(current_phy2log, dtype=np.int64)
    load = np.asarray(logical_load, dtype=np.float64)
    num_physical = current.shape[1]
    current_counts = logical_replica_count(current, load.shape[1])
    new_counts = target_replica_counts(load, current_counts, num_physical, num_ranks, count_cap_share)
    placed = apply_count_changes(current, load, current_counts, new_counts, num_ranks)
    return swap_search(placed, load, new_counts, num_ranks, tolerance=tolerance, max_rounds=max_rounds)
