"""The coordinator loop's rules that hand mutation of ``coordinator/server.py``, ``socket_watch.py``
and the CLI's ``_serve`` let through.

Mostly a real ``Coordinator`` with two registered ranks and no sockets (``plan_harness.harness``),
its periodic duty (``_tick``, ``_tick_loop``) and its shutdown driven by the test; where the rule
is about sockets (the HTTP port, the socket file, the receive loop) one served in-process on a
temporary ``ipc://`` endpoint; one daemon process for the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from plan_harness import harness, start_plan

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator
from eplb_service.coordinator.socket_watch import SocketFileWatch
from eplb_service.testing.protocol_fuzz import SocketSink
from eplb_service.trace import TraceRecorder, load_trace


class Backlog(SocketSink):
    """A ROUTER socket with messages waiting (``POLLIN``) or none."""

    def __init__(self, waiting: bool) -> None:
        super().__init__()
        self.waiting = waiting

    def get(self, option) -> int:
        return zmq.POLLIN if option == zmq.EVENTS and self.waiting else 0


def test_ranks_are_judged_silent_only_up_to_the_last_time_every_message_was_read():
    """A coordinator behind on its messages may hold the ranks' heartbeats unread in its socket:
    silence is counted up to when the receive loop last found nothing waiting, never to the
    tick's clock, or live ranks are declared dead (their plan aborted) for its own backlog."""
    c, _ = harness()
    timeout = c.cfg.liveness_timeout_s
    now = time.monotonic()
    for record in c.registry.alive:
        record.last_seen = now - timeout - 2.0
    c._caught_up_at = now - timeout - 1.5  # everything sent before this was read: 0.5 s of silence
    c._sock = Backlog(waiting=True)
    asyncio.run(c._tick())
    assert sorted(r.rank for r in c.registry.alive) == [0, 1]
    c._sock = Backlog(waiting=False)  # caught up: the silence up to now counts
    asyncio.run(c._tick())
    assert c.registry.alive == []


def test_a_tick_that_raises_is_counted_and_the_next_tick_still_runs():
    """Liveness, plan deadlines and re-sends all hang on the tick: one that raises must be an
    internal error (logged, counted) and the loop go on, never a coordinator that silently stops
    declaring ranks dead and timing plans out."""
    c, _ = harness()
    ticks: list[int] = []

    async def tick(now: float | None = None) -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            raise RuntimeError("boom")

    c._tick = tick  # type: ignore[method-assign]

    async def run_a_while() -> None:
        loop = asyncio.create_task(c._tick_loop())
        while len(ticks) < 3:
            assert not loop.done(), "the tick loop ended"
            await asyncio.sleep(0.01)
        loop.cancel()

    asyncio.run(asyncio.wait_for(run_a_while(), 10))
    assert c.metrics.internal_errors.labels("tick")._value.get() == 1


class ClosableBacklog(Backlog):
    def close(self, linger=None) -> None:
        self.closed = True


def recording(c, tmp_path) -> str:
    """``c`` records load windows to ``tmp_path/t.npz``; one window of rank 0 (of 2) is open."""
    path = str(tmp_path / "t.npz")
    c.recorder = TraceRecorder(path, 2, 6, 2)
    c.recorder.add(np.ones((2, 6)), 0, 5, 0, 0)
    return path


def test_a_shutdown_aborts_the_plan_tells_every_agent_and_writes_the_trace_with_its_open_windows(tmp_path):
    """SIGTERM's clean stop: the plan in flight asked to abort (maps untouched everywhere), every
    agent told (``CoordinatorStopping``: it drops its plan and registers again later instead of
    waiting out its silence limit), and the load trace written, the windows still open included."""
    c, sent = harness()
    plan = start_plan(c)
    path = recording(c, tmp_path)
    c._sock = ClosableBacklog(waiting=False)
    sent.clear()
    asyncio.run(c._shutdown())
    aborts = sorted((who, m.plan_id, m.code) for who, m in sent if isinstance(m, protocol.AbortPlan))
    assert aborts == [
        (b"rank-0", plan.plan_id, "coordinator_stopping"),
        (b"rank-1", plan.plan_id, "coordinator_stopping"),
    ]
    assert sorted(who for who, m in sent if isinstance(m, protocol.CoordinatorStopping)) == [b"rank-0", b"rank-1"]
    assert c.recorder is None and c._sock.closed
    assert load_trace(path).num_windows == 1


def test_the_trace_is_written_every_few_seconds_while_the_coordinator_runs(tmp_path):
    """A coordinator killed (SIGKILL, OOM) keeps no trace but what was flushed: closed windows go
    to the file every 5 s, not only at a clean exit."""
    c, _ = harness()
    path = recording(c, tmp_path)
    c.recorder.add(np.ones((2, 6)), 0, 5, 0, 1)
    for rank in (0, 1):  # both ranks went on past steps 0-5: that window is closed
        c.recorder.add(np.ones((2, 6)), 5, 10, 0, rank)
    c._last_trace_flush = time.monotonic() - 1.0
    asyncio.run(c._tick())
    assert not os.path.exists(path), "flushed before its interval"
    c._last_trace_flush = time.monotonic() - 6.0
    asyncio.run(c._tick())
    assert load_trace(path).num_windows == 1


def test_the_last_agent_leaving_ends_the_deployment_s_trace(tmp_path):
    """The next agents to register start a new deployment and a new file: the old one's windows,
    the open ones included, are written when its last agent leaves, not lost."""
    c, _ = harness()
    path = recording(c, tmp_path)
    for record in list(c.registry.alive):
        c._handle(record.identity, protocol.Goodbye(rank=record.rank, reason="stop", session=record.session))
    assert c.recorder is None
    assert load_trace(path).num_windows == 1


def test_a_background_task_that_fails_is_an_internal_error_that_aborts_the_plan():
    """The policy runs as a task: a bug in it must be logged and counted under its name, and the
    plan in flight aborted (``internal_error``), never an exception lost in a task nobody awaits."""
    c, sent = harness()
    plan = start_plan(c)
    sent.clear()

    async def failing() -> None:
        raise RuntimeError("policy bug")

    async def run() -> None:
        task = c._spawn(failing(), "policy")
        await asyncio.wait({task})
        await asyncio.sleep(0)  # the done callback

    asyncio.run(run())
    assert c.metrics.internal_errors.labels("policy")._value.get() == 1
    assert {(m.plan_id, m.code) for _, m in sent if isinstance(m, protocol.AbortPlan)} == {
        (plan.plan_id, "internal_error")
    }


def test_a_stopped_coordinator_closes_its_http_server_and_removes_its_socket_file(tmp_path):
    """Stopped, nothing of it stays reachable: the metrics/HTTP port is closed (an embedded
    coordinator's host process lives on, and a new coordinator must be able to bind the port)."""
    cfg = CoordinatorConfig(
        world_size=2, endpoint=f"ipc://{tmp_path}/run/c.sock", metrics_port=0, http_host="127.0.0.1"
    )

    async def run() -> None:
        c = Coordinator(cfg)
        served = asyncio.create_task(c.serve())
        await asyncio.wait_for(c.ready.wait(), 10)
        _, writer = await asyncio.open_connection("127.0.0.1", c.metrics_port)
        writer.close()
        c.stop()
        await asyncio.wait_for(served, 10)
        # Same loop, still running: a server left open would still accept here.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", c.metrics_port)

    asyncio.run(run())
    assert not (tmp_path / "run" / "c.sock").exists()


@contextlib.contextmanager
def watched_socket(path: Path) -> Iterator[SocketFileWatch]:
    """A ROUTER bound at ``ipc://path`` and the coordinator's watch over its socket file."""
    from eplb_service.logutil import rank_logger

    endpoint = f"ipc://{path}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    try:
        router.bind(endpoint)
        yield SocketFileWatch(endpoint, router, lambda: False, rank_logger("test", "coordinator"))
    finally:
        router.close(linger=0)
        ctx.term()


def test_the_socket_file_is_looked_at_once_per_check_interval_not_on_every_tick(tmp_path):
    """The tick runs every 20 ms: the watch stats the file (and, when it is gone, binds again or
    logs why it cannot) at most every ``CHECK_EVERY_S``, never 50 times a second."""
    from eplb_service.coordinator.socket_watch import CHECK_EVERY_S

    path = tmp_path / "c.sock"
    with watched_socket(path) as watch:
        watch.tick(100.0)
        os.unlink(path)
        watch.tick(100.0 + CHECK_EVERY_S / 2)
        assert watch.rebinds == 0 and not path.exists()
        watch.tick(100.0 + CHECK_EVERY_S)
        assert watch.rebinds == 1 and path.is_socket()


def test_a_handler_that_raises_is_counted_and_the_next_message_is_still_read(tmp_path):
    """No message may stop the coordinator: a handler's bug is an internal error under the
    message's type, and the receive loop reads the next message (else every agent goes silent
    for it and is declared dead while the process looks alive)."""
    import zmq.asyncio

    cfg = CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/run/c.sock")
    handled: list[str] = []

    async def run() -> Coordinator:
        c = Coordinator(cfg)

        def handle(identity: bytes, message: protocol.Message) -> None:
            handled.append(type(message).__name__)
            if len(handled) == 1:
                raise RuntimeError("handler bug")

        c._handle = handle  # type: ignore[method-assign]
        served = asyncio.create_task(c.serve())
        await asyncio.wait_for(c.ready.wait(), 10)
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        try:
            dealer.connect(cfg.endpoint)
            for message in (protocol.Goodbye(rank=0, reason="one"), protocol.Goodbye(rank=1, reason="two")):
                await dealer.send(protocol.encode(message))
            deadline = time.monotonic() + 10
            while len(handled) < 2 and time.monotonic() < deadline and not served.done():
                await asyncio.sleep(0.01)
        finally:
            dealer.close(linger=0)
            ctx.term()
            c.stop()
            await asyncio.wait_for(served, 10)
        return c

    c = asyncio.run(run())
    assert handled == ["Goodbye", "Goodbye"]
    assert c.metrics.internal_errors.labels("handling Goodbye")._value.get() == 1


def test_a_metrics_port_taken_after_the_bind_fails_the_start_and_leaves_no_socket_file(tmp_path):
    """The endpoint is bound before the HTTP port: when the port turns out taken, the start fails
    naming it, and the socket file just bound goes with it (left, ``status`` and agents would
    find a file nobody listens on, and the next start would have to judge it stale)."""
    from eplb_service.coordinator.server import BindError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = CoordinatorConfig(
            world_size=2, endpoint=f"ipc://{tmp_path}/run/c.sock", metrics_port=port, http_host="127.0.0.1"
        )
        with pytest.raises(BindError, match=f"--metrics-port {port}"):
            asyncio.run(Coordinator(cfg).serve())
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "c.sock").exists()


def test_a_stale_socket_file_that_cannot_be_removed_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    """Another process's socket file at the path, nobody listening, that this coordinator may not
    remove (a read-only mount, permissions changed under it): the watch says the endpoint is
    unreachable and tries again next check. Raised, it was an internal error every second, each
    one aborting the plan in flight."""
    from eplb_service.coordinator import socket_watch

    path = tmp_path / "c.sock"
    with watched_socket(path) as watch:
        os.unlink(path)
        with socket.socket(socket.AF_UNIX) as gone:
            gone.bind(str(path))  # closed at once: its file stays, nobody listening
        stale = os.stat(path).st_ino

        def unlink(where: str) -> None:
            raise PermissionError(13, "Permission denied", where)

        monkeypatch.setattr(socket_watch.os, "unlink", unlink)
        with caplog.at_level("ERROR"):
            watch.tick(10.0)
        assert watch.rebinds == 0 and watch.unreachable is not None and f"inode {stale}" in watch.unreachable
        monkeypatch.undo()
        watch.tick(20.0)  # removable now: taken back
        assert watch.rebinds == 1 and watch.unreachable is None
        assert path.is_socket() and watch.identity == (os.stat(path).st_dev, os.stat(path).st_ino)


def test_the_daemon_exits_1_naming_the_port_when_its_metrics_port_is_taken(tmp_path):
    """A start that failed must not exit 0: the systemd unit restarts on failure (the port may be
    free in a moment) and a supervisor reads 0 as a clean stop, leaving no coordinator running."""
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "eplb_service.coordinator.cli",
                "--dp",
                "2",
                "--endpoint",
                f"ipc://{tmp_path}/run/c.sock",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert f"cannot serve HTTP on --metrics-port {port}" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "c.sock").exists()


def test_a_rank_silent_past_the_liveness_timeout_is_lost_with_its_plan_and_its_metrics():
    """Declared dead on the tick: the plan it was staging is aborted (``agent_lost``, the others
    told), its registration freed for its next process, and ``eplb_agent_up`` says 0."""
    c, sent = harness()
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()  # staging on both ranks
    plan = c.plans.plan
    sent.clear()
    c.registry.agents[1].last_seen = time.monotonic() - c.cfg.liveness_timeout_s - 1.0
    asyncio.run(c._tick())
    assert [r.rank for r in c.registry.alive] == [0] and 1 not in c.registry.agents
    assert [(who, m.plan_id, m.code) for who, m in sent if isinstance(m, protocol.AbortPlan)] == [
        (b"rank-0", plan.plan_id, "agent_lost")
    ]
    assert c.plans.plan is None and c.outcomes[-1].code == "agent_lost"
    assert c.metrics.agent_up.labels("1")._value.get() == 0 and c.metrics.agents_alive._value.get() == 1
