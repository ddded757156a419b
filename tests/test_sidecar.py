"""`eplb-sidecar`: coordinator + (stand-in) vLLM, readiness, signals, and a coordinator crash."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from eplb_service.coordinator.status_client import fetch_status
from eplb_service.sidecar import ep_ranks_from_vllm_args

STAND_IN = str(pathlib.Path(__file__).with_name("stand_in_vllm.py"))


def test_rank_count_comes_from_the_vllm_flags():
    assert ep_ranks_from_vllm_args(["vllm", "serve", "m", "--data-parallel-size", "8", "--enable-expert-parallel"]) == (8, 1)
    assert ep_ranks_from_vllm_args(["serve", "-dp=4", "--tensor-parallel-size=2"]) == (4, 2)
    assert ep_ranks_from_vllm_args(["serve"]) == (1, 1)
    with pytest.raises(ValueError, match=r"--data-parallel-size 'x'"):
        ep_ranks_from_vllm_args(["-dp", "x"])


def start_sidecar(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    proc = subprocess.Popen([sys.executable, "-m", "eplb_service.sidecar", "--endpoint", endpoint, "--", sys.executable, STAND_IN,
                             "--data-parallel-size", "2", "--tensor-parallel-size", "2", "--enable-eplb"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:  # skip log lines until the stand-in reports it reached the coordinator
        if line.startswith('{"endpoint"'):
            return endpoint, proc, json.loads(line)
    raise AssertionError(f"the stand-in never reported; sidecar exit {proc.wait()}")


def test_sidecar_starts_coordinator_then_vllm_and_forwards_sigterm(tmp_path):
    endpoint, proc, first = start_sidecar(tmp_path)
    try:
        assert first["endpoint"] == endpoint and first["world_size"] == 4
        coordinator_pid = fetch_status(endpoint)["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7, "the sidecar must exit with vLLM's code"
        assert "stand-in stopping" in proc.stdout.read()
        with pytest.raises(ProcessLookupError):
            for _ in range(50):  # the coordinator was stopped too
                os.kill(coordinator_pid, 0)
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_coordinator_crash_never_stops_vllm_and_is_restarted(tmp_path):
    endpoint, proc, _ = start_sidecar(tmp_path)
    try:
        pid = fetch_status(endpoint)["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert proc.poll() is None, "vLLM (stand-in) must keep running"
        deadline = time.monotonic() + 30
        while True:
            try:
                new_pid = fetch_status(endpoint, timeout_s=0.5)["pid"]
                if new_pid != pid:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "coordinator not restarted"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()


def test_missing_vllm_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "eplb_service.sidecar", "--endpoint", "ipc:///tmp/x"], capture_output=True, text=True)
    assert out.returncode == 2 and "give the vLLM command after '--'" in out.stderr
