"""Put a fresh packing's packs on the ranks that already hold most of their replicas.

A packing (DeepSeek's, or any) fixes which replicas share a rank, not which rank: its packs can
be laid on the ranks in any order without changing a single rank load. Laid in the order the
packer happened to number them, nearly every slot changes expert; laid where each pack's
replicas already are, most of a slowly changing layout stays put. Choosing that order is an
assignment problem per layer, solved here with numpy only:

1. **Overlap** (:func:`pack_overlap`): ``[L, R, R]``, how many replicas of pack ``p`` rank ``r``
   already holds (a multiset intersection: two copies of an expert in the pack and one on the
   rank count once).
2. **Assignment** (:func:`match_packs`): rounds of mutually best pairs (a pack and a rank that
   are each other's heaviest remaining overlap; ties to the lower index), then any pack left
   over to any rank left over (no overlap remains between them). This greedy matching keeps at
   least half of what the best assignment keeps; on DeepSeek packings of a load drifted by 10%
   it kept 88-100% of it (4 to 256 ranks, against an exact solver), all of it up to 4 ranks. A
   layer keeps the packer's own order instead where that keeps more.
3. **Slots** (:func:`relabel_packs`): each rank's slots are then ordered so an expert already in
   a slot of the rank stays in it (:func:`~eplb_service.placement.keep_slots_within_ranks`).

Rank loads of the result are a permutation of the packing's, so every balance figure is the
packing's own; only the slots that change differ.
"""

from __future__ import annotations

import numpy as np

from eplb_service.placement import keep_slots_within_ranks


def _occurrences(phy2log: np.ndarray, num_ranks: int, num_logical: int) -> np.ndarray:
    """``[L * P]`` key per slot: (layer, expert, k) for the k-th copy of the expert on its rank."""
    num_layers, num_physical = phy2log.shape
    slots_per_rank = num_physical // num_ranks
    cell = np.arange(num_layers)[:, None] * num_ranks + np.arange(num_physical)[None, :] // slots_per_rank
    group = (cell * num_logical + phy2log).ravel()
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    first = np.r_[True, sorted_group[1:] != sorted_group[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(group.size), 0))
    copy = np.empty(group.size, dtype=np.int64)
    copy[order] = np.arange(group.size) - start
    layer = np.repeat(np.arange(num_layers), num_physical)
    return (layer * num_logical + phy2log.ravel()) * slots_per_rank + copy


def pack_overlap(packs: np.ndarray, current: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L, R, R]`` int64: ``[l, p, r]`` = replicas of pack ``p`` that rank ``r`` holds now.

    Args:
        packs: ``[L, P]`` a placement whose rank blocks are the packs (pack ``p`` = slots
            ``p * S .. (p + 1) * S - 1``, ``S = P / R``).
        current: ``[L, P]`` the placement now.
        num_ranks: ``R``.
    """
    packs = np.asarray(packs, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    num_layers, num_physical = packs.shape
    slots_per_rank = num_physical // num_ranks
    num_logical = int(max(packs.max(initial=0), current.max(initial=0))) + 1
    key_pack = _occurrences(packs, num_ranks, num_logical)
    key_now = _occurrences(current, num_ranks, num_logical)
    by_key = np.argsort(key_now, kind="stable")
    sorted_now = key_now[by_key]
    # Each pack replica meets every current slot with the same (layer, expert, copy) key.
    lo = np.searchsorted(sorted_now, key_pack, side="left")
    hits = np.searchsorted(sorted_now, key_pack, side="right") - lo
    src = np.repeat(np.arange(key_pack.size), hits)
    run_start = np.repeat(np.cumsum(hits) - hits, hits)
    dst = by_key[np.repeat(lo, hits) + np.arange(src.size) - run_start]
    slot_rank = np.tile(np.arange(num_physical) // slots_per_rank, num_layers)
    layer = src // num_physical
    flat = (layer * num_ranks + slot_rank[src]) * num_ranks + slot_rank[dst]
    return np.bincount(flat, minlength=num_layers * num_ranks * num_ranks).reshape(num_layers, num_ranks, num_ranks)


def match_packs(overlap: np.ndarray) -> np.ndarray:
    """``[L, R]`` int64: the rank each pack goes to, keeping as much ``overlap`` as it can.

    Args:
        overlap: ``[L, R, R]`` from :func:`pack_overlap` (any non-negative weights).
    """
    weight = np.asarray(overlap, dtype=np.float64)
    num_layers, num_ranks, _ = weight.shape
    rank_of = np.full((num_layers, num_ranks), -1, dtype=np.int64)
    pack_on = np.full((num_layers, num_ranks), -1, dtype=np.int64)
    layer, pack, rank = np.nonzero(weight > 0)
    # A score unique per edge: the weight first, then the lower (pack, rank) index.
    score = weight[layer, pack, rank] * (num_ranks * num_ranks + 1) - (pack * num_ranks + rank)
    while layer.size:
        free = (rank_of[layer, pack] < 0) & (pack_on[layer, rank] < 0)
        layer, pack, rank, score = layer[free], pack[free], rank[free], score[free]
        if not layer.size:
            break
        best_of_pack = np.full(num_layers * num_ranks, -np.inf)
        np.maximum.at(best_of_pack, layer * num_ranks + pack, score)
        best_of_rank = np.full(num_layers * num_ranks, -np.inf)
        np.maximum.at(best_of_rank, layer * num_ranks + rank, score)
        take = (score == best_of_pack[layer * num_ranks + pack]) & (score == best_of_rank[layer * num_ranks + rank])
        rank_of[layer[take], pack[take]] = rank[take]
        pack_on[layer[take], rank[take]] = pack[take]
    # Packs left over to ranks left over, both in index order (no overlap remains between them).
    left_pack = rank_of < 0
    if left_pack.any():
        left_rank = np.sort(np.where(pack_on < 0, np.arange(num_ranks), num_ranks), axis=1)
        position = np.cumsum(left_pack, axis=1) - 1
        rank_of = np.where(left_pack, np.take_along_axis(left_rank, np.maximum(position, 0), axis=1), rank_of)
    # The packer's own order where it keeps more (greedy is only a 1/2-approximation).
    in_order = np.arange(num_ranks)
    kept = weight[np.arange(num_layers)[:, None], in_order, rank_of].sum(axis=1)
    kept_in_order = np.trace(weight, axis1=1, axis2=2)
    return np.where((kept_in_order > kept)[:, None], in_order, rank_of)


def relabel_packs(
    packs: np.ndarray, current: np.ndarray, num_ranks: int, overlap: np.ndarray | None = None
) -> np.ndarray:
    """``[L, P]`` int64: ``packs`` with its rank blocks moved to the ranks of :func:`match_packs`
    and each rank's slots ordered to keep ``current``'s experts in place (module docstring).

    ``overlap``: :func:`pack_overlap` of the same arguments, where the caller already has it.
    """
    packs = np.asarray(packs, dtype=np.int64)
    num_layers, num_physical = packs.shape
    slots_per_rank = num_physical // num_ranks
    rank_of = match_packs(pack_overlap(packs, current, num_ranks) if overlap is None else overlap)
    blocks = np.empty((num_layers, num_ranks, slots_per_rank), dtype=np.int64)
    blocks[np.arange(num_layers)[:, None], rank_of] = packs.reshape(num_layers, num_ranks, slots_per_rank)
    return keep_slots_within_ranks(blocks.reshape(num_layers, num_physical), current, num_ranks)
