"""Rearrangement plans for the harness: as many, as large and as regular as a benchmark needs.

A churn plan picks ``experts_per_rank`` slots on every rank of a layer and rotates their
experts to another rank (the same random shift for the whole layer): every rank sends and
receives the same number of experts, the multiset of experts per layer (hence every
replica count and the load balance on a uniform workload) is unchanged, and the plan is
always valid. The real coordinator drives these plans (vote, fence, commit) as a registered
policy (:func:`register_churn_policy`), so every part of the path is the product's own.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from eplb_service.placement import PlacementShape, local_source_slots


def churn_rows(
    current: np.ndarray, layers: list[int], experts_per_rank: int, num_ranks: int, rng: np.random.Generator
) -> np.ndarray:
    """New rows ``[len(layers), P]`` for ``layers`` of ``current [L, P]``.

    On each layer, ``experts_per_rank`` random slots per rank take the experts of the same
    picks on rank ``(r + shift) % num_ranks``, ``shift`` random in ``[1, num_ranks)``.
    """
    current = np.asarray(current, dtype=np.int64)
    spr = current.shape[1] // num_ranks
    count = min(experts_per_rank, spr)
    rows = current[layers].copy()
    if num_ranks < 2 or count == 0:
        return rows
    for i in range(len(layers)):
        picks = np.stack([rng.choice(spr, count, replace=False) + r * spr for r in range(num_ranks)])  # [R, count]
        shift = int(rng.integers(1, num_ranks))
        rows[i, picks] = rows[i, np.roll(picks, -shift, axis=0)]
    return rows


def remote_bytes(
    current: np.ndarray, layers: list[int], rows: np.ndarray, num_ranks: int, bytes_per_expert: int
) -> int:
    """Bytes that cross ranks when ``layers`` of ``current`` become ``rows`` (local copies are free)."""
    old = np.asarray(current, dtype=np.int64)[layers]
    remote = (old != rows) & ~local_source_slots(old, rows, num_ranks)
    return int(remote.sum()) * bytes_per_expert


def register_churn_policy(
    plans_enabled: Callable[[], bool],
    experts_per_rank: Callable[[], int],
    seed: int,
    layers_per_batch: Callable[[], int] = lambda: 1,
    name: str = "churn",
) -> str:
    """Register a policy named ``name`` that proposes churn plans; returns the name.

    Each policy run proposes one plan over every layer, cut into batches of
    ``layers_per_batch()`` layers (each batch is staged, voted and committed on its own;
    0 = all layers in one batch). While ``plans_enabled()`` is false the policy proposes
    nothing. The callables are read at every policy run. A coordinator started with
    ``policy=name`` then drives these plans through the product's own path.
    """
    from eplb_service.coordinator import policy as policy_module

    counter = iter(range(1 << 62))

    def churn_rebalance(current_phy2log, logical_load, shape: PlacementShape, *, bytes_per_expert: int = 1, **_ignored):
        current = np.asarray(current_phy2log, dtype=np.int64)
        if not plans_enabled():
            return policy_module.RebalancePlan(
                target_phy2log=current,
                batches=(),
                balancedness_before=1.0,
                balancedness_after=1.0,
                experts_moved=0,
                bytes_moved=0,
            )
        rng = np.random.default_rng([seed, next(counter)])
        layers = list(range(shape.num_layers))
        target = current.copy()
        target[layers] = churn_rows(current, layers, experts_per_rank(), shape.num_ranks, rng)
        per_batch = layers_per_batch() or len(layers)
        batches = []
        for begin in range(0, len(layers), per_batch):
            group = layers[begin : begin + per_batch]
            batches.append(
                policy_module.LayerBatch(
                    layers=tuple(group),
                    phy2log=target[group].copy(),
                    bytes_moved=remote_bytes(current, group, target[group], shape.num_ranks, bytes_per_expert),
                    gain=1.0,
                )
            )
        return policy_module.RebalancePlan(
            target_phy2log=target,
            batches=tuple(batches),
            balancedness_before=0.0,
            balancedness_after=1.0,
            experts_moved=int((current != target).sum()),
            bytes_moved=sum(b.bytes_moved for b in batches),
        )

    policy_module.register_policy(name, churn_rebalance)
    return name
