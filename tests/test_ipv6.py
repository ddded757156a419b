"""IPv6: a coordinator on an IPv6 address takes agents and status clients; HTTP answers both families.

Before, every ZeroMQ socket was IPv4 only (ZeroMQ's default), so ``--endpoint tcp://[::1]:5555``
ended at start with "No such device", and the HTTP endpoints bound ``0.0.0.0`` only: in an
IPv6-only cluster neither agents nor probes could reach the coordinator.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from conftest import make_model
from coordinator_thread import CoordinatorThread

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.http_endpoints import listen_socket
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport


def _ipv6_loopback_port() -> int | None:
    """A free port on ``::1``, or ``None`` where this machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


needs_ipv6 = pytest.mark.skipif(_ipv6_loopback_port() is None, reason="no IPv6 loopback on this machine")


@needs_ipv6
def test_agents_and_status_reach_a_coordinator_on_an_ipv6_endpoint():
    endpoint = f"tcp://[::1]:{_ipv6_loopback_port()}"
    coord = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint, metrics_port=0)).start()
    shape = PlacementShape(2, 6, 8, 2)
    agents = []
    try:
        agents = [WorkerAgent(make_model(r, shape), endpoint, GlooTransport()).start() for r in (0, 1)]
        deadline = time.monotonic() + 20
        while not all(a.welcomed for a in agents):
            assert time.monotonic() < deadline, "expected both agents welcomed over IPv6"
            time.sleep(0.05)
        status = fetch_status(endpoint, timeout_s=5)
        assert [r["rank"] for r in status["ranks"]] == [0, 1]
        port = coord.coordinator.metrics_port
        for host in ("127.0.0.1", "[::1]"):  # one port, both families
            with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=10) as reply:
                assert reply.status == 200 and reply.read() == b"ready\n"
    finally:
        for a in agents:
            a.stop()
        coord.stop()


@needs_ipv6
def test_the_default_http_listener_takes_both_families_on_one_port():
    sock = listen_socket(None, 0)
    try:
        port = sock.getsockname()[1]
        assert sock.family == socket.AF_INET6
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as client:
                client.settimeout(5)
                client.connect((host, port))
        with socket.socket(socket.AF_INET) as taken:  # a port held on IPv4 is in use for the listener too
            taken.bind(("0.0.0.0", 0))
            taken.listen(1)
            with pytest.raises(OSError):
                listen_socket(None, taken.getsockname()[1]).close()
    finally:
        sock.close()


@needs_ipv6
def test_rank_0_advertises_its_ipv6_route_to_a_coordinator_named_by_an_aaaa_record_alone(monkeypatch):
    """Before: the name was looked up as IPv4 only (an ``AF_INET`` socket's ``connect``), which
    fails for an AAAA-only name, so rank 0 advertised ``gethostbyname(gethostname())``, an IPv4
    address the other ranks of an IPv6-only network cannot reach."""
    from eplb_service.worker_agent import rendezvous

    name = "coordinator.v6only.invalid"
    real = socket.getaddrinfo

    def aaaa_only(host, *args, **kwargs):
        if host == name:
            return [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", 9, 0, 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", aaaa_only)
    assert rendezvous.advertised_host(f"tcp://{name}:5555", {}) == "::1"
    assert rendezvous.advertised_host(f"tcp://{name}:5555", {"EPLB_SERVICE_STORE_HOST": "fd00::7"}) == "fd00::7"
