"""Network faults on a ``tcp://`` coordinator link, at the byte level (``tests/tcp_link.py``).

A coordinator on another host is reached over TCP; what a network does to that link is not
what a killed process does: a peer can vanish without closing (every byte held, no FIN, no
RST), a partition heals and the held bytes arrive late, a WAN link adds jitter. Each
scenario runs simulated serving ranks (real processes, real serving all-to-alls, the exact
output check) and checks the promises: serving never waits past the fence bound, every plan
is applied on every rank at one step or on none, the coordinator names the unreachable rank,
and rebalancing resumes after the partition heals with nothing restarted.
"""

from __future__ import annotations

import time

import pytest
import zmq
from coordinator_thread import CoordinatorThread
from sim_cluster import SimCluster, assert_all_or_none, free_port
from tcp_link import TcpLink
from test_fault_scenarios import SHALLOW, WORLD, sim_config

FENCE_S = 1.0


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def start(links_kw: dict | None = None, steps: int = 1500, **cfg_changes):
    """A coordinator on ``tcp://``, one ``TcpLink`` per rank, and the ranks behind them."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = CoordinatorThread(sim_config(endpoint, **cfg_changes)).start()
    links = [TcpLink(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), **(links_kw or {})).start() for _ in range(WORLD)]
    per_rank = {r: {"coordinator_endpoint": links[r].endpoint} for r in range(WORLD)}
    cluster = SimCluster(WORLD, endpoint, steps=steps, seed=3, model=SHALLOW, step_sleep_s=0.005, per_rank=per_rank)
    return coord, links, cluster.start()


def stop(coord, links, cluster) -> None:
    """The ranks first (they say goodbye through their links), then the links, then the coordinator."""
    cluster.stop()
    for link in links:
        link.stop()
    coord.stop()


def committed(coord) -> int:
    return coord.coordinator.counts["committed"]


def alive(coord, rank: int) -> bool:
    record = coord.coordinator.registry.agents.get(rank)
    return record is not None and record.alive


def check_serving(results) -> None:
    assert_all_or_none(results, WORLD)
    stalls = {r: results[r]["step_time_p99_ms"] for r in results}
    assert all(ms < FENCE_S * 1e3 for ms in stalls.values()), f"serving waited past the fence: {stalls}"


def check_safe(results, coord):
    """Serving as :func:`check_serving` asks, no plan diverged and rebalancing never halted; returns the coordinator."""
    check_serving(results)
    c = coord.coordinator
    assert c.counts["diverged"] == 0 and c.halted_reason is None
    return c


def phase(coord) -> str | None:
    plan = coord.coordinator.plans.plan
    return None if plan is None else plan.phase.value


@pytest.mark.slow
@pytest.mark.parametrize("when", ["staging", "voting"])
def test_one_rank_vanishing_without_closing_then_healing(tmp_path, caplog, when):
    coord, links, cluster = start()
    try:
        wait_for(lambda: committed(coord) >= 1, 60, "a first commit")
        wait_for(lambda: phase(coord) == when, 30, f"a plan {when}")
        links[2].pause()
        wait_for(lambda: not alive(coord, 2), 15, "rank 2 declared unreachable")
        time.sleep(1.0)
        assert coord.coordinator.halted_reason is None
        before = committed(coord)
        links[2].resume()
        wait_for(lambda: alive(coord, 2), 15, "rank 2 back")
        wait_for(lambda: committed(coord) > before, 30, "a commit after the partition healed")
        results = cluster.collect()
    finally:
        stop(coord, links, cluster)
    check_serving(results)
    assert any("rank 2" in r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR"))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["staging", "voting"])
def test_every_rank_vanishing_without_closing_then_healing(tmp_path, when):
    coord, links, cluster = start()
    try:
        wait_for(lambda: committed(coord) >= 1, 60, "a first commit")
        wait_for(lambda: phase(coord) == when, 30, f"a plan {when}")
        for link in links:
            link.pause()
        wait_for(lambda: not any(alive(coord, r) for r in range(WORLD)), 15, "every rank declared unreachable")
        time.sleep(1.0)
        before = committed(coord)
        for link in links:
            link.resume()
        wait_for(lambda: all(alive(coord, r) for r in range(WORLD)), 15, "every rank back")
        wait_for(lambda: committed(coord) > before, 30, "a commit after the partition healed")
        results = cluster.collect()
    finally:
        stop(coord, links, cluster)
    check_safe(results, coord)


@pytest.mark.parametrize(
    "link",
    [pytest.param({"latency_s": (0.3, 0.8)}, marks=pytest.mark.slow), {"burst_s": 1.0}],
    ids=["jitter", "bursts"],
)
def test_a_slow_jittery_or_bursty_link_never_splits_a_plan(tmp_path, link):
    """Bursts: before, a fresh connection needed more round trips (2 s each) than the agent's
    5 s silence limit allowed, every reopen cut the next one short, and no rank ever
    registered (0 plans in 80 s); the limit now backs off. Jitter: 300-800 ms each way
    during staging and voting; plans commit everywhere or nowhere."""
    coord, links, cluster = start(links_kw=link, steps=700)
    try:
        results = cluster.collect()
    finally:
        stop(coord, links, cluster)
    c = check_safe(results, coord)
    assert c.counts["committed"] >= 1, [(o.phase, o.reason) for o in c.outcomes]


def test_the_coordinator_closes_the_connection_of_a_peer_that_vanished_without_closing():
    """Before, the coordinator kept a vanished peer's TCP connection (and its descriptor) open
    for good: it sends nothing on a dead route, so TCP never noticed; a flapping network
    leaked one descriptor per rank per partition. ZeroMQ's pings now close it within twice
    the liveness timeout."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = CoordinatorThread(sim_config(endpoint, liveness_timeout_s=1.0)).start()
    link = TcpLink(("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))).start()
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    try:
        peer.connect(link.endpoint)
        peer.send(b"not a message")  # the handshake is done once the coordinator reads it
        time.sleep(1.0)  # the handshake done and the frame read (and refused)
        link.pause()  # the peer's host is gone: no byte either way, no FIN, no RST
        wait_for(lambda: link.closed_by_upstream >= 1, 8, "the coordinator closing the dead connection")
    finally:
        peer.close()
        ctx.term()
        link.stop()
        coord.stop()


HANDSHAKE_BOUND_S = 14.0
"""The handshake and one status round trip over the bursty link take 8.2-8.9 s (measured, also
beside four CPU burners); the bound leaves room for a loaded host. It is counted over the time
the coordinator's loop ran: once (a soak beside another test run) that loop was not scheduled for
9.9 s in the middle of it (its own stall log said so), and the 14 s of wall time ran out.
The reconnect count is what shows the handshake dropped."""
STALLS_ALLOWED_S = 30.0
"""Wall time beyond ``HANDSHAKE_BOUND_S`` the client waits, for the coordinator's own stalls."""


def test_a_curve_handshake_over_a_link_with_a_two_second_round_trip_completes(tmp_path, monkeypatch):
    """A ``tcp://`` endpoint uses CURVE unless ``--insecure``; its handshake takes about four round
    trips (greeting, HELLO/WELCOME, INITIATE/READY), 7-8 s over a link that delivers once a second
    (the 2 s round trip docs/FAILURE_MODEL.md says ranks register over). Before, the coordinator
    dropped every connection still in its handshake after 5 s: over that link no agent and no
    status client ever got in, however often they reconnected."""
    from eplb_service.coordinator.status_client import fetch_status
    from eplb_service.security import CLIENT_CERT_ENV, SERVER_CERT_ENV, ClientCurve, generate_keys

    monkeypatch.delenv(SERVER_CERT_ENV, raising=False)
    monkeypatch.delenv(CLIENT_CERT_ENV, raising=False)
    keys = generate_keys(str(tmp_path / "keys"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = CoordinatorThread(sim_config(endpoint, curve_dir=str(tmp_path / "keys"))).start()
    link = TcpLink(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), burst_s=1.0).start()
    try:
        curve = ClientCurve.from_files(keys["server_public"], keys["agent_secret"])
        started = time.monotonic()
        status = fetch_status(link.endpoint, timeout_s=HANDSHAKE_BOUND_S + STALLS_ALLOWED_S, curve=curve)
        took_s = time.monotonic() - started
        stalled_s = coord.coordinator.stalls.total_s
    finally:
        link.stop()
        coord.stop()
    # One connection: the handshake was never dropped and begun again (what the old 5 s limit did).
    assert status["world_size"] == WORLD and link.connections == 1, link.connections
    assert took_s - stalled_s <= HANDSHAKE_BOUND_S, (took_s, stalled_s)
