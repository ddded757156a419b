"""The daemon as users run it: a real `eplb-coordinator` process, `status`, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from child_signals import nohup, terminal_defaults
from conftest import free_port
from test_host_resources import coordinator_under

from eplb_service.coordinator.status_client import fetch_status


def answers_status(endpoint: str, proc: subprocess.Popen, timeout_s: float = 30) -> bool:
    """Whether the daemon ``proc`` answers a status request at ``endpoint`` before it exits or time is up."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            fetch_status(endpoint, timeout_s=0.5)
            return True
        except TimeoutError:
            continue
    return False


def start_daemon(tmp_path, signals=terminal_defaults):
    """``eplb-coordinator --dp 2 --tp 2`` serving, started with the signal dispositions ``signals``
    sets (:mod:`child_signals`): (endpoint, metrics port, process)."""
    endpoint = f"ipc://{tmp_path}/run/coordinator.sock"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eplb_service.coordinator.cli",
            "--dp",
            "2",
            "--tp",
            "2",
            "--endpoint",
            endpoint,
            "--metrics-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=signals,
    )
    if not answers_status(endpoint, proc):
        proc.kill()
        pytest.fail(f"daemon did not come up: {proc.stdout.read()}")
    return endpoint, port, proc


@pytest.fixture
def daemon(tmp_path):
    endpoint, port, proc = start_daemon(tmp_path)
    yield endpoint, port, proc, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_status_table_json_metrics_and_graceful_sigterm(daemon):
    endpoint, port, proc, tmp_path = daemon
    ipc_dir = tmp_path / "run"
    assert (ipc_dir.stat().st_mode & 0o777) == 0o700, "the ipc socket directory must be private"
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "world 4" in out.stdout and "(not registered)" in out.stdout and "no load reported yet" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", endpoint, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    doc = json.loads(out.stdout)
    assert doc["world_size"] == 4 and doc["ranks"] == [None] * 4 and doc["plans"]["committed"] == 0
    assert doc["load_persistence"] is None  # no plan has measured it yet
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "eplb_agents_alive",
        "eplb_plans_total",
        "eplb_moved_bytes_total",
        "eplb_commit_stall_seconds_bucket",
        "eplb_load_reports_total",
        "eplb_plan_phase_seconds_bucket",
        "eplb_load_persistence",
    ):
        assert name in metrics, name
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in proc.stdout.read()


def run_into(stdout, *argv: str) -> tuple[int, str]:
    """``argv`` (a module run as a command) with ``stdout`` as given: ``"closed"``, a pipe whose
    reader is gone before the child writes (as ``| head -1`` that has read its line), or a file."""
    if stdout == "closed":
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        proc.stdout.close()
        return proc.wait(timeout=60), proc.stderr.read()
    out = subprocess.run([sys.executable, "-m", *argv], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)
    return out.returncode, out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_status_and_keygen_into_a_closed_pipe_or_a_full_disk_end_without_a_traceback(daemon):
    """Before: ``status | head -1`` ended, now and then, in a ``BrokenPipeError`` traceback, and
    ``status > /dev/full`` (a full disk) in an ``OSError`` one; ``keygen`` the same."""
    endpoint, _, _, tmp_path = daemon
    for argv in (
        ["eplb_service.coordinator.cli", "status", "--endpoint", endpoint],
        ["eplb_service.coordinator.cli", "keygen", str(tmp_path / "keys")],
    ):
        code, err = run_into("closed", *argv)
        assert (code, err) == (141, ""), err  # as a command SIGPIPE ends: the reader chose to stop
        with open("/dev/full", "w") as full:
            code, err = run_into(full, *argv)
        assert code == 1 and err.count("\n") == 1, err
        assert err == f"eplb-coordinator {argv[1]}: error: cannot write to stdout: No space left on device\n"


def test_status_against_nothing_fails_clearly(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eplb_service.coordinator.cli",
            "status",
            "--endpoint",
            f"ipc://{tmp_path}/none.sock",
            "--timeout-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        out.returncode == 1 and f"no coordinator at ipc://{tmp_path}/none.sock: there is no socket file" in out.stderr
    )


def test_status_against_a_dead_coordinators_socket_or_another_file_fails_at_once(tmp_path):
    """Before: a socket file nobody listens on (a SIGKILLed coordinator's), or a plain file, at the
    endpoint waited out the whole --timeout-s and said only "no answer"; a script polling status
    while a coordinator restarts paid the timeout every time."""
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: as a killed coordinator leaves it
    (tmp_path / "file.sock").write_text("")
    for name, expected in [
        ("stale.sock", f"nothing listens on the socket file {stale} (left by a coordinator that was killed"),
        ("file.sock", f"{tmp_path}/file.sock is not a socket; expected a coordinator's ipc:// socket"),
    ]:
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", f"ipc://{tmp_path}/{name}"]
            + ["--timeout-s", "20"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert f"no coordinator at ipc://{tmp_path}/{name}: {expected}" in out.stderr
        assert elapsed < 10, f"waited {elapsed:.1f}s, as if for the answer of a --timeout-s 20"
        assert os.path.exists(tmp_path / name)  # status looks, never removes


def test_sigterm_mid_plan_aborts_cleanly_and_agents_keep_serving(tmp_path):
    from agent_process import AgentSpec, agent_main
    from child_context import CTX as ctx

    from eplb_service.placement import PlacementShape

    endpoint = f"ipc://{tmp_path}/c.sock"
    # A 20 B/s throttle keeps the first plan in staging for seconds: long enough to SIGTERM it.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eplb_service.coordinator.cli",
            "--dp",
            "2",
            "--endpoint",
            endpoint,
            "--rebalance-interval-steps",
            "30",
            "--report-interval-steps",
            "5",
            "--throttle-bytes-per-s",
            "20",
            "--log-format",
            "json",
            "--no-step-clock-check",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ctx.Queue()
    shape = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)
    agents = [ctx.Process(target=agent_main, args=(AgentSpec(r, endpoint, shape, steps=1500), out)) for r in range(2)]
    for a in agents:
        a.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status = fetch_status(endpoint, timeout_s=0.5)
                if (status["plan_in_flight"] or {}).get("phase") == "staging":
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "no plan reached staging"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        results = {}
        while len(results) < 2:
            r = out.get(timeout=60)
            results[r["rank"]] = r
    finally:
        for a in agents:
            a.join(10)
            if a.is_alive():
                a.kill()
        if proc.poll() is None:
            proc.kill()
    logs = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    assert any("aborted" in entry["msg"] and "shutting down" in entry["msg"] for entry in logs), (
        "no clean-abort log line"
    )
    assert all(
        entry["tag"] == "coordinator" for entry in logs if entry["logger"].startswith("eplb_service.coordinator.server")
    )
    for r in results.values():
        assert r["epoch"] == 0 and r["commits"] == [] and r["rows_match_maps"]
        assert r["stats"].get("aborted", 0) >= 1, "the agent did not drop the staged plan"
        # Disturbed serving waits out the fence (5 s by default); a loaded 2-core machine's worst
        # step of 1500 can reach a few hundred ms on its own (a GC pause, the agent thread's GIL).
        assert r["steps"] == 1500 and r["max_step_s"] < 2.0, "serving was disturbed by the coordinator's exit"


def test_a_flood_of_idle_http_connections_keeps_no_one_else_out(tmp_path):
    """Every HTTP connection held a file descriptor until its 5 s read timeout, without limit:
    400 idle connections to --metrics-port (open to the network) used up a coordinator's 256
    descriptors, and then neither a status client nor an agent could connect over ZeroMQ, and
    probes got no answer. Connections past the cap are answered 503 at once and closed."""
    import resource

    endpoint, port = f"ipc://{tmp_path}/run/coordinator.sock", free_port()

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--endpoint", endpoint, "--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=few_descriptors,
    )
    idle: list[socket.socket] = []
    try:
        assert answers_status(endpoint, proc), "daemon did not come up"
        for _ in range(400):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)  # let the coordinator accept what it will
        assert fetch_status(endpoint, timeout_s=3)["world_size"] == 1, "a status client still gets in"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            probe.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = probe.recv(4096)
        assert answer.startswith((b"HTTP/1.1 503", b"HTTP/1.1 200")), answer
        for sock in idle:
            sock.close()
        idle.clear()
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            assert reply.status == 200
        assert proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait()


def test_sigterm_with_http_connections_open_stops_without_tracebacks(daemon):
    """Before: every HTTP connection still open at a clean stop (a probe or scrape in progress, a
    client that never sent its request) put an ERROR and a CancelledError traceback of ~20 lines
    in the log: asyncio logs a connection handler that ends cancelled."""
    endpoint, port, proc, _ = daemon
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        idle[1].sendall(b"GET /status HTTP/1.1\r\n")
        time.sleep(0.3)  # accepted and reading
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        for sock in idle:
            sock.close()
    out = proc.stdout.read()
    assert "stopped" in out
    assert "Traceback" not in out and "ERROR" not in out, out


@pytest.mark.slow  # 15 s: the handshake timeout itself
def test_idle_connections_to_the_zmq_endpoint_are_dropped_within_the_handshake_timeout(tmp_path):
    """A peer that opens TCP connections to the ROUTER and never completes the ZeroMQ handshake
    (no bytes, or half a greeting) holds a descriptor per connection. Before: for ZeroMQ's
    default 30 s; with 256 descriptors, 300 such connections kept every status client and agent
    out for 30 s. Now they are dropped after ``HANDSHAKE_TIMEOUT_S`` (15 s) and a status client
    gets in while the peer still holds its ends open."""
    from eplb_service.coordinator.server import HANDSHAKE_TIMEOUT_S

    proc, endpoint = coordinator_under(256, 256)
    idle: list[socket.socket] = []
    try:
        assert answers_status(endpoint, proc), "daemon did not come up"
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        for i in range(300):
            try:
                conn = socket.create_connection((host, int(port)), timeout=0.5)
            except OSError:  # the backlog is full while the coordinator has no descriptor to accept with
                continue
            if i % 2:
                conn.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01")  # half a greeting
            idle.append(conn)
        started = time.monotonic()
        assert answers_status(endpoint, proc, timeout_s=3 * HANDSHAKE_TIMEOUT_S), "no status client got in"
        waited = time.monotonic() - started
        assert waited < 3 * HANDSHAKE_TIMEOUT_S and proc.poll() is None
    finally:
        for conn in idle:
            conn.close()
        proc.kill()
        proc.wait()


def test_the_daemon_raises_its_soft_descriptor_limit_to_the_hard_one(tmp_path):
    """Before: the daemon kept the 1024 soft limit systemd and shells hand out (256 here), however
    high the hard one, so a few hundred idle connections left no descriptor for agents."""
    proc, endpoint = coordinator_under(256, 4096, endpoint=f"ipc://{tmp_path}/run/coordinator.sock")
    try:
        assert answers_status(endpoint, proc), "daemon did not come up"
        with open(f"/proc/{proc.pid}/limits") as limits:
            line = next(row for row in limits if row.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        proc.kill()
        proc.wait()


def test_readme_toml_example_is_a_valid_config(tmp_path):
    import pathlib
    import re

    from eplb_service.coordinator.cli import config_from_args, parse_command_line

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, flags=re.S).group(1)
    path = tmp_path / "eplb.toml"
    path.write_text(block)
    cfg = config_from_args(parse_command_line(["--config", str(path), "--metrics-port", "9500"]))
    assert cfg.world_size == 8 and cfg.metrics_port == 9500 and cfg.staging_budget_bytes == 2 << 30


def test_second_coordinator_on_a_live_endpoint_refuses_and_names_the_first(daemon):
    endpoint, _, first, _ = daemon
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert f"a coordinator (pid {first.pid}) already serves {endpoint}" in out.stderr
    assert first.poll() is None and fetch_status(endpoint)["pid"] == first.pid, (
        "the first coordinator lost its endpoint"
    )


def test_stale_socket_of_a_dead_coordinator_is_replaced(tmp_path):
    import socket

    (tmp_path / "run").mkdir(mode=0o700)
    path = tmp_path / "run" / "c.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nothing listens: what a SIGKILLed coordinator leaves
    endpoint = f"ipc://{path}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert fetch_status(endpoint, timeout_s=0.5)["pid"] == proc.pid
                break
            except TimeoutError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    "the coordinator did not take the stale endpoint"
                )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert f"removed the stale socket {path}" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_endpoint_held_by_a_silent_listener_or_a_plain_file_is_left_alone(tmp_path):
    import socket

    from eplb_service.coordinator.socket_dir import EndpointUnavailable, claim_ipc_endpoint

    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(EndpointUnavailable, match="listens on .* but does not answer as a coordinator"):
            claim_ipc_endpoint(f"ipc://{path}", probe_timeout_s=0.3)
        assert path.is_socket(), "a socket someone listens on must not be removed"
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(EndpointUnavailable, match="is not a socket"):
        claim_ipc_endpoint(f"ipc://{path}")
    assert path.read_text() == "not a socket"
    assert claim_ipc_endpoint(f"ipc://{tmp_path}/absent.sock") is None
    assert claim_ipc_endpoint("tcp://127.0.0.1:5555") is None


def test_the_coordinator_imports_no_torch():
    """A daemon and sidecar start fast and small: the rendezvous store lives on rank 0's worker."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, eplb_service.coordinator.cli, eplb_service.coordinator.server, "
            "eplb_service.sidecar; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_removed_socket_directory_is_bound_again_and_keeps_a_second_coordinator_out(daemon):
    """``rm -rf`` of the run directory under a running daemon: without the rebind, status and every
    agent that reconnects were refused for good, and a second coordinator started there freely."""
    import shutil

    endpoint, _, first, tmp_path = daemon
    shutil.rmtree(tmp_path / "run")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert fetch_status(endpoint, timeout_s=0.5)["pid"] == first.pid
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the coordinator never became reachable again at its endpoint"
    assert ((tmp_path / "run").stat().st_mode & 0o777) == 0o700, "the re-created socket directory must be private"
    second = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and f"a coordinator (pid {first.pid}) already serves {endpoint}" in second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    assert (
        f"the socket file of {endpoint} was removed while this coordinator ran; bound it again" in first.stdout.read()
    )
    assert not (tmp_path / "run" / "coordinator.sock").exists(), "the rebound socket file must be removed at stop"


def test_sighup_stops_the_daemon_as_cleanly_as_sigterm(daemon):
    """A daemon started from a shell gets SIGHUP when the session closes; its default action killed it
    abruptly: agents not told, the socket file left behind."""
    endpoint, _, proc, tmp_path = daemon
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=15) == 0
    out = proc.stdout.read()
    assert "SIGHUP received: stopping" in out and "stopped" in out
    assert not (tmp_path / "run" / "coordinator.sock").exists(), "a clean stop removes the socket file"


def test_a_daemon_started_under_nohup_serves_on_through_sighup(tmp_path):
    """``nohup eplb-coordinator ... &``: the hangup at the end of the ssh session must not stop it.
    Before, the daemon handled SIGHUP over nohup's ignore and stopped at logout."""
    endpoint, _, proc = start_daemon(tmp_path, signals=nohup)
    try:
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None and answers_status(endpoint, proc, timeout_s=10), "stopped by an ignored SIGHUP"
        proc.send_signal(signal.SIGTERM)  # still stops cleanly on the signals it was left
        assert proc.wait(timeout=15) == 0
        assert "SIGHUP" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_systemd_unit_starts_a_valid_command_and_does_not_restart_a_refused_one():
    """Before: ``Restart=on-failure`` restarted a coordinator refused for a typo (exit 2) every 2 s,
    each time one more identical error line, until systemd's start limit (by default 5 starts in
    10 s, which starts 2 s apart plus their own start-up time may never reach)."""
    import pathlib
    import shlex

    from eplb_service.coordinator.cli import config_from_args, parse_command_line

    unit = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "eplb-coordinator.service"
    settings = dict(
        line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    command = shlex.split(settings["ExecStart"])
    assert command[0].endswith("/eplb-coordinator")
    cfg = config_from_args(parse_command_line(command[1:]))
    assert cfg.endpoint == "ipc:///run/eplb-service/coordinator.sock" and settings["RuntimeDirectoryMode"] == "0700"
    assert settings["Restart"] == "on-failure" and settings["RestartPreventExitStatus"].split() == ["2"]
