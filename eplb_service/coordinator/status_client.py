"""``eplb-coordinator status``: ask a running coordinator for its status document."""

from __future__ import annotations

import json

import zmq

from eplb_service import protocol
from eplb_service.coordinator.socket_dir import check_endpoint_dir
from eplb_service.security import ClientCurve


def fetch_status(endpoint: str, timeout_s: float = 3.0, curve: ClientCurve | None = None) -> dict:
    """One ``StatusRequest`` round trip; raises ``TimeoutError`` naming the endpoint.

    An ``ipc://`` endpoint whose directory is not this user's private one is refused
    (:class:`~.socket_dir.UnsafeSocketDirectory`): whoever prepared it may answer instead.
    """
    check_endpoint_dir(endpoint)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve = curve if curve is not None else ClientCurve.from_env()
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
    try:
        sock.connect(endpoint)
        sock.send(protocol.encode(protocol.StatusRequest()))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise TimeoutError(f"no answer from a coordinator at {endpoint} within {timeout_s}s")
        reply = protocol.decode(sock.recv())
        if not isinstance(reply, protocol.StatusReply):
            raise protocol.ProtocolError(f"expected StatusReply, got {type(reply).__name__}")
        return json.loads(reply.status_json)
    finally:
        sock.close()
        ctx.term()


def format_status(status: dict) -> str:
    """A readable table: ranks, liveness, epoch, last plans, balancedness."""
    lines = [
        f"coordinator {status['endpoint']}  world {status['world_size']}  policy {status['policy']}  "
        f"epoch {status['epoch']}  side-comm gen {status['comm_generation']}  uptime {status['uptime_s']:.0f}s",
    ]
    if status.get("halted"):
        lines.append(f"HALTED: {status['halted']}")
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
            f"balancedness: model {bal['model']:.3f}  per layer min {bal['layer_min']:.3f} "
            f"mean {bal['layer_mean']:.3f} max {bal['layer_max']:.3f}  ({status['load_reports']} load reports)"
        )
    else:
        lines.append("balancedness: no load reported yet")
    return "\n".join(lines)
