"""The agent as the vLLM plugin builds it: the core agent with this instance's settings.

``EPLB_SERVICE_REPORT_INTERVAL_STEPS`` / ``EPLB_SERVICE_THROTTLE_BYTES_PER_S`` replace the
coordinator's values when its ``Welcome`` arrives; ``EPLB_SERVICE_STAGING_BUDGET_BYTES``
makes this rank refuse (``Failed``) a plan batch whose staging would exceed it, which aborts
the batch on every rank with the maps untouched. Both are features of the core agent
(``config_overrides``, ``staging_budget_bytes``); this name keeps the plugin's keywords.
"""

from __future__ import annotations

from eplb_service.worker_agent.agent import WorkerAgent


class VllmWorkerAgent(WorkerAgent):
    def __init__(self, *args, overrides: dict | None = None, staging_budget_bytes: int | None = None, **kwargs) -> None:
        super().__init__(*args, staging_budget_bytes=staging_budget_bytes, config_overrides=overrides, **kwargs)
