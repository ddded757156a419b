"""The plugin's configuration: ``EPLB_SERVICE_*`` environment variables, read once.

vLLM starts its engine and worker processes itself, so the environment is the one
channel that reaches every one of them. The plugin is inert unless
``EPLB_SERVICE_ENDPOINT`` is set. The coordinator decides the deployment-wide knobs
(``eplb-coordinator --report-interval-steps ...``); the variables below, when set,
override them for the ranks of this vLLM instance only.
"""

from __future__ import annotations

import difflib
import math
import os
from argparse import ArgumentTypeError
from collections.abc import Mapping
from dataclasses import dataclass

from eplb_service.coordinator.arg_types import connect_endpoint
from eplb_service.deployment_id import deployment_id_problem
from eplb_service.logutil import parse_level
from eplb_service.worker_agent.nccl_lib import MAX_CHANNELS
from eplb_service.worker_agent.rendezvous import (
    STORE_HOST_ENV,
    STORE_PORT_ENV,
    RendezvousError,
    store_host_from_env,
    store_port_from_env,
)

ENDPOINT = "EPLB_SERVICE_ENDPOINT"
TRANSPORT = "EPLB_SERVICE_TRANSPORT"
STAGING_BUDGET_BYTES = "EPLB_SERVICE_STAGING_BUDGET_BYTES"
THROTTLE_BYTES_PER_S = "EPLB_SERVICE_THROTTLE_BYTES_PER_S"
REPORT_INTERVAL_STEPS = "EPLB_SERVICE_REPORT_INTERVAL_STEPS"
SIDE_MAX_CTAS = "EPLB_SERVICE_SIDE_MAX_CTAS"
LOG_LEVEL = "EPLB_SERVICE_LOG_LEVEL"
LOG_FORMAT = "EPLB_SERVICE_LOG_FORMAT"
DEPLOYMENT = "EPLB_SERVICE_DEPLOYMENT"

TRANSPORTS = ("auto", "gloo", "nccl", "copy-engine", "prefer-copy-engine")

VARIABLES = (
    ENDPOINT,
    TRANSPORT,
    STAGING_BUDGET_BYTES,
    THROTTLE_BYTES_PER_S,
    SIDE_MAX_CTAS,
    REPORT_INTERVAL_STEPS,
    LOG_LEVEL,
    LOG_FORMAT,
    DEPLOYMENT,
    "EPLB_SERVICE_CURVE_SERVER_CERT",  # security.SERVER_CERT_ENV, named here: importing it imports zmq
    "EPLB_SERVICE_CURVE_CLIENT_CERT",  # security.CLIENT_CERT_ENV
    STORE_PORT_ENV,
    STORE_HOST_ENV,
)
"""Every ``EPLB_SERVICE_*`` variable a vLLM process reads (README's table)."""

PREFIX = "EPLB_SERVICE_"
TEST_PREFIX = "EPLB_SERVICE_TEST_"
"""The test suite's own variables (``tests/vllm``): no vLLM process reads them, nor warns about them."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``EPLB_SERVICE_*`` variable no vLLM process reads, naming the known one it is
    closest to: a misspelt name (the staging budget's without its ``_BYTES``) was ignored without
    a word, so the setting it was meant to make silently did not happen."""
    lines = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in VARIABLES or name.startswith(TEST_PREFIX):
            continue
        # A name cut short or run on (the throttle's without _BYTES_PER_S), else the closest spelling, compared
        # without the prefix every name shares, which would make any two look alike.
        close = [v for v in VARIABLES if v.startswith(name) or name.startswith(v)] or [
            PREFIX + match
            for match in difflib.get_close_matches(name[len(PREFIX) :], [v[len(PREFIX) :] for v in VARIABLES], n=1)
        ]
        hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(VARIABLES)}"
        lines.append(f"{name} is set, but eplb-service reads no such variable (ignored); {hint}")
    return lines


class ConfigError(ValueError):
    """A variable that cannot be used as it is; the message names it and its value."""


@dataclass(frozen=True)
class PluginConfig:
    """What the ``EPLB_SERVICE_*`` variables say; validated in ``__post_init__``."""

    endpoint: str
    """``EPLB_SERVICE_ENDPOINT``: the coordinator's ZeroMQ endpoint (``ipc://`` or ``tcp://``)."""
    transport: str = "auto"
    """``EPLB_SERVICE_TRANSPORT``: side communicator for expert weights. ``auto`` = gloo for
    CPU workers, ``nccl`` (CuPy NCCL on a side stream) for GPU workers. ``copy-engine``
    forces CUDA IPC peer copies; ``prefer-copy-engine`` uses them when every pair of ranks
    shares a host and peer access, else ``nccl``, chosen at every rendezvous. ``auto`` stays
    on NCCL until the copy-engine path has been measured against it on two GPUs (issue 15).
    Set it alike on every rank."""
    staging_budget_bytes: int | None = None
    """``EPLB_SERVICE_STAGING_BUDGET_BYTES``: most staging memory this rank allocates for one
    plan batch; a batch that needs more fails on this rank (and so aborts everywhere). Start
    the coordinator with the same ``--staging-budget-bytes`` so it cuts plans to fit."""
    throttle_bytes_per_s: float | None = None
    """``EPLB_SERVICE_THROTTLE_BYTES_PER_S``: per-rank streaming cap, overriding the
    coordinator's (``0`` = unthrottled)."""
    report_interval_steps: int | None = None
    """``EPLB_SERVICE_REPORT_INTERVAL_STEPS``: steps per load report, overriding the coordinator's."""
    side_max_ctas: int | None = None
    """``EPLB_SERVICE_SIDE_MAX_CTAS``: most CTAs (thread blocks) the NCCL side communicator's
    kernels take, for that communicator only (unset: NCCL's choice); fewer leave the serving
    kernels more SMs and stream slower. Only for ``nccl``."""
    log_level: str = "INFO"
    """``EPLB_SERVICE_LOG_LEVEL``: level of the ``eplb_service`` loggers in vLLM's processes."""
    log_format: str = "text"
    """``EPLB_SERVICE_LOG_FORMAT``: ``json`` writes those lines as the coordinator's ``--log-format
    json`` does (one object per line, with its ``tag``); vLLM's own lines stay as vLLM writes them."""
    deployment: str = ""
    """``EPLB_SERVICE_DEPLOYMENT``: the id every rank of this vLLM deployment sends in its ``Hello``
    (``""``: derived from vLLM's configuration where the adapter can, see
    ``adapter.deployment_id``). A coordinator admits no rank of another id while ranks of its
    deployment are alive, so a second vLLM pointed at it by mistake cannot join the first."""

    def __post_init__(self) -> None:
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ConfigError(f"{ENDPOINT}={self.endpoint!r}: expected ipc://PATH or tcp://HOST:PORT")
        try:  # as `eplb-coordinator status --endpoint` checks it: ZeroMQ would dial port 99999 as 34463
            connect_endpoint(self.endpoint)
        except ArgumentTypeError as exc:
            raise ConfigError(f"{ENDPOINT}={self.endpoint!r}: {exc}") from None
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"{TRANSPORT}={self.transport!r}: expected one of {', '.join(TRANSPORTS)}")
        try:
            parse_level(self.log_level, LOG_LEVEL)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"{LOG_FORMAT}={self.log_format!r}: expected 'text' or 'json'")
        problem = deployment_id_problem(self.deployment) if self.deployment else None
        if problem is not None:
            raise ConfigError(f"{DEPLOYMENT}={self.deployment!r}: {problem}")
        if self.side_max_ctas is not None and not 1 <= self.side_max_ctas <= MAX_CHANNELS:
            raise ConfigError(f"{SIDE_MAX_CTAS}={self.side_max_ctas}: expected 1..{MAX_CHANNELS} CTAs")

    def agent_overrides(self) -> dict[str, int | float]:
        """The coordinator's ``AgentConfig`` fields this instance overrides."""
        out: dict[str, int | float] = {}
        if self.throttle_bytes_per_s is not None:
            out["throttle_bytes_per_s"] = self.throttle_bytes_per_s
        if self.report_interval_steps is not None:
            out["report_interval_steps"] = self.report_interval_steps
        return out


def _number(environ: Mapping[str, str], name: str, kind: type, minimum: float, inclusive: bool):
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise ConfigError(f"{name}={text!r}: expected a finite value {'>=' if inclusive else '>'} {minimum}")
    return value


def from_env(environ: Mapping[str, str] | None = None) -> PluginConfig | None:
    """The plugin's configuration, or ``None`` (inert) when ``EPLB_SERVICE_ENDPOINT`` is unset."""
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT, "").strip()
    if not endpoint:
        return None
    try:  # read by rank 0's agent when it hosts the rendezvous store: checked here, before vLLM starts
        store_port_from_env(env)
        store_host_from_env(env)  # dialled by the other ranks: a port or scheme in it fails them late
    except RendezvousError as exc:
        raise ConfigError(str(exc)) from None
    return PluginConfig(
        endpoint=endpoint,
        transport=env.get(TRANSPORT, "auto").strip().lower() or "auto",
        staging_budget_bytes=_number(env, STAGING_BUDGET_BYTES, int, 0, inclusive=False),
        throttle_bytes_per_s=_number(env, THROTTLE_BYTES_PER_S, float, 0, inclusive=True),
        report_interval_steps=_number(env, REPORT_INTERVAL_STEPS, int, 0, inclusive=False),
        side_max_ctas=_number(env, SIDE_MAX_CTAS, int, 0, inclusive=False),
        log_level=env.get(LOG_LEVEL, "INFO").strip() or "INFO",
        log_format=env.get(LOG_FORMAT, "text").strip().lower() or "text",
        deployment=env.get(DEPLOYMENT, "").strip(),
    )
