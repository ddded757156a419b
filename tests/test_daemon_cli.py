"""The daemon as users run it: a real `eplb-coordinator` process, `status`, metrics, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from eplb_service.coordinator.status_client import fetch_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path):
    endpoint = f"ipc://{tmp_path}/run/coordinator.sock"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--tp", "2",
                             "--endpoint", endpoint, "--metrics-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            fetch_status(endpoint, timeout_s=0.5)
            break
        except TimeoutError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"daemon did not come up: {proc.stdout.read()}")
    yield endpoint, port, proc, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_status_table_json_metrics_and_graceful_sigterm(daemon):
    endpoint, port, proc, tmp_path = daemon
    ipc_dir = tmp_path / "run"
    assert (ipc_dir.stat().st_mode & 0o777) == 0o700, "the ipc socket directory must be private"
    out = subprocess.run([sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", endpoint],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "world 4" in out.stdout and "(not registered)" in out.stdout and "no load reported yet" in out.stdout
    out = subprocess.run([sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint", endpoint, "--json"],
                         capture_output=True, text=True, timeout=30)
    doc = json.loads(out.stdout)
    assert doc["world_size"] == 4 and doc["ranks"] == [None] * 4 and doc["plans"]["committed"] == 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("eplb_agents_alive", "eplb_plans_total", "eplb_moved_bytes_total", "eplb_commit_stall_seconds_bucket",
                 "eplb_load_reports_total", "eplb_plan_phase_seconds_bucket"):
        assert name in metrics, name
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in proc.stdout.read()


def test_status_against_nothing_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "eplb_service.coordinator.cli", "status", "--endpoint",
                          f"ipc://{tmp_path}/none.sock", "--timeout-s", "0.5"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "no answer from a coordinator at" in out.stderr
