"""Placement model: where every logical expert lives, and how balanced that is.

Pure numpy, no torch, no sockets: the coordinator, the policies, the agent and the
planner CLI all share these definitions, so "balancedness" or "a valid placement" can
never mean two different things in two places.

Conventions (the same as vLLM's EPLB):

- ``phy2log``: ``[L, P]`` int64, the logical expert held by each physical slot.
- ``P = N_log + redundant`` slots per layer, ``P / ranks`` slots per rank; physical slot
  ``p`` lives on rank ``p // slots_per_rank``, local row ``p % slots_per_rank``.
- ``logcnt``: ``[L, N_log]`` int64, replicas per logical expert.
- ``log2phy``: ``[L, N_log, R]`` int64, the physical slots of each logical expert in
  ascending order, padded with ``-1`` up to width ``R``.
- a logical expert's load splits evenly over its replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """A placement that breaks an invariant; the message names the layer and value."""


class PolicySettingsError(PlacementError):
    """A policy setting the deployment's shape cannot satisfy (``--groups`` not dividing the
    experts): every plan would fail the same way, so the coordinator halts once, naming it."""


@dataclass(frozen=True)
class PlacementShape:
    """The fixed shape of a deployment's placement.

    Attributes:
        num_layers: ``L``, MoE layers that have expert load balancing.
        num_logical: ``N_log``, logical experts per layer.
        num_physical: ``P``, physical expert slots per layer (``N_log + redundant``).
        num_ranks: EP ranks; must divide ``P``.
    """

    num_layers: int
    num_logical: int
    num_physical: int
    num_ranks: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_logical", "num_physical", "num_ranks"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise PlacementError(f"{name} must be a positive integer, got {value!r}")
        if self.num_physical < self.num_logical:
            raise PlacementError(
                f"num_physical={self.num_physical} must be >= num_logical={self.num_logical} "
                "(every logical expert needs at least one slot)"
            )
        if self.num_physical % self.num_ranks:
            raise PlacementError(f"num_ranks={self.num_ranks} must divide num_physical={self.num_physical}")

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_logical


def initial_phy2log(shape: PlacementShape) -> np.ndarray:
    """The placement a deployment starts from: slot ``p`` holds expert ``p % N_log``.

    Returns ``[L, P]`` int64. This is what vLLM uses before its first rearrangement.
    """
    row = np.arange(shape.num_physical, dtype=np.int64) % shape.num_logical
    return np.tile(row, (shape.num_layers, 1))


def is_initial_phy2log(phy2log: np.ndarray, shape: PlacementShape) -> bool:
    """Whether ``phy2log`` is :func:`initial_phy2log` of ``shape``: vLLM's own layout, which no
    plan chose (the migration policy's first plan packs it afresh: ``plan_rebalance(fresh=)``)."""
    return bool(np.array_equal(phy2log, initial_phy2log(shape)))


def validate_phy2log(phy2log: np.ndarray, shape: PlacementShape) -> None:
    """Raise :class:`PlacementError` unless ``phy2log`` is a valid placement for ``shape``.

    Checks: 2-D integer array of shape ``[L, P]``; every entry in ``[0, N_log)``; every
    logical expert has at least one replica in every layer. (Slot counts per rank hold
    by construction of the ``[L, P]`` layout once ``ranks`` divides ``P``.)
    """
    expected = (shape.num_layers, shape.num_physical)
    try:
        arr = np.asarray(phy2log)
    except ValueError:  # numpy's "inhomogeneous shape" names neither the array nor the shape expected
        raise PlacementError(
            f"phy2log is not a 2-D array of integers (rows of unequal length?), expected shape {expected} "
            "[layers, physical]"
        ) from None
    if arr.ndim != 2 or arr.shape != expected:
        raise PlacementError(f"phy2log has shape {arr.shape}, expected {expected} [layers, physical]")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PlacementError(f"phy2log has dtype {arr.dtype}, expected an integer dtype")
    bad = (arr < 0) | (arr >= shape.num_logical)
    if bad.any():
        layer, slot = (int(i) for i in np.argwhere(bad)[0])
        raise PlacementError(
            f"layer {layer}: slot {slot} holds expert {int(arr[layer, slot])}, "
            f"expected 0 <= expert < {shape.num_logical}"
        )
    counts = logical_replica_count(arr, shape.num_logical)
    missing = counts == 0
    if missing.any():
        layer, expert = (int(i) for i in np.argwhere(missing)[0])
        raise PlacementError(f"layer {layer}: logical expert {expert} has no replica")


def logical_replica_count(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """``logcnt [L, N_log]``: how many physical slots hold each logical expert."""
    arr = np.asarray(phy2log, dtype=np.int64)
    num_layers = arr.shape[0]
    offsets = (np.arange(num_layers, dtype=np.int64) * num_logical)[:, None]
    flat = np.bincount((arr + offsets).ravel(), minlength=num_layers * num_logical)
    return flat.reshape(num_layers, num_logical)


def logical_to_physical(phy2log: np.ndarray, num_logical: int, width: int) -> np.ndarray:
    """``log2phy [L, N_log, width]``: slots of each expert ascending, ``-1`` padded.

    Raises :class:`PlacementError` when an expert has more replicas than ``width``.
    """
    arr = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_physical = arr.shape
    counts = logical_replica_count(arr, num_logical)
    if counts.size and int(counts.max()) > width:
        layer, expert = (int(i) for i in np.argwhere(counts > width)[0])
        raise PlacementError(
            f"layer {layer}: expert {expert} has {int(counts[layer, expert])} replicas, "
            f"more than the log2phy width {width}"
        )
    out = np.full((num_layers, num_logical, width), -1, dtype=np.int64)
    # Stable sort by expert keeps slots ascending within each expert.
    order = np.argsort(arr, axis=1, kind="stable")
    sorted_experts = np.take_along_axis(arr, order, axis=1)
    starts = np.cumsum(counts, axis=1) - counts
    rank_in_expert = np.arange(num_physical)[None, :] - np.take_along_axis(starts, sorted_experts, axis=1)
    layer_idx = np.repeat(np.arange(num_layers), num_physical)
    out[layer_idx, sorted_experts.ravel(), rank_in_expert.ravel()] = order.ravel()
    return out


def rank_loads(phy2log: np.ndarray, logical_load: np.ndarray, num_ranks: int) -> np.ndarray:
    """Load per rank ``[L, ranks]`` when each expert's load splits evenly over replicas.

    Args:
        phy2log: ``[L, P]`` placement.
        logical_load: ``[L, N_log]`` load per logical expert (tokens, any unit).
        num_ranks: EP ranks; divides ``P``.
    """
    arr = np.asarray(phy2log, dtype=np.int64)
    load = np.asarray(logical_load, dtype=np.float64)
    num_layers, num_physical = arr.shape
    counts = logical_replica_count(arr, load.shape[1])
    per_replica = load / np.maximum(counts, 1)
    slot_load = np.take_along_axis(per_replica, arr, axis=1)
    return slot_load.reshape(num_layers, num_ranks, num_physical // num_ranks).sum(axis=2)


def logical_fold_index(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """``[L * P]`` flat index of each slot's logical expert in an ``[L, N_log]`` table: what
    :func:`fold_slot_load` needs of a placement (computed once per placement, reused per report)."""
    arr = np.asarray(phy2log, dtype=np.int64)
    offsets = (np.arange(arr.shape[0], dtype=np.int64) * num_logical)[:, None]
    return (arr + offsets).ravel()


def fold_slot_load(index: np.ndarray, slot_load: np.ndarray, num_layers: int, num_logical: int) -> np.ndarray:
    """Fold a per-slot load ``[L, P]`` into ``[L, N_log]`` float64 with a :func:`logical_fold_index`."""
    load = np.asarray(slot_load, dtype=np.float64)
    flat = np.bincount(index, weights=load.ravel(), minlength=num_layers * num_logical)
    return flat.reshape(num_layers, num_logical)


def physical_to_logical_load(phy2log: np.ndarray, slot_load: np.ndarray, num_logical: int) -> np.ndarray:
    """Fold a per-slot load ``[L, P]`` into a per-expert load ``[L, N_log]``."""
    index = logical_fold_index(phy2log, num_logical)
    return fold_slot_load(index, slot_load, np.asarray(phy2log).shape[0], num_logical)


def layer_balancedness(per_rank_load: np.ndarray) -> np.ndarray:
    """Mean over ranks / max over ranks, per layer ``[L]``; 1.0 for an idle layer."""
    loads = np.asarray(per_rank_load, dtype=np.float64)
    peak = loads.max(axis=1)
    mean = loads.mean(axis=1)
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)


def model_balancedness(per_rank_load: np.ndarray) -> float:
    """Sum over layers of mean rank load / sum of max rank load (how vLLM logs it)."""
    loads = np.asarray(per_rank_load, dtype=np.float64)
    peak = float(loads.max(axis=1).sum())
    return float(loads.mean(axis=1).sum() / peak) if peak > 0 else 1.0


HOLDINGS_BLOCK_ENTRIES = 2**24
"""Steps of the migration policy that keep a ``[layers, ranks, experts]`` table of holdings run
on blocks of layers whose table has at most this many entries (128 MiB), one block for every
ordinary shape."""


def rank_holdings(phy2log: np.ndarray, num_logical: int, num_ranks: int) -> np.ndarray:
    """``[L, ranks, N_log]`` int64: how many replicas of each expert each rank holds."""
    arr = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_physical = arr.shape
    slot_rank = np.arange(num_physical) // (num_physical // num_ranks)
    keys = (np.arange(num_layers)[:, None] * num_ranks + slot_rank[None, :]) * num_logical + arr
    flat = np.bincount(keys.ravel(), minlength=num_layers * num_ranks * num_logical)
    return flat.reshape(num_layers, num_ranks, num_logical)


def local_source_slots(old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L, P]`` bool: changed slots whose new expert the same rank already holds in ``old``.

    Such a slot can be filled by a copy on the rank's own device; every other changed slot
    needs the expert's bytes from another rank.

    Looks each new ``(layer, rank, expert)`` up among the sorted keys of ``old``'s, so memory
    grows with the slots: :func:`rank_holdings`' dense ``[L, ranks, N_log]`` table took 7.4 GB
    for 200 layers of 2048 experts on 2048 ranks (one slot each), and 1000 layers ran out.
    The keys are sorted, not deduplicated: the lookup only needs them in order (a repeated key
    still matches), and ``np.unique`` (a hash table, then a sort) cost 50 to 100 times as much.
    """
    old = np.asarray(old_phy2log, dtype=np.int64)
    new = np.asarray(new_phy2log, dtype=np.int64)
    held = np.sort(_rank_expert_keys(old, new, num_ranks, old), axis=None)
    wanted = _rank_expert_keys(old, new, num_ranks, new)
    position = np.minimum(np.searchsorted(held, wanted), held.size - 1)
    return (held[position] == wanted) & (old != new)


def _rank_expert_keys(old: np.ndarray, new: np.ndarray, num_ranks: int, which: np.ndarray) -> np.ndarray:
    """``[L, P]`` int64 key ``(layer, rank of the slot, expert of which)``, unique per triple,
    numbered alike for ``old`` and ``new`` (experts up to the larger of the two maxima)."""
    num_layers, num_physical = which.shape
    num_logical = int(max(old.max(initial=0), new.max(initial=0))) + 1
    slot_rank = np.arange(num_physical, dtype=np.int64) // (num_physical // num_ranks)
    cell = np.arange(num_layers, dtype=np.int64)[:, None] * num_ranks + slot_rank[None, :]
    return cell * num_logical + which


def keep_slots_within_ranks(new_phy2log: np.ndarray, old_phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Permute ``new_phy2log`` within each rank so experts already on a rank keep their slot.

    Each rank's multiset of experts (hence every load and balancedness figure) is unchanged;
    only the order of a rank's slots changes, so that as few slots as possible change expert.
    Returns a new ``[L, P]`` int64 array.
    """
    new = np.asarray(new_phy2log, dtype=np.int64)
    old = np.asarray(old_phy2log, dtype=np.int64)
    num_layers, num_physical = new.shape
    slots_per_rank = num_physical // num_ranks
    num_logical = int(max(old.max(initial=0), new.max(initial=0))) + 1
    cell = (np.arange(num_layers)[:, None] * num_ranks + np.arange(num_physical) // slots_per_rank).ravel()

    def occurrence_keys(arr: np.ndarray) -> np.ndarray:
        # Key (cell, expert, k) for the k-th copy of an expert within its (layer, rank) cell.
        group = cell * num_logical + arr.ravel()
        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        first = np.r_[True, sorted_group[1:] != sorted_group[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(group.size), 0))
        occurrence = np.empty_like(group)
        occurrence[order] = np.arange(group.size) - start
        return group * slots_per_rank + occurrence

    old_keys = occurrence_keys(old)
    new_keys = occurrence_keys(new)
    _, old_pos, new_pos = np.intersect1d(old_keys, new_keys, assume_unique=True, return_indices=True)
    out = np.empty(num_layers * num_physical, dtype=np.int64)
    out[old_pos] = new.ravel()[new_pos]
    # The rest: unmatched new experts fill unmatched slots of the same cell, in slot order.
    free_slots = np.ones(out.size, dtype=bool)
    free_slots[old_pos] = False
    left_items = np.ones(out.size, dtype=bool)
    left_items[new_pos] = False
    # Both lists are in flat (cell-major) order and hold the same count per cell.
    out[np.flatnonzero(free_slots)] = new.ravel()[np.flatnonzero(left_items)]
    return out.reshape(num_layers, num_physical)
