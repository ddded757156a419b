"""The coordinator's status document: what ``eplb-coordinator status`` and ``/status`` show.

Ranks (liveness, step, epoch, side-communicator generation, step-clock offset; ``missing_ranks``:
those without a live agent, for which every plan waits), the plan in
flight, the last outcomes, the counts, and balancedness: read from the coordinator's parts,
never changing them. ``epoch`` is ``null`` until the ranks first agree on a placement (a
number there would read as a placement that exists); ``deployment`` is the deployment id the
ranks registered with (``""``: they sent none), ``null`` before any rank registered.

:func:`status_json` is how the document leaves the process (``/status``, ``StatusReply``,
``status --json``): strict JSON (RFC 8259), where a number that is not finite reads ``null``.
Python's ``json.dumps`` writes ``NaN``/``Infinity`` by default, tokens that JavaScript's
``JSON.parse``, Go's ``encoding/json`` and ``jq`` refuse.
"""

from __future__ import annotations

import json
import math
import os
import time

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.guards import DivergenceGuard
from eplb_service.coordinator.placement_book import PlacementBook
from eplb_service.coordinator.plan_runner import PlanRunner
from eplb_service.coordinator.registry import Registry
from eplb_service.coordinator.side_comm import SideComm


def status_document(
    cfg: CoordinatorConfig,
    registry: Registry,
    book: PlacementBook,
    guard: DivergenceGuard,
    plans: PlanRunner,
    side_comm: SideComm,
    started_monotonic: float,
    endpoint_unreachable: str | None = None,
) -> dict:
    """The document; ``started_monotonic`` is the coordinator's start on ``time.monotonic()``: an
    uptime from wall clocks goes negative or leaps when NTP or an operator sets the clock."""
    now = time.monotonic()
    current = book.balancedness()
    clocks = guard.clock_states([r.rank for r in registry.alive])
    ranks = []
    for rank in range(cfg.world_size):
        record = registry.agents.get(rank)
        clock = clocks.get(rank)
        ranks.append(
            None
            if record is None
            else {
                "rank": rank,
                "alive": record.alive,
                "node": record.node,
                "pid": record.pid,
                "last_seen_s": round(now - record.last_seen, 3),
                "step": record.step,
                "load_reported_to_step": record.load_reported_to,
                "epoch": record.epoch,
                "comm_generation": record.comm_generation,
                "internal_errors": record.internal_errors,
                "step_clock_offset": None if clock is None else clock.offset,
            }
        )
    plan = plans.plan
    return {
        "world_size": cfg.world_size,
        "endpoint": cfg.endpoint,
        "deployment": registry.deployment,
        "policy": cfg.policy,
        "pid": os.getpid(),
        "uptime_s": round(now - started_monotonic, 3),
        "epoch": book.agreed_epoch,
        "comm_generation": side_comm.generation,
        "ranks": ranks,
        "missing_ranks": sorted(set(range(cfg.world_size)) - {r.rank for r in registry.alive}),
        "halted": guard.halted_reason,
        "endpoint_unreachable": endpoint_unreachable,
        "plan_in_flight": None
        if plan is None
        else {
            "number": plans.number(plan.plan_id),
            "plan_id": plan.plan_id,
            "phase": plan.phase.value,
            "layers": plan.layers,
            "outcome_unknown": plan.outcome_unknown,
            "decided": None if plan.decision is None else {"commit": plan.decision[1], "commit_step": plan.decision[0]},
        },
        "plans": dict(plans.counts),
        "bytes_moved": plans.bytes_moved_total,
        "experts_moved": plans.experts_moved_total,
        "last_plans": [o.__dict__ for o in plans.outcomes[-10:]],
        "load_reports": book.window.reports if book.window else 0,
        "load_persistence": plans.last_persistence,
        "spend": {
            "scale": plans.spend.scale,
            "moved": plans.spend.spent,
            "deepseek_moved": plans.spend.reference,
            "balance_lead": plans.spend.lead,
            "price_scale": plans.spend.price_scale,
        },
        "balancedness": None
        if current is None
        else {
            "model": current[0],
            "layer_min": float(current[1].min()),
            "layer_mean": float(current[1].mean()),
            "layer_max": float(current[1].max()),
        },
        "max_step_seen": book.max_step_seen,
    }


def _finite(value: object) -> object:
    """``value`` with every float that is not finite replaced by ``None``, in dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def status_json(document: dict, indent: int | None = None) -> str:
    """The status document as strict JSON: no ``NaN`` or ``Infinity`` tokens (they read ``null``)."""
    return json.dumps(_finite(document), indent=indent, allow_nan=False)
