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


def test_sigterm_mid_plan_aborts_cleanly_and_agents_keep_serving(tmp_path):
    import multiprocessing as mp
    import queue

    from agent_process import AgentSpec, agent_main
    from eplb_service.placement import PlacementShape

    endpoint = f"ipc://{tmp_path}/c.sock"
    # A 20 B/s throttle keeps the first plan in staging for seconds: long enough to SIGTERM it.
    proc = subprocess.Popen([sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", "2", "--endpoint", endpoint,
                             "--rebalance-interval-steps", "30", "--report-interval-steps", "5",
                             "--throttle-bytes-per-s", "20", "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = mp.get_context("spawn")
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
    assert any("aborted" in entry["msg"] and "shutting down" in entry["msg"] for entry in logs), "no clean-abort log line"
    assert all(entry["tag"] == "coordinator" for entry in logs if entry["logger"].startswith("eplb_service.coordinator.server"))
    for r in results.values():
        assert r["epoch"] == 0 and r["commits"] == [] and r["rows_match_maps"]
        assert r["stats"].get("aborted", 0) >= 1, "the agent did not drop the staged plan"
        assert r["steps"] == 1500 and r["max_step_s"] < 0.5, "serving was disturbed by the coordinator's exit"


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
