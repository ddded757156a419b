"""Endpoint security: local by default, CURVE for remote TCP, refused keys and identities counted."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import zmq
from conftest import make_model
from coordinator_thread import CoordinatorThread

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.security import ClientCurve, SecurityError, generate_keys, is_local_endpoint
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_endpoints_are_recognised():
    assert is_local_endpoint("ipc:///tmp/x.sock") and is_local_endpoint("tcp://127.0.0.1:5555")
    assert is_local_endpoint("tcp://localhost:1") and is_local_endpoint("tcp://[::1]:1")
    assert not is_local_endpoint("tcp://0.0.0.0:5555") and not is_local_endpoint("tcp://10.1.2.3:5555")


def test_remote_tcp_needs_curve_or_insecure():
    with pytest.raises(SecurityError, match="--curve-dir DIR"):
        CoordinatorConfig(world_size=2, endpoint="tcp://0.0.0.0:5555")
    CoordinatorConfig(world_size=2, endpoint="tcp://0.0.0.0:5555", insecure=True)
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", "tcp://0.0.0.0:5555"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "reachable from other hosts" in out.stderr


def test_curve_admits_the_right_key_and_refuses_others(tmp_path):
    good = generate_keys(str(tmp_path / "keys"))
    other = generate_keys(str(tmp_path / "other"))
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = CoordinatorThread(
        CoordinatorConfig(world_size=2, endpoint=endpoint, curve_dir=str(tmp_path / "keys"))
    ).start()
    shape = PlacementShape(2, 6, 8, 2)
    agents = []
    try:
        right = ClientCurve.from_files(good["server_public"], good["agent_secret"])
        wrong = ClientCurve.from_files(good["server_public"], other["agent_secret"])
        agents = [
            WorkerAgent(make_model(0, shape), endpoint, GlooTransport(), curve=right).start(),
            WorkerAgent(make_model(1, shape), endpoint, GlooTransport(), curve=wrong).start(),
        ]
        deadline = time.monotonic() + 20
        while not agents[0].welcomed or coord.coordinator.metrics.messages_rejected.labels("auth")._value.get() < 1:
            assert time.monotonic() < deadline, "expected rank 0 welcomed and an auth refusal counted"
            time.sleep(0.05)
        assert not agents[1].welcomed
        assert sorted(coord.coordinator.registry.agents) == [0]
        status = fetch_status(endpoint, curve=right)
        assert status["ranks"][0]["rank"] == 0 and status["ranks"][1] is None
        with pytest.raises(TimeoutError):
            fetch_status(endpoint, timeout_s=0.5)  # no keys: no answer
    finally:
        for a in agents:
            a.stop()
        coord.stop()


def test_hello_from_a_mismatched_identity_is_refused_and_counted(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.IDENTITY, b"rank-7")
        sock.connect(endpoint)
        shape = protocol.ModelShape(2, 6, 8, 2, 36)
        sock.send(
            protocol.encode(
                protocol.Hello(
                    protocol_version=protocol.PROTOCOL_VERSION,
                    rank=0,
                    model=shape,
                    phy2log=protocol.NDArray.from_numpy(initial_phy2log(PlacementShape(2, 6, 8, 2))),
                    epoch=0,
                    step=0,
                    transport="gloo",
                )
            )
        )
        assert sock.poll(5000)
        reply = protocol.decode(sock.recv())
        assert isinstance(reply, protocol.Reject) and "identity b'rank-7' does not match rank 0" in reply.reason
        assert coord.coordinator.metrics.messages_rejected.labels("hello")._value.get() == 1
        assert coord.coordinator.registry.agents == {}
    finally:
        sock.close(0)
        ctx.term()
        coord.stop()
