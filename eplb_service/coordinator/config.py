"""The coordinator's configuration: one typed, validated object."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from eplb_service.protocol import AgentConfig

if TYPE_CHECKING:
    import numpy as np


def check_endpoint(endpoint: str) -> None:
    """``ValueError`` unless ``endpoint`` is ``ipc://PATH`` or ``tcp://HOST:PORT`` with a usable port.

    ZeroMQ reads a port above 65535 modulo 65536 (``tcp://host:99999`` listens on 34463), so a
    typo would bind a port nobody configured; it is refused here instead. ``*`` (any free port)
    is ZeroMQ's own spelling and kept.
    """
    if endpoint.startswith("ipc://"):
        if not endpoint[len("ipc://") :]:
            raise ValueError(f"endpoint {endpoint!r} names no socket path; expected ipc://PATH")
        return
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint {endpoint!r} must start with ipc:// or tcp://")
    _, port = split_tcp_endpoint(endpoint)
    if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"endpoint {endpoint!r}: port {port!r} is not a port; expected 1-65535 (or * for any)")


def split_tcp_endpoint(endpoint: str) -> tuple[str, str]:
    """``tcp://HOST:PORT`` as ``(HOST, PORT)`` texts, an IPv6 HOST without its brackets
    (``tcp://[::1]:5555`` gives ``("::1", "5555")``); ``ValueError`` naming the part that is missing.

    Split at the last colon alone, ``tcp://[::1]`` read as host ``[:`` and port ``1]``."""
    rest = endpoint[len("tcp://") :]
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise ValueError(
                f"endpoint {endpoint!r}: the IPv6 address has no closing ']'; expected tcp://[ADDRESS]:PORT"
            )
        sep, port = tail[:1], tail[1:]
        if tail and sep != ":":
            raise ValueError(f"endpoint {endpoint!r}: expected ':PORT' after the IPv6 address, got {tail!r}")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint {endpoint!r} names no port; expected tcp://HOST:PORT")
    if not host:
        raise ValueError(f"endpoint {endpoint!r} names no host; expected tcp://HOST:PORT")
    return host, port


def check_agent_config(agent: AgentConfig) -> None:
    """``ValueError`` naming the first setting an agent would refuse.

    The agents decode their ``AgentConfig`` with its constraints, so a value the coordinator
    took unchecked (a negative fence timeout) would make every agent drop every ``Welcome``:
    ranks re-registering forever, nothing rebalanced. Checked here, by the same constraints,
    and for finiteness, which they do not cover (an infinite fence timeout blocks serving).
    """
    try:
        msgspec.convert(msgspec.to_builtins(agent), AgentConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"agent setting: {exc}") from None
    for name in agent.__struct_fields__:
        value = getattr(agent, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"agent setting {name}={value!r}: expected a finite number")


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
    http_host: str | None = None
    """Address the HTTP endpoints bind (probes and Prometheus scrape from outside the pod);
    ``None``: every interface, IPv4 and IPv6, on one port."""
    policy: str = "migration"
    """Placement policy name (see ``coordinator.policy``)."""
    num_groups: int = 1
    """Expert groups (consecutive blocks of experts, DeepSeek's routing groups)."""
    num_nodes: int = 1
    """Nodes of the deployment; above 1 with ``num_groups`` a multiple of it, both policies keep
    each group's experts on one node (``policy_hierarchy``); otherwise experts go to any node."""
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
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        check_endpoint(self.endpoint)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} is not a port; expected 0-65535 (0: any free port)")
        check_agent_config(self.agent)
        from eplb_service.coordinator.policy import policy_names
        from eplb_service.security import check_endpoint_security

        check_endpoint_security(self.endpoint, self.curve_dir, self.insecure)
        if self.curve_dir and not os.path.isdir(self.curve_dir):
            raise ValueError(
                f"--curve-dir {self.curve_dir!r} is not a directory; expected the DIR of `eplb-coordinator keygen DIR`"
            )
        if self.curve_dir and not os.path.isfile(os.path.join(self.curve_dir, "server.key_secret")):
            raise ValueError(
                f"--curve-dir {self.curve_dir!r} has no server.key_secret: "
                f"run `eplb-coordinator keygen {self.curve_dir}`"
            )

        if self.policy not in policy_names():
            raise ValueError(f"policy {self.policy!r} is not one of {policy_names()}")
        for name in ("min_gain", "min_layer_gain"):
            value = getattr(self, name)
            if not 0 <= value < 1:  # balancedness is at most 1: a gain of 1 or more never comes
                raise ValueError(f"{name}={value!r} must be a balancedness gain >= 0 and below 1")

    def replace(self, **changes) -> "CoordinatorConfig":
        return dataclasses.replace(self, **changes)
