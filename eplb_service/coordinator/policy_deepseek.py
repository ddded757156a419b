"""DeepSeek's EPLB placement algorithm, for parity with what vLLM ships.

Written from the published description of DeepSeek's Expert Parallelism Load Balancer
(deepseek-ai/EPLB): three small pure steps composed hierarchically.

1. **Groups to nodes**: pack the expert groups onto nodes so every node gets the same number
   of groups and the node loads are balanced (``balanced_packing``).
2. **Replicas within each node**: give each node ``P / nodes`` slots and hand the redundant
   slots, one at a time, to the expert with the largest load per replica
   (``replicate_experts``).
3. **Replicas to ranks**: pack each node's replicas onto its ranks, the same number on every
   rank, balancing the load (``balanced_packing`` again).

``balanced_packing`` is the greedy "heaviest item first into the lightest pack that still has
room" rule. When ``num_groups % num_nodes != 0`` the hierarchy cannot be honoured and the
whole deployment is treated as one node with one group (the "global" policy).

Everything is vectorised over layers (the per-item greedy loop runs over items, with all
layers advancing together), so a 60-layer plan costs one pass, not 60.

Tie-breaking follows the published algorithm as vLLM runs it: items are taken in descending
weight order as numpy's default argsort orders them (equal weights included), the lightest
pack is the first one among the lightest, and the expert that gets a redundant slot is the
first one among the largest load-per-replica. numpy's default sort orders equal values by the
vector instructions the CPU has (AVX-512, AVX2 or neither give three different orders), so with
equal loads (routed-token counts often tie) this packing, like vLLM's own, can differ from one
machine to another, as can the migration policy's exchanges between replicas of equal load. Each
order is as good as the others; ``bench/README.md`` ("the CPU's vector instructions") measures
how far they move the workload matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eplb_service.placement import PlacementError, PolicySettingsError


class Packing(NamedTuple):
    """Result of :func:`balanced_packing`.

    Attributes:
        pack_index: ``[X, n]`` int64, the pack each item goes to.
        rank_in_pack: ``[X, n]`` int64, the item's position inside its pack (in the order the
            greedy placed it).
    """

    pack_index: np.ndarray
    rank_in_pack: np.ndarray


class Replication(NamedTuple):
    """Result of :func:`replicate_experts`.

    Attributes:
        phy2log: ``[X, num_phy]`` int64, the expert each replica serves; replica ``i < num_log``
            is expert ``i`` itself, the rest are the redundant replicas in the order handed out.
        replica_rank: ``[X, num_phy]`` int64, which replica of its expert each one is (0-based).
        logcnt: ``[X, num_log]`` int64, replicas per expert.
    """

    phy2log: np.ndarray
    replica_rank: np.ndarray
    logcnt: np.ndarray


def balanced_packing(weight: np.ndarray, num_packs: int) -> Packing:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items.

    Greedy: items in descending weight order, each into the lightest pack that is not full.

    Args:
        weight: ``[X, n]`` the weight of each item, one independent problem per row.
        num_packs: number of packs; must divide ``n``.
    """
    weight = np.asarray(weight)
    num_rows, num_items = weight.shape
    if num_packs <= 0 or num_items % num_packs:
        raise PlacementError(f"num_packs={num_packs} must divide the {num_items} items")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = np.tile(np.arange(num_items, dtype=np.int64), (num_rows, 1))
        return Packing(pack_index, np.zeros_like(pack_index))

    # numpy's default (introsort) order, as vLLM uses: equal weights then tie-break alike.
    order = np.argsort(-weight, axis=1)
    rows = np.arange(num_rows)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    # A full pack's weight is set to +inf so argmin never picks it again.
    pack_weight = np.zeros((num_rows, num_packs), dtype=np.float64)
    pack_items = np.zeros((num_rows, num_packs), dtype=np.int64)
    for k in range(num_items):
        item = order[:, k]
        pack = pack_weight.argmin(axis=1)
        # An infinite weight makes an open pack tie with the full ones: take the first open one.
        tied = np.isinf(pack_weight[rows, pack])
        if tied.any():
            pack[tied] = (pack_items[tied] < per_pack).argmax(axis=1)
        filled = pack_items[rows, pack]
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = filled
        pack_weight[rows, pack] += weight[rows, item]
        pack_items[rows, pack] = filled + 1
        full = filled + 1 == per_pack
        if full.any():
            pack_weight[rows[full], pack[full]] = np.inf
    return Packing(pack_index, rank_in_pack)


def replicate_experts(weight: np.ndarray, num_phy: int) -> Replication:
    """Spread ``num_log`` experts over ``num_phy >= num_log`` replicas, minimising the
    largest load per replica: every redundant replica goes to the expert whose load per
    replica is currently the largest.

    Args:
        weight: ``[X, num_log]`` load of each expert, one independent problem per row.
        num_phy: total replicas per row after replication.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_rows, num_log = weight.shape
    if num_phy < num_log:
        raise PlacementError(f"num_phy={num_phy} must be >= num_log={num_log}")
    rows = np.arange(num_rows)
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    replica_rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    per_replica = weight.copy()
    for i in range(num_log, num_phy):
        expert = per_replica.argmax(axis=1)
        count = logcnt[rows, expert]
        phy2log[:, i] = expert
        replica_rank[:, i] = count
        logcnt[rows, expert] = count + 1
        per_replica[rows, expert] = weight[rows, expert] / (count + 1)
    return Replication(phy2log, replica_rank, logcnt)


def _inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of ``perm [X, n]`` (each row a permutation of ``0..n-1``)."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv


def rebalance_hierarchical(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> np.ndarray:
    """The hierarchical policy: groups to nodes, replicas within nodes, replicas to ranks.

    Args:
        weight: ``[L, N_log]`` load per logical expert.
        num_physical: ``P``, slots per layer; a multiple of ``num_ranks``.
        num_groups: expert groups (consecutive blocks of ``N_log / num_groups`` experts);
            a multiple of ``num_nodes`` and a divisor of ``N_log``.
        num_nodes: server nodes; divides ``num_ranks``.
        num_ranks: EP ranks (GPUs).

    Returns:
        ``phy2log [L, P]`` int64; slot ``p`` lives on rank ``p // (P / num_ranks)``.
    """
    weight = np.asarray(weight)
    num_layers, num_logical = weight.shape
    _check_divides("num_groups", num_groups, "the number of logical experts", num_logical)
    _check_divides("num_nodes", num_nodes, "num_groups", num_groups)
    _check_divides("num_nodes", num_nodes, "num_ranks", num_ranks)
    _check_divides("num_ranks", num_ranks, "the number of physical slots", num_physical)
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    logical_per_node = num_logical // num_nodes
    physical_per_node = num_physical // num_nodes
    slots_per_rank = num_physical // num_ranks
    if physical_per_node < logical_per_node:
        raise PolicySettingsError(
            f"{physical_per_node} slots per node cannot hold {logical_per_node} experts per node (--nodes {num_nodes})"
        )

    # Step 1: groups to nodes. "mlog" numbers experts node by node: node n owns mlog ids
    # [n * logical_per_node, (n + 1) * logical_per_node).
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    groups = balanced_packing(group_load, num_nodes)
    group_slot = groups.pack_index * groups_per_node + groups.rank_in_pack  # [L, groups]
    log2mlog = (group_slot[:, :, None] * group_size + np.arange(group_size)).reshape(num_layers, num_logical)
    mlog2log = _inverse_permutation(log2mlog)

    # Step 2: replicas within each node; one row per (layer, node).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(num_layers * num_nodes, logical_per_node)
    replicas = replicate_experts(mlog_load, physical_per_node)

    # Step 3: each node's replicas onto its ranks.
    replica_load = np.take_along_axis(mlog_load / replicas.logcnt, replicas.phy2log, axis=1)
    ranks = balanced_packing(replica_load, num_ranks // num_nodes)
    replica_to_slot = ranks.pack_index * slots_per_rank + ranks.rank_in_pack
    slot_to_replica = _inverse_permutation(replica_to_slot)
    slot_mlog = np.take_along_axis(replicas.phy2log, slot_to_replica, axis=1)
    slot_mlog = slot_mlog.reshape(num_layers, num_nodes, physical_per_node)
    slot_mlog = slot_mlog + (np.arange(num_nodes) * logical_per_node)[None, :, None]
    return np.take_along_axis(mlog2log, slot_mlog.reshape(num_layers, num_physical), axis=1)


def deepseek_phy2log(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> np.ndarray:
    """DeepSeek's entry point: hierarchical when ``num_groups % num_nodes == 0``, else global.

    Args:
        weight: ``[L, N_log]`` load per logical expert (>= 0).
        num_physical: ``P`` slots per layer.
        num_groups: expert groups; ``num_nodes``: nodes; ``num_ranks``: EP ranks.

    Returns:
        ``phy2log [L, P]`` int64.
    """
    # The published algorithm (and vLLM) works on float32 statistics (group sums in float32,
    # loads per replica in float64); keeping the same dtypes keeps every tie-break identical.
    weight = float32_weights(weight)
    if num_nodes > 0 and num_groups > 0 and num_groups % num_nodes == 0:
        return rebalance_hierarchical(weight, num_physical, num_groups, num_nodes, num_ranks)
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_ranks)


FLOAT32_PEAK_RANGE = (-100, 100)
"""Binary exponents of a layer's largest load that float32 holds with room to spare: group sums
of up to ``2**27`` such loads stay below float32's largest value (about ``2**128``)."""


def float32_weights(weight: np.ndarray) -> np.ndarray:
    """``weight [L, N]`` as float32, each layer whose largest load is outside
    :data:`FLOAT32_PEAK_RANGE` first scaled by a power of two to a largest load in ``[2**99, 2**100)``.

    Loads are finite float64 (up to ``1.8e308``); float32 ends at ``3.4e38``. Unscaled, a layer of
    loads near ``1e38`` summed its groups to ``inf`` and the packing overfilled a rank (an
    expert with no replica), and one of loads below ``1e-45`` became all zeros and was never
    balanced. A power of two changes no ratio and, away from float32's ends, no rounding, so
    every ordinary layer keeps exactly the float32 values (and tie-breaks) vLLM's policy sees.
    """
    weight64 = np.asarray(weight, dtype=np.float64)
    peak = weight64.max(axis=1) if weight64.size else np.zeros(weight64.shape[0])
    _, exponent = np.frexp(peak)
    low, high = FLOAT32_PEAK_RANGE
    shift = np.where((peak > 0) & ((exponent < low) | (exponent > high)), high - exponent, 0)
    return np.ldexp(weight64, shift[:, None]).astype(np.float32)


def _check_divides(name: str, value: int, what: str, total: int) -> None:
    if value <= 0 or total % value:
        raise PolicySettingsError(f"{name}={value} must divide {what} ({total})")
