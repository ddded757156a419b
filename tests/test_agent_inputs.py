"""What one agent's bad numbers can do to the coordinator: nothing lasting.

A NaN count never decays out of the load window (every later plan failed, and balancedness
read 1.0), and one absurd step fast-forwarded the window's decay for good. Such reports are
refused at the edge, counted, and logged naming the rank; the others' reports still count.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import zmq
from coordinator_thread import CoordinatorThread

from eplb_service import protocol, step_clock
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.placement_book import LoadRejected, PlacementBook
from eplb_service.coordinator.router import MAX_STEP_LEAP
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.placement import PlacementShape, initial_phy2log

SHAPE = PlacementShape(2, 6, 8, 2)
MODEL = protocol.ModelShape(2, 6, 8, 2, 36)


class FakeAgent:
    """A hand-driven agent: registers, beats and reports whatever a test tells it to."""

    def __init__(self, endpoint: str, rank: int, model: protocol.ModelShape = MODEL) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"rank-{rank}-{os.getpid()}-{id(self)}".encode())
        self.sock.connect(endpoint)
        self.rank, self.session, self.model = rank, 0, model

    def send(self, message: protocol.Message) -> None:
        self.sock.send(protocol.encode(message))

    def recv(self, kind, timeout_s: float = 3.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                message = protocol.decode(self.sock.recv())
                if isinstance(message, kind):
                    return message
        return None

    def replies_until(self, kind, timeout_s: float = 3.0) -> list:
        """Everything the coordinator sends until (and with) the first ``kind``; fails if none comes."""
        seen: list = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                seen.append(protocol.decode(self.sock.recv()))
                if isinstance(seen[-1], kind):
                    return seen
        raise AssertionError(f"no {kind.__name__} within {timeout_s}s; got {seen}")

    def register(self, epoch: int = 0, pid: int | None = None, resume_session: int = 0) -> None:
        shape = PlacementShape(
            self.model.num_layers, self.model.num_logical, self.model.num_physical, self.model.num_ranks
        )
        self.send(
            protocol.Hello(
                protocol_version=protocol.PROTOCOL_VERSION,
                rank=self.rank,
                model=self.model,
                phy2log=protocol.NDArray.from_numpy(initial_phy2log(shape)),
                epoch=epoch,
                step=0,
                transport="gloo",
                store_host="127.0.0.1",
                store_port=1,
                pid=os.getpid() if pid is None else pid,
                resume_session=resume_session,
            )
        )
        welcome = self.recv(protocol.Welcome)
        assert welcome is not None, "not welcomed"
        self.session = welcome.session

    def beat(self, step: int) -> None:
        self.send(protocol.Heartbeat(rank=self.rank, step=step, epoch=0, session=self.session, comm_generation=-1))

    def load(self, counts, step_begin: int, step_end: int, epoch: int = 0, **fields) -> None:
        self.send(
            protocol.LoadReport(
                rank=fields.get("rank", self.rank),
                epoch=epoch,
                step_begin=step_begin,
                step_end=step_end,
                slot_load=protocol.NDArray.from_numpy(np.asarray(counts, dtype=np.float64)),
                session=fields.get("session", self.session),
            )
        )

    def close(self) -> None:
        self.sock.close(0)


def counter(coordinator, name: str, label: str) -> float:
    for family in coordinator.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and label in sample.labels.values():
                return sample.value
    return 0.0


@pytest.fixture
def deployment(tmp_path):
    cfg = CoordinatorConfig(
        world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", rebalance_interval_steps=10**6, check_step_clock=False
    )
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank) for rank in range(2)]
    for agent in agents:
        agent.register()
    yield thread.coordinator, agents
    for agent in agents:
        agent.close()
    thread.stop()


def settle(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e9, 1e308, 2.0**53 + 2])
def test_a_load_report_with_a_bad_count_is_refused_and_the_window_stays_clean(deployment, bad, caplog):
    coordinator, (a0, a1) = deployment
    good = np.full((2, 8), 10.0)
    a0.load(good, 0, 10)
    settle(lambda: coordinator.book.max_step_seen == 10)
    poisoned = good.copy()
    poisoned[1, 3] = bad
    with caplog.at_level("WARNING"):
        a1.load(poisoned, 0, 10)
        # the counter goes up before the coordinator thread logs the line: wait for both
        settle(lambda: counter(coordinator, "eplb_load_reports_dropped_total", "bad_values") == 1)
        settle(lambda: "rank 1 sent a bad load report" in caplog.text)
    assert "rank 1 sent a bad load report: slot_load[1, 3]" in caplog.text
    load = coordinator.book.window.load
    assert np.isfinite(load).all() and (load >= 0).all() and load.sum() > 0
    a1.load(good, 10, 20)  # the same rank's next good report still counts
    settle(lambda: coordinator.book.max_step_seen == 20)


def test_backward_or_leaping_steps_are_refused(deployment, caplog):
    coordinator, (a0, a1) = deployment
    good = np.full((2, 8), 10.0)
    a0.load(good, 0, 10)
    settle(lambda: coordinator.book.max_step_seen == 10)
    with caplog.at_level("WARNING"):
        a1.load(good, 20, 10)
        settle(lambda: counter(coordinator, "eplb_load_reports_dropped_total", "bad_steps") == 1)
        a1.load(good, 10, 2**62)
        settle(lambda: counter(coordinator, "eplb_load_reports_dropped_total", "bad_steps") == 2)
        a1.beat(2**62)
        settle(lambda: counter(coordinator, "eplb_messages_rejected_total", "bad_step") == 2)
    assert (
        "rank 1: load report at step 4611686018427387904" in caplog.text and f"at most {MAX_STEP_LEAP}" in caplog.text
    )
    assert coordinator.book.max_step_seen == 10 and coordinator.book.window.decayed_to_step <= 10
    assert coordinator.registry.agents[1].step <= 10


def _rejects(messages: list) -> list[tuple[str, str]]:
    return [(m.code, m.reason) for m in messages if isinstance(m, protocol.Reject)]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (np.full((2, 6), 10.0), "(bad_shape): load report shape (2, 6), expected (2, 8)"),
        (np.full((8, 2), 10.0), "(bad_shape): load report shape (8, 2), expected (2, 8)"),  # as many counts
        (np.where(np.arange(16).reshape(2, 8) == 11, -5.0, 1.0), "(bad_values): slot_load[1, 3] = -5.0"),
    ],
)
def test_a_dropped_load_report_is_answered_with_a_reject_naming_the_value(deployment, counts, expected):
    """Before: the coordinator logged the drop and its sender heard nothing, so an agent (or an
    independent client) could not tell a malformed report from one that counted."""
    _, (_, a1) = deployment
    a1.load(counts, 0, 10)
    (code, reason), *more = _rejects(a1.replies_until(protocol.Reject))
    assert code == "bad_message" and expected in reason and "steps 0..10 at epoch 0" in reason, reason
    assert not more


def test_a_heartbeat_that_leaps_is_refused_naming_its_step_not_acknowledged(deployment):
    _, (a0, _) = deployment
    a0.beat(2**62)
    replies = a0.replies_until(protocol.Reject)
    assert not any(isinstance(m, protocol.HeartbeatAck) for m in replies)
    ((code, reason),) = _rejects(replies)
    assert code == "bad_message" and f"heartbeat at step {2**62}" in reason and f"at most {MAX_STEP_LEAP}" in reason
    a0.beat(5)  # the same rank's next sane heartbeat is acknowledged
    assert _rejects(a0.replies_until(protocol.HeartbeatAck)) == []


def test_a_message_naming_another_rank_or_session_is_refused_naming_both(deployment):
    _, (a0, a1) = deployment
    a1.load(np.ones((2, 8)), 0, 10, rank=0)
    ((code, reason),) = _rejects(a1.replies_until(protocol.Reject))
    assert code == "stale_session", reason
    assert f"LoadReport names rank 0, session {a1.session}; this connection registered rank 1" in reason
    assert "(rank differ" in reason, reason
    a0.load(np.ones((2, 8)), 0, 10, session=a0.session ^ 1)
    ((code, reason),) = _rejects(a0.replies_until(protocol.Reject))
    assert (
        code == "stale_session" and f"names rank 0, session {a0.session ^ 1}" in reason and "(session differ" in reason
    )
    assert str(a0.session) not in reason.replace(str(a0.session ^ 1), ""), "the connection's own session is not echoed"


def test_a_load_report_at_an_epoch_the_coordinator_does_not_hold_is_dropped_without_a_reject(deployment):
    """Normal around a commit (a rank reports at the new epoch before every rank committed it):
    a Reject would have every agent log a malformed-message error at every commit."""
    coordinator, (a0, _) = deployment
    a0.load(np.ones((2, 8)), 0, 10, epoch=1)
    settle(lambda: counter(coordinator, "eplb_load_reports_dropped_total", "unknown_epoch") == 1)
    a0.beat(10)
    assert _rejects(a0.replies_until(protocol.HeartbeatAck)) == []


def test_the_book_forgets_a_deployment_on_reset():
    book = PlacementBook(2, 100.0)
    assert book.adopt(MODEL, SHAPE, initial_phy2log(SHAPE), 0)
    book.max_step_seen = 500
    book.reset()
    assert (book.model, book.shape, book.window, book.epoch, book.placements, book.max_step_seen) == (
        None,
        None,
        None,
        -1,
        {},
        0,
    )
    assert book.adopt(MODEL, SHAPE, initial_phy2log(SHAPE), 0), "the next Hello adopts the model anew"
    with pytest.raises(LoadRejected, match="unknown_epoch"):
        book.add_load(
            protocol.LoadReport(
                rank=0, epoch=3, step_begin=0, step_end=1, slot_load=protocol.NDArray.from_numpy(np.ones((2, 8)))
            )
        )


@pytest.fixture
def http_port(tmp_path):
    """The HTTP port of a running coordinator (2 ranks, none registered), stopped after the test."""
    cfg = CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", metrics_port=0, http_host="127.0.0.1")
    thread = CoordinatorThread(cfg).start()
    try:
        settle(lambda: thread.coordinator.metrics_port is not None)
        yield thread.coordinator.metrics_port
    finally:
        thread.stop()


def http_exchange(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_clients_get_head_allow_and_431_answers(http_port):
    """HEAD answered with a body, a 405 without ``Allow`` and silence for oversized headers are
    what strict clients and proxies trip over."""
    port = http_port
    get = http_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    livez = http_exchange(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    head = http_exchange(port, b"HEAD /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    head_metrics = http_exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    post = http_exchange(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    huge = http_exchange(port, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 200") and len(get.split(b"\r\n\r\n", 1)[1]) > 100
    assert head == livez.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n", "HEAD: GET's headers (Content-Length too), no body"
    assert head_metrics.startswith(b"HTTP/1.1 200") and head_metrics.endswith(b"\r\n\r\n")
    assert b"Content-Length: " in head_metrics and head_metrics.count(b"\r\n\r\n") == 1
    assert post.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET, HEAD\r\n" in post
    assert huge.startswith(b"HTTP/1.1 431")


def test_http_requests_with_bare_lf_line_ends_are_answered(http_port):
    """Before: ``printf 'GET /status HTTP/1.0\\n\\n' | nc`` got no answer (the server waited for
    CRLF CRLF until its 5 s timeout and closed). A head over 64 KiB in many short lines is 431."""
    import json

    port = http_port
    started = time.monotonic()
    status = http_exchange(port, b"GET /status HTTP/1.0\n\n")
    mixed = http_exchange(port, b"HEAD /livez HTTP/1.1\r\nHost: x\nAccept: */*\r\n\n")
    elapsed = time.monotonic() - started
    many = http_exchange(
        port,
        b"GET /livez HTTP/1.1\n" + b"".join(b"X-%d: %s\n" % (i, b"a" * 1000) for i in range(70)) + b"\n",
    )
    assert status.startswith(b"HTTP/1.1 200"), status[:200]
    assert json.loads(status.split(b"\r\n\r\n", 1)[1])["world_size"] == 2
    assert mixed.startswith(b"HTTP/1.1 200") and mixed.endswith(b"\r\n\r\n"), mixed
    assert elapsed < 4.0, "answered at once, not after the read timeout"
    assert many.startswith(b"HTTP/1.1 431"), many[:200]


def test_http_absolute_form_request_targets_are_answered_like_their_path(http_port):
    """RFC 9112 (3.2.2): a server MUST accept a request target in absolute form
    (``GET http://host:port/readyz``), which HTTP proxies and some probes send. Before, its
    path was the whole URL and every such request was a 404."""
    port = http_port
    readyz = http_exchange(port, b"GET http://127.0.0.1:%d/readyz HTTP/1.1\r\nHost: x\r\n\r\n" % port)
    query = http_exchange(port, b"GET HTTP://Localhost/status?pretty=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    no_path = http_exchange(port, b"GET http://127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
    double_slash = http_exchange(port, b"GET //readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert readyz.startswith(b"HTTP/1.1 200") and readyz.endswith(b"ready\n"), readyz
    assert query.startswith(b"HTTP/1.1 200") and b'"world_size": 2' in query, query[:300]
    assert no_path.startswith(b"HTTP/1.1 404") and b"unknown path '/'" in no_path, no_path
    assert double_slash.startswith(b"HTTP/1.1 404"), "an origin-form path is taken as written, never as a URL"


def test_http_an_empty_line_before_the_request_is_skipped_and_a_malformed_line_is_400(http_port):
    """RFC 9112 (2.2): a server SHOULD ignore an empty line before the request line; it was
    taken as the whole request and answered 405. A line that is no request line at all was a
    405 "GET or HEAD only" with ``Allow``, as if only the method were wrong: it is a 400."""
    port = http_port
    leading = http_exchange(port, b"\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    garbage = http_exchange(port, b"GARBAGE\r\n\r\n")
    too_many = http_exchange(port, b"GET /readyz HTTP/1.1 more\r\n\r\n")
    method = http_exchange(port, b"DELETE /readyz HTTP/1.1\r\n\r\n")
    # skipped, but not for free: empty lines count towards the head's limit (else 5 s of them per connection)
    blank_lines = http_exchange(port, b"\n" * (64 * 1024 + 1))
    no_version = http_exchange(port, b"GET /readyz\n\n")  # METHOD TARGET, as a hand-typed probe may send
    assert no_version.startswith(b"HTTP/1.1 200") and no_version.endswith(b"ready\n"), no_version
    assert blank_lines.startswith(b"HTTP/1.1 431"), blank_lines
    assert leading.startswith(b"HTTP/1.1 200") and leading.endswith(b"ready\n"), leading
    for answer in (garbage, too_many):
        assert answer.startswith(b"HTTP/1.1 400") and b"Allow:" not in answer, answer
        assert b"expected METHOD TARGET [HTTP/1.x]" in answer, answer
    assert method.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET, HEAD\r\n" in method


def http_half_closed(port: int, request: bytes) -> bytes:
    """``request``, then the end of our side of the connection (what ``printf ... | nc`` does); the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_a_request_cut_short_before_its_empty_line_is_400_not_silence(http_port):
    """Before: a head that ended without its empty line got no answer at all."""
    port = http_port
    answers = [
        http_half_closed(port, request)
        for request in (b"GET /readyz HTTP/1.1\r\nHost: x\r\n", b"GET /readyz HTTP/1.1", b"GET /readyz")
    ]
    nothing = http_half_closed(port, b"")
    whole = http_half_closed(port, b"GET /readyz HTTP/1.1\r\n\r\n")
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 400") and b"ended before the empty line" in answer, answer
    assert nothing == b""  # a connection that asked nothing gets nothing
    assert whole.startswith(b"HTTP/1.1 200") and whole.endswith(b"ready\n"), whole


def test_http_slow_loris_connections_keep_neither_probes_nor_heartbeats_out(tmp_path):
    """A client holding the connection cap with requests it never finishes (idle connections,
    half a head, a head dripped line by line) for longer than the liveness limit. Before: once
    64 were open every other connection was answered 503, so one such client reopening them
    every 5 s failed every ``/livez`` probe (Kubernetes restarts the coordinator after six).
    Now a newcomer displaces the oldest unfinished request: probes are answered, and heartbeats
    keep the rank alive meanwhile (the event loop was never blocked)."""
    import contextlib
    import socket

    from eplb_service.coordinator.http_endpoints import MAX_CONNECTIONS

    cfg = CoordinatorConfig(
        world_size=2,
        endpoint=f"ipc://{tmp_path}/c.sock",
        metrics_port=0,
        http_host="127.0.0.1",
        # 2 s, not 1: the heartbeats come from this test's own loop, which also drips ~27 writes,
        # makes a probe and a connection per pass; a loaded machine could starve it past 1 s.
        liveness_timeout_s=2.0,
        check_step_clock=False,
    )
    thread = CoordinatorThread(cfg).start()
    agent = FakeAgent(cfg.endpoint, 0)
    loris: list[socket.socket] = []
    try:
        settle(lambda: thread.coordinator.metrics_port is not None)
        port = thread.coordinator.metrics_port
        agent.register()
        for i in range(MAX_CONNECTIONS + 16):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall([b"", b"GET /metrics HTTP/1.1\r\n", b"GET /status HTTP/1.1\r\nHost: x\r\n"][i % 3])
            loris.append(conn)
        answers, step, started = [], 0, time.monotonic()
        while time.monotonic() - started < 2.5 * cfg.liveness_timeout_s:
            step += 1
            agent.beat(step)
            for conn in loris[2::3]:
                with contextlib.suppress(OSError):  # a displaced one is reset
                    conn.sendall(b"X-Drip: 1\r\n")  # never the empty line
            try:
                answers.append(http_exchange(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")[:12])
            except OSError as exc:  # refused at the cap: answered 503 and closed before reading the request
                answers.append(repr(exc).encode())
            loris.append(socket.create_connection(("127.0.0.1", port), timeout=5))  # keep the cap full
            time.sleep(0.1)
        record = thread.coordinator.registry.agents[0]
        assert record.alive, "the rank was declared dead while slow HTTP clients held connections"
        assert answers and all(a == b"HTTP/1.1 200" for a in answers), answers
    finally:
        for conn in loris:
            conn.close()
        agent.close()
        thread.stop()


def test_ranks_stuck_at_different_epochs_are_reported_once(tmp_path, caplog):
    """Before: planning waited forever with no word (status said nothing was halted)."""
    cfg = CoordinatorConfig(
        world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", check_step_clock=False, voting_timeout_s=0.5
    )
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank) for rank in range(2)]
    try:
        with caplog.at_level("WARNING"):
            agents[0].register()
            agents[1].register(epoch=7)
            settle(lambda: "planning waits" in caplog.text, timeout_s=10)
            time.sleep(1.0)
    finally:
        for agent in agents:
            agent.close()
        thread.stop()
    assert caplog.text.count("planning waits") == 1
    assert "(epoch: ranks {0: [0], 7: [1]})" in caplog.text


def clock_probes(first_probe: int, probes: int, step_s: float, wall_minus_mono: float) -> protocol.StepClock:
    """Probes of a rank whose step ``k`` ended at monotonic ``k * step_s``."""
    steps = [first_probe + i * step_clock.PROBE_EVERY for i in range(probes)]
    radius = step_clock.PROBE_RADIUS
    times = [[(k + j) * step_s for j in range(-radius, radius + 1)] for k in steps]
    return protocol.StepClock(probe_steps=steps, times=times, radius=radius, wall_minus_mono=wall_minus_mono)


def test_a_step_clock_halt_from_a_host_clock_that_was_off_lifts_once_the_clocks_agree(tmp_path, caplog):
    """Before: a host whose wall clock was off by two steps (then set right by NTP) read as its
    rank counting two steps apart, and rebalancing stayed halted until the workers restarted.
    A rank that really counts apart stays halted (tests/test_fault_scenarios.py, scenario 7)."""
    cfg = CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", rebalance_interval_steps=10**6)
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank) for rank in range(2)]
    step_s = 0.05

    def beat_with_clocks(first_probe: int, skew_s: float) -> None:
        last = first_probe + step_clock.PROBE_EVERY + step_clock.PROBE_RADIUS + 1
        for agent in agents:
            skew = skew_s if agent.rank == 1 else 0.0
            clock = clock_probes(first_probe, 2, step_s, 1000.0 + skew)
            agent.send(protocol.Heartbeat(rank=agent.rank, step=last, epoch=0, session=agent.session, clock=clock))

    try:
        for agent in agents:
            agent.register()
        c = thread.coordinator
        with caplog.at_level("WARNING"):
            beat_with_clocks(32, skew_s=2 * step_s)  # rank 1's host clock two steps ahead
            settle(lambda: c.halted_reason is not None)
            halted = c.halted_reason
            beat_with_clocks(96, skew_s=0.0)  # NTP set it right
            settle(lambda: c.halted_reason is None)
            status = fetch_status(cfg.endpoint, timeout_s=5)
    finally:
        for agent in agents:
            agent.close()
        thread.stop()
    assert "step clocks disagree: rank 1 counts" in halted, halted
    assert "step clocks agree again on ranks [0, 1]" in caplog.text and "rebalancing resumes" in caplog.text
    assert status["halted"] is None
    assert c.metrics.step_clock_offset.labels("1")._value.get() == 0


def test_a_step_clock_halt_stays_while_the_rank_that_counted_apart_is_away(tmp_path, caplog):
    """Before: once the rank whose clock read apart had left (here: said goodbye), the ranks left
    agreeing among themselves lifted the halt, though nothing was seen of that rank (seen in the
    fault scenario of a rank counting one extra step, as its ranks left at the end of the run).
    The halt now lifts only with every rank of the deployment alive and agreeing."""
    model = protocol.ModelShape(2, 6, 9, 3, 36)
    cfg = CoordinatorConfig(world_size=3, endpoint=f"ipc://{tmp_path}/c.sock", rebalance_interval_steps=10**6)
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank, model) for rank in range(3)]
    step_s = 0.05

    def beat_with_clocks(ranks: list[int], first_probe: int, skew_s: float) -> None:
        last = first_probe + step_clock.PROBE_EVERY + step_clock.PROBE_RADIUS + 1
        for agent in (agents[r] for r in ranks):
            skew = skew_s if agent.rank == 1 else 0.0
            clock = clock_probes(first_probe, 2, step_s, 1000.0 + skew)
            agent.send(protocol.Heartbeat(rank=agent.rank, step=last, epoch=0, session=agent.session, clock=clock))

    def still_halted_after(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if c.halted_reason is None:
                return False
            time.sleep(0.02)
        return True

    try:
        for agent in agents:
            agent.register()
        c = thread.coordinator
        with caplog.at_level("WARNING"):
            beat_with_clocks([0, 1, 2], 32, skew_s=2 * step_s)  # rank 1's clock two steps ahead
            settle(lambda: c.halted_reason is not None)
            halted = c.halted_reason
            session = agents[1].session
            agents[1].send(protocol.Goodbye(rank=1, reason="shutting down", session=session))
            settle(lambda: [r.rank for r in c.registry.alive] == [0, 2])
            beat_with_clocks([0, 2], 96, skew_s=0.0)  # the two left agree among themselves
            away = still_halted_after(1.5)
            # Rank 1 back (the same process, its session resumed), agreeing now: the halt lifts.
            agents[1].register(resume_session=session)
            settle(lambda: len(c.registry.alive) == 3)
            beat_with_clocks([0, 1, 2], 160, skew_s=0.0)
            settle(lambda: c.halted_reason is None)
    finally:
        for agent in agents:
            agent.close()
        thread.stop()
    assert "step clocks disagree: rank 1 counts" in halted, halted
    assert away, "the halt lifted while rank 1 was away"
    assert "step clocks agree again on ranks [0, 1, 2]" in caplog.text
    assert "agree again on ranks [0, 2]" not in caplog.text


def test_worker_restarts_do_not_grow_the_coordinators_memory_of_processes(tmp_path):
    """Before: every (node, pid) that ever registered in a deployment was kept, one more per worker
    restart for as long as the deployment lived. Now the newest few per rank are kept: a recent
    process coming back is still the same deployment, an unknown one starts a new deployment."""
    cfg = CoordinatorConfig(
        world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", rebalance_interval_steps=10**6, check_step_clock=False
    )
    thread = CoordinatorThread(cfg).start()
    coordinator = thread.coordinator
    a0 = FakeAgent(cfg.endpoint, 0)
    a0.register(pid=1)
    agent = FakeAgent(cfg.endpoint, 1)
    agent.register(pid=100)
    try:
        for pid in range(101, 161):  # rank 1's worker restarts 60 times
            agent.send(protocol.Goodbye(rank=1, reason="restart", session=agent.session))
            agent.close()
            settle(lambda: 1 not in coordinator.registry.agents)
            agent = FakeAgent(cfg.endpoint, 1)
            agent.register(pid=pid)
        assert len(coordinator.router.registrar.processes) <= 4 * cfg.world_size
        for a, rank in ((a0, 0), (agent, 1)):
            a.send(protocol.Goodbye(rank=rank, reason="stop", session=a.session))
        settle(lambda: not coordinator.registry.alive)
        back = FakeAgent(cfg.endpoint, 1)
        back.register(pid=160)  # the last process of rank 1, back: the same deployment
        settle(lambda: 1 in coordinator.registry.agents)
        assert coordinator.deployments == 1
        back.send(protocol.Goodbye(rank=1, reason="stop", session=back.session))
        settle(lambda: not coordinator.registry.alive)
        stranger = FakeAgent(cfg.endpoint, 1)
        stranger.register(pid=7)
        settle(lambda: coordinator.deployments == 2)
        for a in (back, stranger):
            a.close()
    finally:
        a0.close()
        agent.close()
        thread.stop()


def test_a_coordinator_behind_on_its_messages_declares_no_live_rank_dead(tmp_path, caplog):
    """Before: heartbeats waiting in the socket behind a slow handler (or a burst of load reports
    from hundreds of ranks) did not count; measured from the tick's clock, live ranks were
    declared dead, their plan aborted, and they had to register again.

    The liveness limit is 2 s (a handler stall of 5 s): the test's own 50 ms beat loop must not
    starve past the limit on a loaded 2-core machine, or a rank would really be silent."""
    import threading

    cfg = CoordinatorConfig(
        world_size=2,
        endpoint=f"ipc://{tmp_path}/c.sock",
        liveness_timeout_s=2.0,
        check_step_clock=False,
        rebalance_interval_steps=10**6,
    )
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank) for rank in range(2)]
    for agent in agents:
        agent.register()
    c = thread.coordinator
    handle, stalled = c._handle, threading.Event()

    def slow_once(identity, message):  # one handler holding the loop 2.5 liveness timeouts
        if isinstance(message, protocol.Heartbeat) and message.rank == 1 and not stalled.is_set():
            stalled.set()
            time.sleep(5.0)
        handle(identity, message)

    c._handle = slow_once
    try:
        with caplog.at_level("WARNING"):
            deadline = time.monotonic() + 7.0
            step = 1
            while time.monotonic() < deadline:  # both ranks beat every 50 ms throughout
                for agent in agents:
                    agent.beat(step)
                step += 1
                time.sleep(0.05)
            settle(lambda: all(r.step >= step - 1 for r in c.registry.alive) and len(c.registry.alive) == 2)
    finally:
        for agent in agents:
            agent.close()
        thread.stop()
    assert stalled.is_set()
    assert "silent for" not in caplog.text, caplog.text  # "rank R silent for Ts: declared dead"
    assert "behind on incoming messages" in caplog.text


def test_a_balanced_deployment_logs_no_rebalance_once_not_at_every_evaluation(tmp_path, caplog):
    """Before: "no rebalance: ..." at INFO on every evaluation, one every interval for as long as
    the load stays balanced (thousands of lines a day); the skips are still counted."""
    cfg = CoordinatorConfig(
        world_size=2,
        endpoint=f"ipc://{tmp_path}/c.sock",
        check_step_clock=False,
        rebalance_interval_steps=10,
        min_window_steps=10,
    )
    thread = CoordinatorThread(cfg).start()
    agents = [FakeAgent(cfg.endpoint, rank) for rank in range(2)]
    c = thread.coordinator
    try:
        for agent in agents:
            agent.register()
        settle(lambda: c.side_comm.current_was_sent)
        generation = c.side_comm.generation  # as if built: the coordinator plans only with it ready
        balanced = np.full((SHAPE.num_layers, SHAPE.num_physical), 100.0)  # every rank equally loaded
        with caplog.at_level("DEBUG"):
            for step in range(10, 400, 10):
                for agent in agents:
                    agent.load(balanced, step - 10, step)
                    agent.send(
                        protocol.Heartbeat(
                            rank=agent.rank, step=step, epoch=0, session=agent.session, comm_generation=generation
                        )
                    )
                if c.counts["skipped"] >= 4:
                    break
                time.sleep(0.1)
            settle(lambda: c.counts["skipped"] >= 4)
    finally:
        for agent in agents:
            agent.close()
        thread.stop()
    lines = [r for r in caplog.records if "] no rebalance: " in r.getMessage()]
    assert len(lines) >= 4 and [r.levelname for r in lines].count("INFO") == 1, [r.levelname for r in lines]
    assert "the next ones at DEBUG until a plan is made" in lines[0].getMessage()


def test_the_projected_balancedness_says_which_load_it_is_under():
    """Before: "no rebalance: balancedness 1.0000 -> 1.0000 projected" where hot experts came and
    went (persistence near 0), while status measured 0.865: the migration policy's forecast shrinks
    every deviation that does not last, and the line did not say so."""
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    runner = HandlerHarness().coordinator.plans
    assert runner.cfg.policy == "migration"
    assert runner._planned_on(0.0) == (
        "on the forecast next window (load persistence 0.00: 0% of each expert's deviation from the mean kept)"
    )
    assert "30% of each expert's deviation" in runner._planned_on(0.3)
    assert runner._planned_on(0.9) == "on the load window (load persistence 0.90)"  # lasting load: planned as is
    runner.cfg = dataclasses.replace(runner.cfg, policy="deepseek")  # plans for the last window whatever lasts
    assert runner._planned_on(0.0) == "on the load window (load persistence 0.00)"


def test_a_halt_is_not_second_guessed_by_the_epoch_split_line(caplog):
    """Before: a worker restarted alone (its own epoch 0 against the others' 1) halted rebalancing
    with "restart every worker", and a voting timeout later the split line advised "restart its
    worker" beside it: two remedies, one of them wrong."""
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    c.registry.agents[1].epoch = c.registry.agents[0].epoch + 1
    c.guard.halted_reason = "rank 0 restarted alone …; restart every worker of the deployment"
    with caplog.at_level("WARNING", logger=c.log.logger.name):
        now = time.monotonic()
        for later in (0.0, 2 * c.cfg.voting_timeout_s, 4 * c.cfg.voting_timeout_s):
            c._watch_epoch_split(now + later)
        assert "planning waits" not in caplog.text
        c.guard.halted_reason = None  # no halt: the split is said, once
        for later in (0.0, 2 * c.cfg.voting_timeout_s, 4 * c.cfg.voting_timeout_s):
            c._watch_epoch_split(now + later)
    assert caplog.text.count("planning waits") == 1, caplog.text


def test_http_at_the_cap_exactly_the_oldest_unfinished_request_makes_room(monkeypatch):
    """At :data:`MAX_CONNECTIONS` open (not one more), a newcomer displaces the connection that has
    waited longest on its request head, and only it: a newer one displaced instead lets a
    slow-loris client's oldest connections hold their places for the whole read timeout."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from eplb_service.coordinator import http_endpoints

    monkeypatch.setattr(http_endpoints, "MAX_CONNECTIONS", 3)
    ready = threading.Event()
    ready.set()
    stub = SimpleNamespace(last_tick=time.monotonic() + 3600, endpoint_unreachable=None, ready=ready)

    async def closed_by_server(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), 0.3) == b""
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            return True

    async def exercise() -> tuple[bytes, list[bool]]:
        service = await http_endpoints.serve_http(stub, "127.0.0.1", 0)  # type: ignore[arg-type]
        writers = []
        try:
            idle = []
            for n in range(1, 4):
                reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
                idle.append(reader)
                writers.append(writer)
                while len(service.connections) < n:  # the server has taken it as a connection
                    await asyncio.sleep(0.005)
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writers.append(writer)
            writer.write(b"GET /livez HTTP/1.1\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            return answer, [await closed_by_server(r) for r in idle]
        finally:
            for writer in writers:
                writer.close()
            await service.close()

    answer, closed = asyncio.run(exercise())
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert closed == [True, False, False], "only the oldest idle connection is dropped, and only at the cap"


def test_http_livez_fails_once_the_loop_tick_is_late():
    """``/livez`` is what a liveness probe restarts the coordinator on: 503 once the periodic tick
    is more than :data:`TICK_LATE_S` behind, 200 while it is on time."""
    from types import SimpleNamespace

    from eplb_service.coordinator.http_endpoints import TICK_LATE_S, route

    stub = SimpleNamespace(last_tick=time.monotonic() - TICK_LATE_S - 2)
    late = route(stub, "/livez")  # type: ignore[arg-type]
    assert late.startswith(b"HTTP/1.1 503") and b"late" in late, late
    stub.last_tick = time.monotonic()
    assert route(stub, "/livez").startswith(b"HTTP/1.1 200")  # type: ignore[arg-type]
