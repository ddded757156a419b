"""The agent as the vLLM plugin runs it: the core agent plus this instance's overrides.

``EPLB_SERVICE_REPORT_INTERVAL_STEPS`` / ``EPLB_SERVICE_THROTTLE_BYTES_PER_S`` replace
the coordinator's values when its ``Welcome`` arrives; ``EPLB_SERVICE_STAGING_BUDGET_BYTES``
makes this rank refuse (``Failed``) a plan batch whose staging would exceed it, which
aborts the batch on every rank with the maps untouched.
"""

from __future__ import annotations

import msgspec

from eplb_service import protocol as P
from eplb_service.placement import PlacementError
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.schedule import build_schedule


class VllmWorkerAgent(WorkerAgent):
    def __init__(self, *args, overrides: dict | None = None, staging_budget_bytes: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overrides = dict(overrides or {})
        self.staging_budget_bytes = staging_budget_bytes

    def _on_welcome(self, msg: P.Welcome) -> None:
        if self.overrides:
            msg = msgspec.structs.replace(msg, config=msgspec.structs.replace(msg.config, **self.overrides))
        super()._on_welcome(msg)

    def staging_bytes(self, plan: P.Plan, rows) -> int:
        """Bytes of staging this rank needs for ``plan`` (one row per incoming expert)."""
        schedule = build_schedule(self.phy2log_host[list(plan.layers)], rows, self.shape.num_ranks, self.ranks_per_node)
        return len(schedule.per_rank[self.rank].staging) * self.bytes_per_expert

    def _validate_plan(self, plan: P.Plan):
        rows = super()._validate_plan(plan)
        if self.staging_budget_bytes is not None:
            need = self.staging_bytes(plan, rows)
            if need > self.staging_budget_bytes:
                raise PlacementError(f"plan {plan.plan_id} needs {need} bytes of staging on rank {self.rank}, more than "
                                     f"EPLB_SERVICE_STAGING_BUDGET_BYTES={self.staging_budget_bytes}; start the coordinator "
                                     "with --staging-budget-bytes at most that")
        return rows
