"""The coordinator's configuration: one typed, validated object."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eplb_service.protocol import AgentConfig

if TYPE_CHECKING:
    import numpy as np


def default_endpoint() -> str:
    """A local-only ``ipc://`` socket in a per-user directory (created 0700 on bind)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{base}/eplb-service-{os.getuid()}/coordinator.sock"


@dataclass
class CoordinatorConfig:
    """Everything the coordinator needs; validated once in ``__post_init__``."""

    world_size: int
    """EP ranks = vLLM's DP x TP when expert parallelism is on."""
    endpoint: str = field(default_factory=default_endpoint)
    """ZeroMQ endpoint the ROUTER binds (``ipc://path`` or ``tcp://host:port``)."""
    metrics_port: int | None = None
    """HTTP port for /metrics, /livez, /readyz, /status; ``None`` = off, 0 = any free port."""
    http_host: str = "0.0.0.0"
    """Address the HTTP endpoints bind (probes and Prometheus scrape from outside the pod)."""
    policy: str = "migration"
    """Placement policy name (see ``coordinator.policy``)."""
    num_groups: int = 1
    num_nodes: int = 1
    rebalance_interval_steps: int = 200
    """Deployment steps between the end of one rebalance and the next attempt."""
    min_gain: float = 0.01
    """Start a plan only when projected model balancedness improves by at least this."""
    min_layer_gain: float = 0.0
    """Layers whose own balancedness gain is below this are left alone."""
    staging_budget_bytes: int = 1 << 30
    """Staging memory per rank; larger plans go in batches of layers."""
    load_half_life_steps: float = 200.0
    """Half-life of the decayed load window, in deployment steps."""
    min_window_steps: int = 50
    """Steps of load data needed before the first plan."""
    liveness_timeout_s: float = 5.0
    staging_timeout_s: float = 60.0
    voting_timeout_s: float = 60.0
    initial_placement: "np.ndarray | None" = None
    """``[L, P]`` placement (from ``eplb-plan``) the deployment is moved to first, whatever its gain."""
    curve_dir: str | None = None
    """Directory of CURVE keys (``eplb-coordinator keygen``); required for non-loopback TCP."""
    insecure: bool = False
    """Allow a non-loopback TCP endpoint without CURVE (logged as a warning)."""
    record_path: str | None = None
    """Record every load window to this ``.npz`` trace (see ``eplb_service.trace``)."""
    check_step_clock: bool = True
    """Compare the ranks' step clocks and halt on an offset (``step_clock``). Off only where
    ranks do not serve in lockstep (tests whose processes step on their own)."""
    step_clock_grace_s: float = 60.0
    """Plans wait this long for every rank's clock to be seen matching, then go ahead with a warning."""
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self) -> None:
        positive = (
            "world_size",
            "rebalance_interval_steps",
            "staging_budget_bytes",
            "load_half_life_steps",
            "liveness_timeout_s",
            "staging_timeout_s",
            "voting_timeout_s",
            "num_groups",
            "num_nodes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ValueError(f"endpoint {self.endpoint!r} must start with ipc:// or tcp://")
        from eplb_service.coordinator.policy import policy_names
        from eplb_service.security import check_endpoint_security

        check_endpoint_security(self.endpoint, self.curve_dir, self.insecure)
        if self.curve_dir and not os.path.isfile(os.path.join(self.curve_dir, "server.key_secret")):
            raise ValueError(
                f"curve_dir {self.curve_dir!r} has no server.key_secret: run `eplb-coordinator keygen {self.curve_dir}`"
            )

        if self.policy not in policy_names():
            raise ValueError(f"policy {self.policy!r} is not one of {policy_names()}")
        if self.min_gain < 0 or self.min_layer_gain < 0:
            raise ValueError(f"min_gain={self.min_gain} and min_layer_gain={self.min_layer_gain} must be >= 0")

    def replace(self, **changes) -> "CoordinatorConfig":
        return dataclasses.replace(self, **changes)
