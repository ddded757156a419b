"""Where rank 0's rendezvous store listens and which address it advertises (``worker_agent.rendezvous``)."""

from __future__ import annotations

import pytest

from eplb_service.worker_agent.rendezvous import RendezvousError, advertised_host, store_port_from_env


@pytest.mark.parametrize("text", ["0", "65536", "-1", "29500x", "any"])
def test_a_store_port_out_of_range_or_not_a_number_is_refused_naming_it(text):
    """An operator who fixed the port (a NetworkPolicy names it) must not silently get a random one."""
    with pytest.raises(RendezvousError) as exc:
        store_port_from_env({"EPLB_SERVICE_STORE_PORT": text})
    assert "EPLB_SERVICE_STORE_PORT=" in str(exc.value) and text in str(exc.value)
    assert "expected a port number in [1, 65535]" in str(exc.value)


def test_the_store_port_is_any_free_one_unless_fixed():
    assert store_port_from_env({}) == 0
    assert store_port_from_env({"EPLB_SERVICE_STORE_PORT": "1"}) == 1
    assert store_port_from_env({"EPLB_SERVICE_STORE_PORT": "65535"}) == 65535


@pytest.mark.parametrize(
    "endpoint",
    ["ipc:///tmp/c.sock", "tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "tcp://*:5555"],
)
def test_a_coordinator_on_this_host_makes_the_store_advertise_ipv4_loopback(endpoint):
    """The store listens on 0.0.0.0: on one host the ranks dial IPv4 loopback, whatever name
    (``localhost`` may resolve to ``::1`` first) the coordinator's endpoint uses."""
    assert advertised_host(endpoint, {}) == "127.0.0.1"
