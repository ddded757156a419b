"""Endpoint security: local by default, CURVE for remote TCP, refused keys and identities counted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth
from conftest import free_port, make_model
from coordinator_thread import CoordinatorThread
from dir_modes import mode_of, shared_dir

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.security import (
    CLIENT_CERT_ENV,
    SERVER_CERT_ENV,
    ClientCurve,
    KeyDirectoryError,
    SecurityError,
    generate_keys,
    is_local_endpoint,
)
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport


def test_local_endpoints_are_recognised():
    assert is_local_endpoint("ipc:///tmp/x.sock") and is_local_endpoint("tcp://127.0.0.1:5555")
    assert is_local_endpoint("tcp://localhost:1") and is_local_endpoint("tcp://[::1]:1")
    assert not is_local_endpoint("tcp://0.0.0.0:5555") and not is_local_endpoint("tcp://10.1.2.3:5555")


def test_a_host_name_is_local_only_when_every_address_it_resolves_to_is_loopback(monkeypatch):
    """A name that resolves to a loopback and a routable address binds where other hosts reach it."""
    resolved = {
        "mixed.example": ["127.0.0.1", "10.1.2.3"],
        "loop.example": ["127.0.0.1", "::1"],
    }
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in resolved[host]],
    )
    assert is_local_endpoint("tcp://loop.example:5555")
    assert not is_local_endpoint("tcp://mixed.example:5555")
    with pytest.raises(SecurityError, match="reachable from other hosts"):
        CoordinatorConfig(world_size=2, endpoint="tcp://mixed.example:5555")


@pytest.mark.parametrize("only", [SERVER_CERT_ENV, CLIENT_CERT_ENV])
def test_an_agent_given_one_of_its_two_certificates_is_told_to_set_both(monkeypatch, tmp_path, only):
    """Not a traceback from the certificate loader over a missing path: the error names both variables."""
    monkeypatch.delenv(SERVER_CERT_ENV, raising=False)
    monkeypatch.delenv(CLIENT_CERT_ENV, raising=False)
    monkeypatch.setenv(only, str(tmp_path / "server.key"))
    with pytest.raises(SecurityError, match=f"set both {SERVER_CERT_ENV} and {CLIENT_CERT_ENV}, or neither"):
        ClientCurve.from_env()


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


def test_curve_admits_the_right_key_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.delenv(SERVER_CERT_ENV, raising=False)
    monkeypatch.delenv(CLIENT_CERT_ENV, raising=False)
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
        with pytest.raises(TimeoutError, match=f"uses CURVE keys .*set {SERVER_CERT_ENV} .* and {CLIENT_CERT_ENV}"):
            fetch_status(endpoint, timeout_s=0.5)  # no keys: no answer, and the message says which keys
    finally:
        for a in agents:
            a.stop()
        coord.stop()


def test_keygen_makes_secrets_0600_and_directories_0700_whatever_the_umask(tmp_path):
    """Before: the secrets were 0644 (0666 under umask 0), readable by every local user."""
    old = os.umask(0)
    try:
        keys = generate_keys(str(tmp_path / "keys"))
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "keys") == 0o700 and mode_of(tmp_path / "keys" / "clients") == 0o700
    assert {role: mode_of(path) for role, path in keys.items()} == {
        "server_public": 0o644,
        "server_secret": 0o600,
        "agent_public": 0o644,
        "agent_secret": 0o600,
    }
    assert keys["agent_public"] == str(tmp_path / "keys" / "clients" / "agent.key")
    assert sorted(os.listdir(tmp_path / "keys")) == ["agent.key_secret", "clients", "server.key", "server.key_secret"]
    for name in ("server", "agent"):
        public, none = zmq.auth.load_certificate(keys[f"{name}_public"])
        same_public, secret = zmq.auth.load_certificate(keys[f"{name}_secret"])
        assert none is None and public == same_public and secret is not None
        assert zmq.curve_public(secret) == public


def test_keygen_replaces_an_old_readable_secret_with_a_new_0600_file(tmp_path):
    """Writing into the old file would keep its 0644: the new key would be readable by others."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    old = keys / "server.key_secret"
    old.write_text("old")
    old.chmod(0o644)
    generate_keys(str(keys))
    assert mode_of(old) == 0o600 and "secret-key" in old.read_text()
    assert not [name for name in os.listdir(keys) if name.startswith(".")], "a staged file was left behind"


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770], ids=lambda mode: f"{mode:04o}")
def test_keygen_refuses_a_directory_others_can_write_to_and_leaves_it_alone(tmp_path, mode):
    """Before: `keygen DIR` made any existing DIR 0700 (`keygen .`, `keygen ~`, `keygen /tmp` as root)."""
    directory = shared_dir(tmp_path / "shared", mode)
    with pytest.raises(KeyDirectoryError) as refused:
        generate_keys(str(directory))
    message = str(refused.value)
    assert f"key directory {str(directory)!r} has mode {mode:04o} and owner uid {os.geteuid()}" in message
    assert "left as it is" in message and "does not exist yet" in message and "chmod" not in message
    assert mode_of(directory) == mode and os.listdir(directory) == []


def test_keygen_refuses_a_directory_others_can_read_with_the_chmod_to_run(tmp_path):
    directory = shared_dir(tmp_path / "mine", 0o755)
    with pytest.raises(KeyDirectoryError, match=f"has mode 0755 .*`chmod 700 {directory}`"):
        generate_keys(str(directory))
    assert mode_of(directory) == 0o755 and os.listdir(directory) == []


def test_keygen_takes_an_existing_private_directory_as_it_is(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    (directory / "notes").write_text("kept")
    generate_keys(str(directory))
    assert mode_of(directory) == 0o700 and (directory / "notes").read_text() == "kept"


def test_keygen_refuses_a_symlinked_directory(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(KeyDirectoryError, match="is a symlink"):
        generate_keys(str(tmp_path / "link"))
    assert os.listdir(target) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_keygen_refuses_another_users_private_directory(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(
        KeyDirectoryError, match="has mode 0700 and owner uid 65534; expected mode 0700 and owner uid 0"
    ):
        generate_keys(str(directory))
    assert os.listdir(directory) == []


def test_keygen_on_a_path_that_cannot_be_a_directory_is_one_clear_error(tmp_path):
    """Before: NotADirectoryError / FileNotFoundError tracebacks."""
    (tmp_path / "file").write_text("")
    cases = {
        str(tmp_path / "file"): "is not a directory; expected a directory of this user's",
        str(tmp_path / "file" / "keys"): "cannot create the key directory .*: Not a directory",
        "/proc/nope": "cannot create the key directory '/proc/nope': No such file or directory",
        "": "needs a directory for the keys; got an empty path",
    }
    for path, reason in cases.items():
        with pytest.raises(KeyDirectoryError, match=reason) as refused:
            generate_keys(path)
        assert isinstance(refused.value, ValueError) and "\n" not in str(refused.value)


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
