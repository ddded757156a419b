"""``eplb-coordinator status``: ask a running coordinator for its status document."""

from __future__ import annotations

import json
import math
import os

import zmq

from eplb_service import protocol
from eplb_service.coordinator.registration_watch import rank_spans
from eplb_service.coordinator.socket_dir import (
    EndpointUnavailable,
    SocketFile,
    check_endpoint_dir,
    socket_file_path,
    socket_file_state,
)
from eplb_service.security import CLIENT_CERT_ENV, SERVER_CERT_ENV, ClientCurve, is_local_endpoint
from eplb_service.zmq_tcp import allow_ipv6

MAX_POLL_MS = 2**31 - 1
"""ZeroMQ's poll timeout is a C long of milliseconds (32 bits on some platforms): longer waits, about
24.8 days, are cut to this rather than overflow."""


def fetch_status(endpoint: str, timeout_s: float = 3.0, curve: ClientCurve | None = None) -> dict:
    """One ``StatusRequest`` round trip; raises ``TimeoutError`` naming the endpoint.

    An ``ipc://`` endpoint whose directory is not this user's private one is refused
    (:class:`~.socket_dir.UnsafeSocketDirectory`): whoever prepared it may answer instead.
    ``timeout_s`` must be a positive finite number (``ValueError`` otherwise): ZeroMQ reads a
    negative poll timeout as "wait forever", so ``-1`` would hang instead of failing.
    """
    poll_ms = _poll_ms(timeout_s)
    check_endpoint_dir(endpoint)
    _check_socket_file(endpoint)
    ctx = zmq.Context()
    sock = allow_ipv6(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    keys_from_env = curve is None
    curve = curve if curve is not None else ClientCurve.from_env()
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
    try:
        sock.connect(endpoint)
        sock.send(protocol.encode(protocol.StatusRequest()))
        if not sock.poll(poll_ms, zmq.POLLIN):
            raise TimeoutError(
                f"no answer from a coordinator at {endpoint} within {timeout_s}s"
                + _curve_hint(endpoint, curve is not None, keys_from_env)
            )
        reply = protocol.decode(sock.recv())
        if not isinstance(reply, protocol.StatusReply):
            raise protocol.ProtocolError(f"expected StatusReply, got {type(reply).__name__}")
        return json.loads(reply.status_json)
    finally:
        sock.close()
        ctx.term()


class NoCoordinatorSocket(TimeoutError):
    """Nothing at an ``ipc://`` endpoint's path: no coordinator can answer there (a ``TimeoutError``,
    so callers that wait for a coordinator to come up treat it as "not yet")."""


def _check_socket_file(endpoint: str) -> None:
    """Fail at once where no socket file exists: ZeroMQ would connect to the missing path without
    a word and keep retrying, and the caller waited out its whole timeout to read "no answer"."""
    path = socket_file_path(endpoint)
    if path is None:
        return
    if not os.path.lexists(path):
        raise NoCoordinatorSocket(
            f"no coordinator at {endpoint}: there is no socket file {path} (not started yet, stopped, "
            "or started with another --endpoint)"
        )
    # A file that is no socket, or a socket nobody listens on (its coordinator was killed, or has
    # not bound yet): ZeroMQ retries it as silently as a missing one.
    try:
        state = socket_file_state(path)
    except (OSError, EndpointUnavailable):
        return  # cannot tell: the request itself says what happens
    if state is SocketFile.NOT_A_SOCKET:
        raise NoCoordinatorSocket(
            f"no coordinator at {endpoint}: {path} is not a socket; expected a coordinator's ipc:// socket"
        )
    if state is SocketFile.STALE:
        raise NoCoordinatorSocket(
            f"no coordinator at {endpoint}: nothing listens on the socket file {path} (left by a coordinator "
            "that was killed, or one not listening yet)"
        )


def _poll_ms(timeout_s: float) -> int:
    """``timeout_s`` as ZeroMQ poll milliseconds (at least 1); refuses what is not a positive finite number."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"status timeout must be a positive finite number of seconds, got {timeout_s!r}")
    return min(max(1, math.ceil(timeout_s * 1000)), MAX_POLL_MS)


def _curve_hint(endpoint: str, with_keys: bool, keys_from_env: bool) -> str:
    """Why a ``tcp://`` coordinator may be silent: a CURVE server drops a handshake without keys, or with others.

    Without this, the timeout reads as "no coordinator there" when one is, refusing us.
    ``ipc://`` never uses CURVE, so it gets no hint.
    """
    if not endpoint.startswith("tcp://"):
        return ""
    env = f"{SERVER_CERT_ENV} (its server.key) and {CLIENT_CERT_ENV} (an agent.key_secret)"
    if with_keys:
        given = f"from {SERVER_CERT_ENV} / {CLIENT_CERT_ENV}" if keys_from_env else "given"
        return f"; a coordinator whose CURVE keys do not match the ones {given} does not answer either"
    if not is_local_endpoint(endpoint):
        return (
            f"; a coordinator on a non-loopback tcp:// endpoint uses CURVE keys (--curve-dir) unless started with "
            f"--insecure, and answers only a client that has them: set {env}"
        )
    return f"; if the coordinator uses CURVE keys (--curve-dir), it answers only a client that has them: set {env}"


def _ratio(value: float | None) -> str:
    """A balancedness for the table; ``null`` in the document (a number that was not finite) reads ``n/a``."""
    return "n/a" if value is None else f"{value:.3f}"


def format_status(status: dict) -> str:
    """A readable table: ranks, liveness, epoch, last plans, balancedness."""
    epoch = "none yet" if status["epoch"] is None else status["epoch"]
    deployment = status.get("deployment")  # absent from an older coordinator's document
    lines = [
        f"coordinator {status['endpoint']}  world {status['world_size']}  policy {status['policy']}  "
        f"epoch {epoch}  side-comm gen {status['comm_generation']}  uptime {status['uptime_s']:.0f}s",
        f"deployment {'none yet' if deployment is None else deployment or '(unknown: its ranks sent no id)'}",
    ]
    if status.get("halted"):
        lines.append(f"HALTED: {status['halted']}")
    missing = status.get("missing_ranks") or []
    if missing:
        lines.append(
            f"waiting for {len(missing)} of {status['world_size']} ranks: {rank_spans(missing)} "
            "(no plan starts until every rank is registered)"
        )
    if status.get("endpoint_unreachable"):
        lines.append(f"UNREACHABLE: {status['endpoint_unreachable']}")
    lines.append(
        f"{'rank':>4}  {'alive':5}  {'step':>8}  {'epoch':>5}  {'gen':>4}  {'seen':>6}  {'clock':>5}  node/pid"
    )
    for i, r in enumerate(status["ranks"]):
        if r is None:
            lines.append(f"{i:>4}  {'-':5}  (not registered)")
        else:
            offset = r.get("step_clock_offset")
            clock = "?" if offset is None else ("ok" if offset == 0 else f"{offset:+d}")
            lines.append(
                f"{r['rank']:>4}  {'yes' if r['alive'] else 'NO':5}  {r['step']:>8}  {r['epoch']:>5}  "
                f"{r['comm_generation']:>4}  {r['last_seen_s']:>5.1f}s  {clock:>5}  {r['node']}/{r['pid']}"
            )
    plans = status["plans"]
    lines.append(
        f"plans: proposed {plans['proposed']}  committed {plans['committed']}  aborted {plans['aborted']}  "
        f"diverged {plans['diverged']}  skipped {plans['skipped']}  |  moved {status['experts_moved']} experts, "
        f"{status['bytes_moved'] / 2**20:.1f} MiB"
    )
    if status.get("plan_in_flight"):
        p = status["plan_in_flight"]
        lines.append(f"in flight: plan #{p['number']} ({p['phase']}) layers {p['layers']}")
    for o in status["last_plans"][-5:]:
        at = f" at step {o['commit_step']}" if o["commit_step"] is not None else ""
        lines.append(
            f"  plan #{o['number']}: {o['phase']}{at}"
            f"{' (' + o['code'] + ')' if o.get('code') else ''}"
            f"  layers {o['layers']}  {o['experts_moved']} experts  {o['reason']}"
        )
    bal = status.get("balancedness")
    if bal:
        lines.append(
            f"balancedness: model {_ratio(bal['model'])}  per layer min {_ratio(bal['layer_min'])} "
            f"mean {_ratio(bal['layer_mean'])} max {_ratio(bal['layer_max'])}  ({status['load_reports']} load reports)"
        )
    else:
        lines.append("balancedness: no load reported yet")
    return "\n".join(lines)
