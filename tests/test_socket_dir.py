"""The ipc:// socket directory: created 0700 when missing, an existing one refused (never chmod-ed) unless private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from dir_modes import mode_of, shared_dir

from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory, prepare_ipc_dir


def test_a_missing_directory_is_created_private(tmp_path):
    directory = tmp_path / "run" / "eplb"
    old = os.umask(0)  # the 0700 must come from the code, not from a kind umask
    try:
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    finally:
        os.umask(old)
    assert directory.is_dir() and mode_of(directory) == 0o700


def test_an_existing_private_directory_is_taken_as_it_is(tmp_path):
    directory = tmp_path / "eplb"
    directory.mkdir(mode=0o700)
    prepare_ipc_dir(f"ipc://{directory}/c.sock")
    assert mode_of(directory) == 0o700


def test_a_directory_others_can_write_to_is_refused_and_left_alone(tmp_path):
    """Before: made 0700 without a word; with ipc:///tmp/c.sock as root that was /tmp itself."""
    directory = shared_dir(tmp_path / "shared", 0o1777)
    with pytest.raises(UnsafeSocketDirectory) as refused:
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    message = str(refused.value)
    assert f"socket directory {directory} has mode 1777, expected 0700" in message
    assert f"owner uid {os.geteuid()}" in message and "left as it is" in message
    assert "others can write there" in message and "directory of its own" in message
    assert "chmod" not in message, "a shared directory must not be chmod-ed, not even by the user on our word"
    assert mode_of(directory) == 0o1777


def test_a_directory_others_can_only_read_is_refused_with_the_chmod_to_run(tmp_path):
    directory = shared_dir(tmp_path / "mine", 0o755)
    with pytest.raises(UnsafeSocketDirectory, match=f"mode 0755, expected 0700.*`chmod 700 {directory}`"):
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    assert mode_of(directory) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_open_directory_is_refused_and_left_alone(tmp_path):
    directory = shared_dir(tmp_path / "theirs", 0o777)
    os.chown(directory, 65534, 65534)
    with pytest.raises(UnsafeSocketDirectory, match="owned by uid 65534"):
        prepare_ipc_dir(f"ipc://{directory}/c.sock")
    info = os.lstat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o777 and info.st_uid == 65534


def test_a_file_or_an_impossible_path_is_a_clear_refusal(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeSocketDirectory, match="is a symlink or not a directory"):
        prepare_ipc_dir(f"ipc://{tmp_path}/file/c.sock")
    with pytest.raises(UnsafeSocketDirectory, match="cannot create socket directory /proc/nope: "):
        prepare_ipc_dir("ipc:///proc/nope/c.sock")


def test_the_coordinator_refuses_a_shared_directory_without_changing_it(tmp_path):
    """The reviewer's case: `eplb-coordinator --dp 2 --endpoint ipc://$PWD/d/c.sock` with d at 1777."""
    directory = shared_dir(tmp_path / "d", 0o1777)
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", f"ipc://{directory}/c.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and f"socket directory {directory} has mode 1777" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert mode_of(directory) == 0o1777 and not (directory / "c.sock").exists()


def test_a_stopped_coordinator_removes_its_socket_file_but_not_a_successors(tmp_path):
    """Before: the ipc:// socket file stayed after a clean stop, an endpoint nobody listened on."""
    import os
    import socket as pysocket

    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.socket_dir import ipc_socket_identity, release_ipc_endpoint

    path = tmp_path / "c.sock"
    thread = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=f"ipc://{path}")).start()
    assert path.is_socket()
    thread.stop()
    assert not os.path.lexists(path)

    with pysocket.socket(pysocket.AF_UNIX) as first:  # a file bound, then replaced by another's
        first.bind(str(path))
        mine = ipc_socket_identity(f"ipc://{path}")
        os.unlink(path)
        with pysocket.socket(pysocket.AF_UNIX) as successor:
            successor.bind(str(path))
            release_ipc_endpoint(f"ipc://{path}", mine)
            assert path.is_socket(), "a socket file bound by someone else since is left alone"
    assert ipc_socket_identity("tcp://127.0.0.1:5555") is None and ipc_socket_identity("ipc://@abstract") is None


def _open_sockets() -> int:
    """Socket descriptors this process holds (ZeroMQ's listeners and connections among them)."""
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return count


def _remove_and_wait_for_rebind(path, watch_tick=None) -> None:
    import os

    os.unlink(path)
    deadline = time.monotonic() + 10
    while not path.is_socket():
        if watch_tick is not None:
            watch_tick()
        assert time.monotonic() < deadline, "the socket file was never bound again"
        time.sleep(0.01)
    time.sleep(0.05)  # the coordinator's watch reads the new file's inode after its bind


def test_a_socket_file_removed_again_and_again_leaves_no_listener_behind(tmp_path, monkeypatch):
    """Before: every bind after a removal kept the removed file's listener open, one socket
    descriptor more per removal (10 removals: 10 more), for as long as the coordinator ran."""
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator import socket_watch
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.status_client import fetch_status

    monkeypatch.setattr(socket_watch, "CHECK_EVERY_S", 0.01)
    path = tmp_path / "run" / "c.sock"
    thread = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=f"ipc://{path}")).start()
    try:
        _remove_and_wait_for_rebind(path)
        before = _open_sockets()
        for _ in range(10):
            _remove_and_wait_for_rebind(path)
        # ZeroMQ closes an unbound listener's descriptor on its I/O thread, a moment after the unbind
        deadline = time.monotonic() + 5
        while _open_sockets() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_sockets() <= before, "each removal must not leave its listener open"
        assert fetch_status(f"ipc://{path}", timeout_s=5)["pid"] > 0
    finally:
        thread.stop()


def test_listeners_of_removed_files_stay_for_registered_agents_up_to_a_bound(tmp_path):
    """With agents registered, the removed file's listener stays so their connections do (closing it
    closes them), but no more than ``MAX_LISTENERS`` of them: a file removed on a timer must not
    grow the coordinator's descriptors without end."""
    import zmq

    from eplb_service.coordinator.socket_watch import MAX_LISTENERS, SocketFileWatch
    from eplb_service.logutil import rank_logger

    path = tmp_path / "c.sock"
    endpoint = f"ipc://{path}"
    ctx = zmq.Context()
    router, agent = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(endpoint)
        clock = [0.0]
        watch = SocketFileWatch(endpoint, router, lambda: True, rank_logger("test", "coordinator"))

        def tick() -> None:
            clock[0] += 10.0
            watch.tick(clock[0])

        agent.connect(endpoint)
        agent.send(b"before")
        assert router.poll(5000) and router.recv_multipart()[1] == b"before"
        before = _open_sockets()
        _remove_and_wait_for_rebind(path, tick)
        agent.send(b"after")
        assert router.poll(5000) and router.recv_multipart()[1] == b"after"
        assert watch.listeners == 2 and _open_sockets() == before + 1, "the connection is kept with its listener"
        for _ in range(3 * MAX_LISTENERS):
            _remove_and_wait_for_rebind(path, tick)
            assert watch.listeners <= MAX_LISTENERS
        assert _open_sockets() <= before + MAX_LISTENERS - 1
        assert watch.rebinds == 3 * MAX_LISTENERS + 1
    finally:
        agent.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_file_removed_again_right_after_the_bind_is_bound_once_more(tmp_path):
    """Before: the inode read after the bind found nothing, the watch took that as "no ipc
    file to watch" and never bound again: the endpoint stayed unreachable until a restart."""
    import os

    import zmq

    from eplb_service.coordinator.socket_watch import SocketFileWatch
    from eplb_service.logutil import rank_logger

    path = tmp_path / "c.sock"
    endpoint = f"ipc://{path}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)

    class RemovedRightAfterBind:
        """The router, with a cleaner that removes the file the first time it is bound again."""

        removals = 0

        def bind(self, where: str) -> None:
            router.bind(where)
            if self.removals == 0:
                self.removals += 1
                os.unlink(path)

        def unbind(self, where: str) -> None:
            router.unbind(where)

    try:
        router.bind(endpoint)
        watch = SocketFileWatch(endpoint, RemovedRightAfterBind(), lambda: False, rank_logger("test", "coordinator"))
        os.unlink(path)
        watch.tick(10.0)
        assert not path.exists() and watch.rebinds == 1
        watch.tick(20.0)
        assert (
            path.is_socket() and watch.rebinds == 2 and watch.identity == (os.stat(path).st_dev, os.stat(path).st_ino)
        )
    finally:
        router.close(linger=0)
        ctx.term()


SQUATTER = """
import os, socket, sys
path = sys.argv[1]
os.unlink(path)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(4)
print("bound", flush=True)
sys.stdin.read()
"""


def test_a_socket_file_replaced_by_a_live_listener_is_reported_unready_and_taken_back_once_it_stops(
    tmp_path, monkeypatch, caplog
):
    """Before: one error line ("stop one of the two") and nothing else: /readyz said ready and
    status said nothing while every agent or client that connected reached the other process, and
    after that process stopped, its dead socket file kept the endpoint unreachable for good."""
    import logging
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator import socket_watch
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.status_client import fetch_status

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.metrics_port}/readyz", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_for(predicate, what: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    monkeypatch.setattr(socket_watch, "CHECK_EVERY_S", 0.05)
    path = tmp_path / "run" / "c.sock"
    endpoint = f"ipc://{path}"
    thread = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=endpoint, metrics_port=0)).start()
    coordinator = thread.coordinator
    try:
        assert readyz()[0] == 200 and coordinator.status()["endpoint_unreachable"] is None
        with caplog.at_level(logging.WARNING):
            squatter = subprocess.Popen(
                [sys.executable, "-c", SQUATTER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            try:
                assert squatter.stdout.readline() == "bound\n"
                wait_for(lambda: coordinator.status()["endpoint_unreachable"], "the replacement was never noticed")
                reason = coordinator.status()["endpoint_unreachable"]
                assert f"socket file {path} was replaced" in reason and f"pid {squatter.pid} (" in reason, reason
                code, body = readyz()
                assert code == 503 and body.startswith("unreachable: socket file"), (code, body)
                time.sleep(0.3)  # a few more checks: the file is not taken from a live listener, nor reported again
                assert path.is_socket() and coordinator.status()["endpoint_unreachable"] == reason
            finally:
                squatter.stdin.close()
                squatter.wait(10)
            wait_for(lambda: coordinator.status()["endpoint_unreachable"] is None, "the dead listener's file stayed")
        assert readyz()[0] == 200 and fetch_status(endpoint, timeout_s=5)["pid"] == coordinator.status()["pid"]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert f"listened on by pid {squatter.pid}" in errors[0] and f"stop pid {squatter.pid}" in errors[0]
        assert f"is no longer reachable at {endpoint}" in errors[0] and "[coordinator]" in caplog.text
    finally:
        thread.stop()


def test_listeners_at_the_bound_are_not_released_while_a_plan_is_in_flight(tmp_path):
    """Releasing the listeners closes the agents' connections, and their reconnect can abort a plan
    in flight: at the bound they are kept until a bind made between plans, which releases them all."""
    import zmq

    from eplb_service.coordinator.socket_watch import MAX_LISTENERS, SocketFileWatch
    from eplb_service.logutil import rank_logger

    path = tmp_path / "c.sock"
    endpoint = f"ipc://{path}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    in_flight = [True]
    try:
        router.bind(endpoint)
        clock = [0.0]
        watch = SocketFileWatch(
            endpoint, router, lambda: True, rank_logger("test", "coordinator"), plan_in_flight=lambda: in_flight[0]
        )

        def tick() -> None:
            clock[0] += 10.0
            watch.tick(clock[0])

        before = _open_sockets()
        for _ in range(MAX_LISTENERS + 2):
            _remove_and_wait_for_rebind(path, tick)
        assert watch.listeners == MAX_LISTENERS + 3, "released while a plan was in flight"
        assert _open_sockets() == before + MAX_LISTENERS + 2
        in_flight[0] = False
        _remove_and_wait_for_rebind(path, tick)
        assert watch.listeners == 1 and _open_sockets() == before, "not released once the plan was over"
    finally:
        router.close(linger=0)
        ctx.term()


def test_a_socket_that_cannot_be_probed_is_never_taken_for_a_stale_one(tmp_path, monkeypatch):
    """A connect that times out (a live coordinator with its accept backlog full) or is denied says
    nothing about whether a process listens: the claim refuses, and the file stays. Only a refused
    connection (nobody listens) makes it stale and removed."""
    import errno
    import socket

    from eplb_service.coordinator.socket_dir import EndpointUnavailable, claim_ipc_endpoint

    path = str(tmp_path / "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(path)  # a socket file; what the probe meets is set below
        for error in (TimeoutError("timed out"), PermissionError(errno.EACCES, "Permission denied")):

            def connect(self, address, error=error):
                raise error

            monkeypatch.setattr(socket.socket, "connect", connect)
            with pytest.raises(EndpointUnavailable, match="cannot check the endpoint's socket"):
                claim_ipc_endpoint(f"ipc://{path}")
            assert os.path.exists(path)
        monkeypatch.undo()
        assert claim_ipc_endpoint(f"ipc://{path}") == f"removed the stale socket {path} (no process listens on it)"
        assert not os.path.exists(path)
