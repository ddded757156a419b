"""Where rank 0's rendezvous store listens and which address it advertises (``worker_agent.rendezvous``)."""

from __future__ import annotations

import pytest

from eplb_service.worker_agent.rendezvous import (
    RendezvousError,
    advertised_host,
    store_host_from_env,
    store_port_from_env,
)


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


@pytest.mark.parametrize("text", ["10.0.0.1:29500", "tcp://10.0.0.1", "node 1", "[fd00::1]", "host/x", "store:1"])
def test_a_store_host_with_a_port_scheme_or_blank_is_refused_naming_it(text):
    """The other ranks dial it as it is: such a value failed every rank's store connection late."""
    with pytest.raises(RendezvousError) as exc:
        store_host_from_env({"EPLB_SERVICE_STORE_HOST": text})
    assert f"EPLB_SERVICE_STORE_HOST={text!r}" in str(exc.value) and "without a port" in str(exc.value)


@pytest.mark.parametrize("text", ["10.0.0.7", "node-3.cluster.local", "fd00::7", " 10.0.0.7 "])
def test_a_store_host_address_or_name_is_advertised_as_given(text):
    assert store_host_from_env({"EPLB_SERVICE_STORE_HOST": text}) == text.strip()
    assert advertised_host("tcp://127.0.0.1:5555", {"EPLB_SERVICE_STORE_HOST": text}) == text.strip()
    assert store_host_from_env({}) is None and store_host_from_env({"EPLB_SERVICE_STORE_HOST": " "}) is None


@pytest.mark.parametrize(
    "endpoint",
    ["ipc:///tmp/c.sock", "tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "tcp://*:5555"],
)
def test_a_coordinator_on_this_host_makes_the_store_advertise_ipv4_loopback(endpoint):
    """The store listens on 0.0.0.0: on one host the ranks dial IPv4 loopback, whatever name
    (``localhost`` may resolve to ``::1`` first) the coordinator's endpoint uses."""
    assert advertised_host(endpoint, {}) == "127.0.0.1"
