"""The migration policy held to DeepSeek's node hierarchy: every group's replicas on one node.

DeepSeek-V3 routes a token to its top expert groups first (node-limited routing). With the
groups of ``N_log / G`` consecutive experts kept whole on nodes, a token's experts sit on few
nodes and most expert-parallel all-to-all traffic stays inside a node. The plain migration
policy moves replicas anywhere, which balances better but sends that traffic between nodes
without being asked; this mode keeps the hierarchy (``G`` a multiple of the ``N`` nodes, the
condition of DeepSeek's hierarchical path) and moves as little as the migration policy does:

1. **Groups to nodes, kept** (:func:`current_group_nodes`): each group stays on the node that
   holds most of its replicas, ``G / N`` groups per node (an assignment problem, solved by
   :func:`~eplb_service.coordinator.pack_matching.match_packs` with one seat per group).
2. **Whole-group exchanges, only where they pay** (:func:`exchange_groups`): a node's load
   bounds its ranks' (the most loaded rank carries at least the node's load / its ranks). While
   the most loaded node is above the level DeepSeek's greedy packing of the groups onto nodes
   reaches, by more than step 3's tolerance of the migration policy, one of its groups is
   exchanged with a group of another node: the exchange that evens the pair most, if it lowers
   the hot node by at least what step 3 asks of an exchange of two slots and, where the load's
   imbalance fades, pays step 6's price for every slot it moves (every replica of both groups:
   a quarter of a layer with 8 groups). With one group per node no exchange changes any
   node's load, and none is made. The drop counts only down to the layer's **rank floor**
   (:func:`rank_floor`): the largest rank load of an ideal packing of the layer's replicas at
   DeepSeek's replica counts. Where one hot expert's rank sets the layer's balance (a
   Zipf >= 1 head at the ``1 / top_k`` cap, or a new hot expert without redundant slots to
   split it), a node above the others but below that floor is absorbed by its own ranks, and
   moving a quarter of the layer would not lower the largest rank at all.
3. **Each node a sub-problem of the same shape** (:func:`hierarchical_migration_phy2log`):
   the (layer, node) pairs become the rows of one ``[L * N, P / N]`` placement over node-local
   expert ids on ``R / N`` ranks, and the migration policy's steps 1-6 run on it as on any
   placement, all rows at once.
4. **Purity first, at the fewest moves** (:func:`node_pure_rows`): a slot holding another
   node's expert (vLLM's initial ``p % N_log`` layout with redundant slots spills a group over
   two nodes; an exchange of step 2 moves whole groups) is freed, and the node's experts
   without a replica there get the freed slots first; a node short of freed slots gives up
   second replicas, as step 2 of the migration policy does. Purity then costs a row
   ``max(foreign slots, missing experts)`` slots, the least any node-pure placement can (plus
   the replica count changes the load forces, which step 1 makes anyway).

Every plan of this mode is node-pure, and the replica counts of a node's experts use only that
node's slots (``P / N`` for ``N_log / N`` experts), as in DeepSeek's hierarchical policy.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from eplb_service.coordinator.pack_matching import match_packs
from eplb_service.coordinator.policy_deepseek import balanced_packing
from eplb_service.coordinator.policy_migration import (
    DEFAULT_COUNT_CAP_SHARE,
    DEFAULT_COUNT_SLACK,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_MIN_SWAP_SHARE,
    DEFAULT_MOVE_PRICE,
    apply_count_changes,
    migration_phy2log,
    optimal_replica_counts,
    packing_lower_bound,
    price_fading,
    swap_tolerance,
    target_replica_counts,
)
from eplb_service.placement import PolicySettingsError


class NodeRows(NamedTuple):
    """A placement as one row per (layer, node), in node-local expert ids.

    Attributes:
        rows: ``[L * N, P / N]`` int64, row ``l * N + n`` is node ``n``'s slots of layer ``l``;
            an expert of a group assigned to node ``n`` is its local id (``< N_log / N``),
            any other expert the placeholder ``N_log / N`` (a slot to free).
        load: ``[L * N, N_log / N]`` the load of each node's experts, by local id.
        local_to_global: ``[L * N, N_log / N]`` int64, the logical expert of each local id.
    """

    rows: np.ndarray
    load: np.ndarray
    local_to_global: np.ndarray


def check_divisors(num_logical: int, num_ranks: int, num_groups: int, num_nodes: int) -> None:
    """Raise :class:`PolicySettingsError` naming the value unless ``num_groups`` divides the
    logical experts and ``num_nodes`` the ranks: what any description of the model's groups and
    the deployment's nodes must satisfy, kept hierarchy or not (both policies check it through
    :func:`~eplb_service.coordinator.policy.check_groups_and_nodes`)."""
    if num_groups <= 0 or num_logical % num_groups:
        raise PolicySettingsError(
            f"num_groups={num_groups} (--groups) must divide the number of logical experts ({num_logical})"
        )
    if num_nodes <= 0 or num_ranks % num_nodes:
        raise PolicySettingsError(f"num_nodes={num_nodes} (--nodes) must divide num_ranks={num_ranks}")


def check_hierarchy(num_logical: int, num_ranks: int, num_groups: int, num_nodes: int) -> None:
    """Raise :class:`PolicySettingsError` naming the value unless ``num_groups`` groups can be
    kept whole on ``num_nodes`` nodes of ``num_ranks`` ranks."""
    check_divisors(num_logical, num_ranks, num_groups, num_nodes)
    if num_groups % num_nodes:
        raise PolicySettingsError(
            f"num_groups={num_groups} (--groups) must be a multiple of num_nodes={num_nodes} (--nodes): the "
            "migration policy keeps each group's experts on one node, the same number of groups on every node "
            "(--nodes 1 lets it place experts on any node)"
        )


def uses_hierarchy(num_groups: int, num_nodes: int) -> bool:
    """Whether the migration policy keeps groups on nodes: several nodes, whole groups on each."""
    return num_nodes > 1 and num_groups > 0 and num_groups % num_nodes == 0


def slot_groups(phy2log: np.ndarray, num_logical: int, num_groups: int) -> np.ndarray:
    """``[L, P]`` the group of each slot's expert (groups are consecutive blocks of experts)."""
    return np.asarray(phy2log, dtype=np.int64) // (num_logical // num_groups)


def group_replicas_per_node(phy2log: np.ndarray, num_logical: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """``[L, G, N]`` int64: slots of node ``n`` holding an expert of group ``g``."""
    num_layers, num_physical = phy2log.shape
    node = np.arange(num_physical) // (num_physical // num_nodes)
    group = slot_groups(phy2log, num_logical, num_groups)
    flat = (np.arange(num_layers)[:, None] * num_groups + group) * num_nodes + node[None, :]
    counts = np.bincount(flat.ravel(), minlength=num_layers * num_groups * num_nodes)
    return counts.reshape(num_layers, num_groups, num_nodes)


def node_purity(phy2log: np.ndarray, num_logical: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """``[L]`` bool: every group's replicas of the layer sit on one node, ``G / N`` groups per node."""
    per_node = group_replicas_per_node(phy2log, num_logical, num_groups, num_nodes)
    whole = ((per_node > 0).sum(axis=2) == 1).all(axis=1)
    node_of_group = per_node.argmax(axis=2)
    groups_per_node = np.stack([(node_of_group == n).sum(axis=1) for n in range(num_nodes)], axis=1)
    return whole & (groups_per_node == num_groups // num_nodes).all(axis=1)


def current_group_nodes(phy2log: np.ndarray, num_logical: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """``[L, G]`` int64: the node each group stays on, ``G / N`` per node, keeping as many of the
    groups' current replicas in place as the matching finds (step 1 of the module docstring).

    Each node offers ``G / N`` seats, each weighted by the group's replicas on that node.
    """
    per_node = group_replicas_per_node(phy2log, num_logical, num_groups, num_nodes)
    seats = np.repeat(per_node, num_groups // num_nodes, axis=2)  # [L, G, G]: seat s is on node s // (G / N)
    return match_packs(seats) // (num_groups // num_nodes)


def rank_floor(shares: np.ndarray, num_physical: int, num_ranks: int) -> np.ndarray:
    """``[L]`` the largest rank load, as a share of the layer's, that even an ideal placement of the
    layer reaches: :func:`~eplb_service.coordinator.policy_migration.packing_lower_bound` of the
    replicas at DeepSeek's counts (:func:`optimal_replica_counts` over all ``P`` slots).

    An estimate from below for the hierarchy, whose nodes cannot lend each other slots: node
    exchanges are worth nothing under it (step 2 of the module docstring).

    Args:
        shares: ``[L, N_log]`` each expert's share of its layer's load (rows sum to 1, or 0).
    """
    counts = optimal_replica_counts(shares, num_physical)
    replicas = np.repeat((shares / counts).ravel(), counts.ravel()).reshape(shares.shape[0], num_physical)
    return packing_lower_bound(replicas, num_ranks)


def exchange_groups(
    node_of_group: np.ndarray,
    group_load: np.ndarray,
    group_slots: np.ndarray,
    num_nodes: int,
    *,
    limit: np.ndarray,
    min_gain: np.ndarray,
    slot_price: np.ndarray,
    max_rounds: int,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """Step 2: whole-group exchanges that lower the most loaded node (a new ``[L, G]`` array).

    Each round, in every layer whose most loaded node is above its ``limit``, every group of that
    node is tried against every group of another node; the exchange that leaves the larger of
    the two nodes' loads smallest is made if it lowers the most loaded node, counted no lower
    than ``floor``, by at least ``min_gain`` and by ``slot_price`` per slot it moves (both
    groups' replicas). A layer stops when its most loaded node is at its limit or no exchange
    passes.

    Args:
        node_of_group: ``[L, G]`` node of each group.
        group_load: ``[L, G]`` load of each group, in the units of the other arguments.
        group_slots: ``[L, G]`` slots each group's replicas take (what an exchange moves).
        num_nodes: ``N``; limit, min_gain, slot_price: ``[L]``; max_rounds: upper bound on rounds.
        floor: ``[L]`` the layer's largest rank load whatever the nodes hold (:func:`rank_floor`,
            in ``group_load``'s units); ``None``: none.
    """
    out = np.array(node_of_group, dtype=np.int64, copy=True)
    num_layers, num_groups = out.shape
    if num_groups // num_nodes < 2 or num_nodes < 2:
        return out  # one group per node: every assignment gives the same node loads
    floor = np.zeros(num_layers) if floor is None else np.asarray(floor, dtype=np.float64)
    active = np.arange(num_layers)
    for _ in range(max_rounds):
        if active.size == 0:
            break
        nodes = out[active]
        weight = group_load[active]
        node_load = np.zeros((active.size, num_nodes))
        np.add.at(node_load, (np.arange(active.size)[:, None], nodes), weight)
        hot = node_load.argmax(axis=1)
        hot_load = node_load[np.arange(active.size), hot]
        # Candidates [layer, g on the hot node, h elsewhere]: the pair's loads after the exchange.
        shift = weight[:, :, None] - weight[:, None, :]
        other_load = np.take_along_axis(node_load, nodes, axis=1)[:, None, :]
        pair_max = np.maximum(hot_load[:, None, None] - shift, other_load + shift)
        valid = (nodes == hot[:, None])[:, :, None] & (nodes != hot[:, None])[:, None, :]
        moved = group_slots[active][:, :, None] + group_slots[active][:, None, :]
        need = np.maximum(min_gain[active][:, None, None], slot_price[active][:, None, None] * moved)
        lowest = floor[active][:, None, None]
        drop = np.maximum(hot_load[:, None, None], lowest) - np.maximum(pair_max, lowest)
        passes = valid & (drop >= need) & (hot_load > limit[active])[:, None, None]
        score = np.where(passes, pair_max, np.inf).reshape(active.size, -1)
        best = score.argmin(axis=1)
        take = np.isfinite(score[np.arange(active.size), best])
        g, h = np.divmod(best[take], num_groups)
        lay = active[take]
        out[lay, g], out[lay, h] = out[lay, h], out[lay, g]
        active = lay
    return out


def node_rows(phy2log: np.ndarray, load: np.ndarray, node_of_group: np.ndarray, num_nodes: int) -> NodeRows:
    """``phy2log [L, P]`` and ``load [L, N_log]`` as one row per (layer, node) (see :class:`NodeRows`)."""
    num_layers, num_physical = phy2log.shape
    num_logical = load.shape[1]
    num_groups = node_of_group.shape[1]
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_node = num_logical // num_nodes
    # Each node's groups in ascending order: position k of the node's groups is local ids
    # [k * group_size, (k + 1) * group_size).
    order = np.argsort(node_of_group * num_groups + np.arange(num_groups), axis=1, kind="stable")  # [L, G]
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.tile(np.arange(num_groups) % groups_per_node, (num_layers, 1)), axis=1)
    offset = np.arange(group_size)
    local_to_global = order.reshape(num_layers * num_nodes, groups_per_node)[:, :, None] * group_size + offset
    local_to_global = local_to_global.reshape(num_layers * num_nodes, per_node)
    expert_group = np.arange(num_logical) // group_size
    global_to_local = position[:, expert_group] * group_size + offset[np.arange(num_logical) % group_size]  # [L, N_log]
    expert_node = node_of_group[:, expert_group]  # [L, N_log]
    lay = np.arange(num_layers)[:, None]
    slot_node = np.arange(num_physical) // (num_physical // num_nodes)
    own = expert_node[lay, phy2log] == slot_node[None, :]
    local = np.where(own, global_to_local[lay, phy2log], per_node)
    rows = local.reshape(num_layers * num_nodes, num_physical // num_nodes)
    row_load = np.take_along_axis(np.repeat(load, num_nodes, axis=0), local_to_global, axis=1)
    return NodeRows(rows, row_load, local_to_global)


def _fill_counts(load: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:
    """``counts [X, n]`` raised to ``total`` per row: each missing replica to the expert with the
    largest load per replica (rows already at ``total`` are unchanged)."""
    out = counts.copy()
    rows = np.arange(out.shape[0])
    for _ in range(int((total - out.sum(axis=1)).max(initial=0))):
        short = out.sum(axis=1) < total
        expert = (load / out).argmax(axis=1)
        out[rows[short], expert[short]] += 1
    return out


def node_pure_rows(
    rows: np.ndarray,
    load: np.ndarray,
    ranks_per_node: int,
    count_cap_share: float = DEFAULT_COUNT_CAP_SHARE,
    count_slack: float = 0.0,
) -> np.ndarray:
    """Step 4: ``rows`` (from :func:`node_rows`) with every placeholder slot refilled and every
    local expert given a replica, changing ``max(placeholders, missing experts)`` slots per row.

    The replica counts are the migration policy's (its step 1, from the node's current counts
    with at least one each), raised to the node's slots where freed slots are left over; its
    step 2 then frees and refills the slots. Rows that are already pure come back unchanged.
    """
    num_rows, slots = rows.shape
    per_node = load.shape[1]
    counts = np.zeros((num_rows, per_node + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(num_rows)[:, None], rows), 1)
    impure = (counts[:, per_node] > 0) | (counts[:, :per_node] == 0).any(axis=1)
    if not impure.any():
        return rows
    sub_load, sub_counts = load[impure], counts[impure]
    new = target_replica_counts(
        sub_load, np.maximum(sub_counts[:, :per_node], 1), slots, ranks_per_node, count_cap_share, count_slack
    )
    new = _fill_counts(sub_load, new, slots)
    extended_load = np.concatenate([sub_load, np.zeros((sub_load.shape[0], 1))], axis=1)
    extended_new = np.concatenate([new, np.zeros((new.shape[0], 1), dtype=np.int64)], axis=1)
    out = rows.copy()
    out[impure] = apply_count_changes(rows[impure], extended_load, sub_counts, extended_new, ranks_per_node)
    return out


def hierarchical_migration_phy2log(
    current_phy2log: np.ndarray,
    logical_load: np.ndarray,
    num_ranks: int,
    num_groups: int,
    num_nodes: int,
    *,
    min_swap_share: float = DEFAULT_MIN_SWAP_SHARE,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    count_cap_share: float = DEFAULT_COUNT_CAP_SHARE,
    count_slack: float = DEFAULT_COUNT_SLACK,
    persistence: float = 1.0,
    move_price: float = DEFAULT_MOVE_PRICE,
    price_floor: float = 0.0,
    **options: Any,
) -> np.ndarray:
    """The migration-aware placement with every group's replicas on one node (module docstring).

    Args:
        current_phy2log: ``[L, P]`` valid current placement (node-pure or not).
        logical_load: ``[L, N_log]`` load per logical expert, in routed tokens (>= 0, finite).
        num_ranks: EP ranks; ``num_groups``: expert groups (consecutive blocks of experts);
            ``num_nodes``: nodes of ``R / N`` consecutive ranks each. ``G`` must divide
            ``N_log`` and be a multiple of ``N``, ``N`` must divide ``R``.
        min_swap_share, max_rounds, count_cap_share, count_slack, persistence, move_price,
            price_floor: as :func:`~eplb_service.coordinator.policy_migration.migration_phy2log`
            (step 2 prices a group exchange with the first and the last three); ``options``:
            the rest of its options, passed on to each node's rows.

    Returns:
        ``phy2log [L, P]`` int64, node-pure.
    """
    current = np.asarray(current_phy2log, dtype=np.int64)
    load = np.asarray(logical_load, dtype=np.float64)
    num_layers, num_physical = current.shape
    num_logical = load.shape[1]
    check_hierarchy(num_logical, num_ranks, num_groups, num_nodes)
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_physical // num_ranks

    node_of_group = current_group_nodes(current, num_logical, num_groups, num_nodes)
    # Step 2 in shares of each layer's load: a node's ranks carry its share / ranks_per_node at best.
    totals = load.sum(axis=1)
    shares = load / np.where(totals > 0, totals, 1.0)[:, None]
    group_share = shares.reshape(num_layers, num_groups, -1).sum(axis=2) / ranks_per_node
    step = swap_tolerance(load, num_ranks, slots_per_rank) / num_ranks
    packed = balanced_packing(group_share, num_nodes).pack_index
    best_node = np.zeros((num_layers, num_nodes))
    np.add.at(best_node, (np.arange(num_layers)[:, None], packed), group_share)
    limit = np.maximum(best_node.max(axis=1), 1.0 / num_ranks) + step
    group_slots = group_replicas_per_node(current, num_logical, num_groups, num_nodes).sum(axis=2)
    node_of_group = exchange_groups(
        node_of_group,
        group_share,
        group_slots,
        num_nodes,
        limit=limit,
        min_gain=np.maximum(min_swap_share * step, 1e-12),
        slot_price=np.full(
            num_layers, move_price * price_fading(persistence, num_physical, price_floor) / num_physical
        ),
        max_rounds=num_groups,
        floor=rank_floor(shares, num_physical, num_ranks),
    )

    split = node_rows(current, load, node_of_group, num_nodes)
    slack = count_slack if slots_per_rank > 2 else 0.0
    pure = node_pure_rows(split.rows, split.load, ranks_per_node, count_cap_share, slack)
    planned = migration_phy2log(
        pure,
        split.load,
        ranks_per_node,
        min_swap_share=min_swap_share,
        max_rounds=max_rounds,
        count_cap_share=count_cap_share,
        count_slack=count_slack,
        persistence=persistence,
        move_price=move_price,
        price_floor=price_floor,
        **options,
    )
    return np.take_along_axis(split.local_to_global, planned, axis=1).reshape(num_layers, num_physical)
