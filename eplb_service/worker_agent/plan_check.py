"""Checks a ``Plan`` must pass on the rank that receives it, before anything is staged.

The coordinator validated the plan already; the agent checks again against what it holds,
because a forged message or a coordinator bug must never reach its maps: the epoch it is
for, its layers and row shapes, the whole placement it produces, the map width (replicas
per expert), and the staging memory this rank may spend.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from eplb_service import protocol
from eplb_service.placement import PlacementError, PlacementShape, validate_phy2log


def check_plan(
    plan: protocol.Plan,
    shape: PlacementShape,
    epoch: int,
    phy2log_host: np.ndarray,
    map_width: int,
    rank: int,
    staging_budget_bytes: int | None = None,
    staging_bytes: Callable[[protocol.Plan, np.ndarray], int] | None = None,
) -> np.ndarray:
    """The plan's new rows ``[len(layers), P]`` int64, or :class:`PlacementError` naming what is wrong."""
    if plan.base_epoch != epoch:
        raise PlacementError(f"plan {plan.plan_id} is for epoch {plan.base_epoch}, this rank is at epoch {epoch}")
    rows = plan.phy2log.to_numpy("plan.phy2log")
    if not np.issubdtype(rows.dtype, np.integer):
        # Assigned into the int64 placement below, 0.9 would silently become expert 0.
        raise PlacementError(f"plan {plan.plan_id}: phy2log has dtype {rows.dtype}, expected an integer dtype")
    layers = list(plan.layers)
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= shape.num_layers:
        raise PlacementError(f"plan {plan.plan_id}: layers {layers} must be distinct and in [0, {shape.num_layers})")
    if rows.shape != (len(layers), shape.num_physical):
        raise PlacementError(
            f"plan {plan.plan_id}: phy2log shape {rows.shape}, expected {(len(layers), shape.num_physical)}"
        )
    full = phy2log_host.copy()
    full[layers] = rows
    validate_phy2log(full, shape)
    offsets = np.repeat(np.arange(len(layers)) * shape.num_logical, shape.num_physical)
    max_replicas = int(np.bincount(rows.ravel().astype(np.int64) + offsets).max())
    if max_replicas > map_width:
        raise PlacementError(
            f"plan {plan.plan_id}: an expert gets {max_replicas} replicas, more than the map width {map_width}"
        )
    rows = rows.astype(np.int64)
    if staging_budget_bytes is not None and staging_bytes is not None:
        need = staging_bytes(plan, rows)
        if need > staging_budget_bytes:
            raise PlacementError(
                f"plan {plan.plan_id} needs {need} bytes of staging on rank {rank}, more than "
                f"EPLB_SERVICE_STAGING_BUDGET_BYTES={staging_budget_bytes}; start the coordinator "
                "with --staging-budget-bytes at most that"
            )
    return rows
