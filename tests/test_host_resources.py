"""Host resources the coordinator runs short of: open files (``ulimit -n``).

Before, a coordinator at its open-file limit said nothing: ZeroMQ's I/O thread retried the
accept in a busy loop (a core at 100%), status clients and reconnecting ranks timed out,
and no line named the limit. A soft limit below what ``--dp`` needs was kept although the
hard limit allowed more.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import zmq
from sim_cluster import free_port

from eplb_service.coordinator.status_client import fetch_status


def coordinator_under(soft: int, hard: int, world: int = 1, endpoint: str = "") -> tuple[subprocess.Popen, str]:
    """The daemon started under ``ulimit -n soft`` (hard ``hard``), on ``endpoint`` (a free
    ``tcp://`` port by default); its output (stderr too) is on ``stdout``."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", str(world), "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
    )
    return proc, endpoint


def answers(endpoint: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            fetch_status(endpoint, timeout_s=1)
            return True
        except TimeoutError:
            pass
    return False


def connect(endpoint: str, n: int) -> tuple[zmq.Context, list[zmq.Socket]]:
    ctx = zmq.Context()
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    return ctx, socks


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_a_hard_open_file_limit_below_one_connection_per_rank_refuses_the_start():
    proc, _ = coordinator_under(40, 40, world=32)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        out = stop(proc)
        raise AssertionError(f"the coordinator started under ulimit -n 40 for 32 ranks:\n{out}") from None
    assert proc.returncode == 1, out
    assert "open-file limit (ulimit -n) 40 (hard limit 40) is too low for --dp 32" in out, out
    assert "Traceback" not in out, out


def test_a_low_soft_open_file_limit_is_raised_to_what_the_ranks_need():
    proc, endpoint = coordinator_under(48, 4096, world=16)
    ctx, socks = connect(endpoint, 40)  # more than 48 - the ~20 a coordinator holds at start
    try:
        assert answers(endpoint, 15), "no status answer with 40 connections under a soft limit of 48"
    finally:
        for s in socks:
            s.close()
        ctx.term()
        out = stop(proc)
    assert "raised the open-file limit (ulimit -n) from 48 to" in out, out


def test_running_out_of_open_files_is_logged_naming_the_limit():
    proc, endpoint = coordinator_under(40, 40, world=8)
    assert answers(endpoint, 15), "daemon did not come up"
    ctx, socks = connect(endpoint, 40)
    try:
        time.sleep(5)  # two checks of the watch
    finally:
        for s in socks:
            s.close()
        ctx.term()
        out = stop(proc)
    assert "of 40 open files in use (ulimit -n): at the limit" in out, out
    assert "ERROR" in out and "Traceback" not in out, out
