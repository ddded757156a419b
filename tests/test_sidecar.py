"""`eplb-sidecar`: coordinator + (stand-in) vLLM, readiness, signals, and a coordinator crash."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from child_signals import nohup, terminal_defaults

from eplb_service.coordinator.status_client import fetch_status

STAND_IN = str(pathlib.Path(__file__).with_name("stand_in_vllm.py"))


def sidecar_cmd(endpoint: str, *vllm: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "eplb_service.sidecar",
        "--endpoint",
        endpoint,
        "--",
        *vllm,
        "--data-parallel-size",
        "2",
        "--tensor-parallel-size",
        "2",
        "--enable-eplb",
    ]


def start_sidecar(tmp_path, cmd: list[str] | None = None, signals=terminal_defaults):
    """The sidecar running ``cmd`` (default: the stand-in, DP 2 x TP 2) once the stand-in reached
    the coordinator, started with the signal dispositions ``signals`` sets (:mod:`child_signals`)."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    proc = subprocess.Popen(
        cmd or sidecar_cmd(endpoint, sys.executable, STAND_IN),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=signals,
    )
    log = ""
    for line in proc.stdout:  # skip log lines until the stand-in reports it reached the coordinator
        if line.startswith('{"endpoint"'):
            return endpoint, proc, json.loads(line)
        log += line
    raise AssertionError(f"the stand-in never reported; sidecar exit {proc.wait()}:\n{log}")


def coordinator_pids(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"coordinator started \(pid (\d+)\)", log)]


def is_gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's reaper here may be a pid 1 that never reaps)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def assert_gone(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_gone(pid):
        assert time.monotonic() < deadline, f"coordinator pid {pid} still running {timeout_s}s after the sidecar ended"
        time.sleep(0.05)


def assert_nothing_answers(endpoint: str) -> None:
    with pytest.raises(TimeoutError):
        fetch_status(endpoint, timeout_s=0.5)


@pytest.mark.parametrize("given", [None, "team-a/qwen3-prod"])
def test_sidecar_passes_the_users_deployment_id_and_sets_none_itself(tmp_path, monkeypatch, given):
    """The plugin derives the id from vLLM's process group, the same on every node; an id drawn by
    the sidecar would differ from that of nodes started without it, and the deployment would
    refuse its own ranks. The user's own id reaches vLLM unchanged."""
    if given is None:
        monkeypatch.delenv("EPLB_SERVICE_DEPLOYMENT", raising=False)
    else:
        monkeypatch.setenv("EPLB_SERVICE_DEPLOYMENT", given)
    endpoint, proc, first = start_sidecar(tmp_path)
    try:
        assert first["deployment"] == given
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_sidecar_starts_coordinator_then_vllm_and_forwards_the_signal(tmp_path, sig):
    """SIGHUP/SIGQUIT: before, their default action killed the sidecar alone, leaving vLLM running unsupervised."""
    endpoint, proc, first = start_sidecar(tmp_path)
    try:
        assert first["endpoint"] == endpoint and first["world_size"] == 4
        coordinator_pid = fetch_status(endpoint)["pid"]
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 7, "the sidecar must exit with vLLM's code"
        assert "stand-in stopping" in proc.stdout.read()
        assert_gone(coordinator_pid)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "vllm, expected",
    [
        (["/nonexistent/vllm", "serve"], 127),  # command not found
        ([sys.executable, STAND_IN, "--exit-now", "3"], 3),  # fails at once
        ([sys.executable, STAND_IN, "--kill-self"], 128 + signal.SIGKILL),  # killed by a signal
    ],
    ids=["not-found", "exits-with-error", "killed"],
)
def test_a_failing_vllm_leaves_no_coordinator_behind(tmp_path, vllm, expected):
    endpoint = f"ipc://{tmp_path}/c.sock"
    out = subprocess.run(sidecar_cmd(endpoint, *vllm), capture_output=True, text=True, timeout=90)
    log = out.stdout + out.stderr
    assert out.returncode == expected, log
    assert "Traceback" not in log
    if expected == 127:
        assert "cannot start the vLLM command '/nonexistent/vllm'" in log
    (pid,) = coordinator_pids(log)
    assert_gone(pid, timeout_s=0)  # the sidecar waited for it
    assert_nothing_answers(endpoint)


def test_signal_before_vllm_starts_stops_the_coordinator_and_never_starts_vllm(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    proc = subprocess.Popen(
        sidecar_cmd(endpoint, sys.executable, STAND_IN),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=terminal_defaults,
    )
    try:
        log = ""
        for line in proc.stdout:
            log += line
            if coordinator_pids(line):  # the coordinator takes seconds to import torch and bind
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        log += proc.stdout.read()
        assert "vLLM started (pid" not in log and '{"endpoint"' not in log, log
        assert_gone(coordinator_pids(log)[0], timeout_s=0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sidecar_killed_by_sigkill_takes_the_coordinator_down_cleanly(tmp_path):
    endpoint, proc, first = start_sidecar(tmp_path)
    coordinator_pid = fetch_status(endpoint)["pid"]
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert_gone(coordinator_pid)
        assert_nothing_answers(endpoint)
        os.kill(first["pid"], signal.SIGTERM)  # the stand-in vLLM is not the sidecar's to stop once it is gone
        log = proc.stdout.read()
        assert re.search(r"coordinator.*stopped", log), f"the coordinator did not shut down cleanly (SIGTERM):\n{log}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in (first["pid"], coordinator_pid):  # left behind only if the test failed
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)


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


def test_under_nohup_the_hangup_stops_neither_the_sidecar_nor_vllm_nor_the_coordinator(tmp_path):
    """``nohup eplb-sidecar -- vllm serve ... &`` outlives the ssh session. Before, the sidecar
    installed its forwarder over nohup's SIGHUP ignore, so vLLM started with SIGHUP at its default
    and the session's hangup, forwarded, stopped vLLM."""
    endpoint, proc, first = start_sidecar(tmp_path, signals=nohup)
    try:
        assert first["sighup_ignored"], "vLLM must inherit nohup's ignored SIGHUP"
        coordinator_pid = fetch_status(endpoint)["pid"]
        os.killpg(proc.pid, signal.SIGHUP)  # the hangup reaches the session's whole process group
        time.sleep(1.0)
        assert proc.poll() is None and not is_gone(first["pid"]), "the sidecar or vLLM (stand-in) stopped"
        assert fetch_status(endpoint)["pid"] == coordinator_pid, "the coordinator stopped (and was restarted)"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        log = proc.stdout.read()
        assert "forwarding SIGHUP" not in log and "stand-in stopping" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_signal_vllm_ignores_leaves_the_coordinator_supervised(tmp_path):
    """Before: any forwarded signal ended the coordinator's supervision for good, so after a SIGHUP
    that vLLM ignores (it serves on), a coordinator that died was never restarted."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    _, proc, first = start_sidecar(tmp_path, sidecar_cmd(endpoint, sys.executable, STAND_IN, "--ignore-sighup"))
    try:
        pid = fetch_status(endpoint)["pid"]
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and not is_gone(first["pid"]), "vLLM (stand-in) ignores SIGHUP and serves on"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if fetch_status(endpoint, timeout_s=0.5)["pid"] != pid:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "the coordinator was not restarted after a signal vLLM ignored"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        log = proc.stdout.read()
        assert "forwarding SIGHUP to vLLM" in log and "stand-in stopping" in log, log
        assert len(coordinator_pids(log)) == 1, "the restart is logged after start_sidecar read the first start"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_missing_vllm_command_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.sidecar", "--endpoint", "ipc:///tmp/x"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "give the vLLM command after '--'" in out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--help", "--", "vllm", "serve"], ["-h", "--metrics-port", "9464"]])
def test_help_exits_zero_and_explains_the_vllm_command(argv):
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.sidecar", *argv], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("usage: eplb-sidecar") and "-- VLLM COMMAND" in out.stdout
    assert "eplb-coordinator serve --help" in out.stdout and "(default: 30.0)" in out.stdout


def test_second_sidecar_on_a_taken_endpoint_never_starts_vllm(tmp_path):
    endpoint, first, _ = start_sidecar(tmp_path)
    try:
        owner = fetch_status(endpoint)["pid"]
        out = subprocess.run(
            sidecar_cmd(endpoint, sys.executable, STAND_IN), capture_output=True, text=True, timeout=90
        )
        log = out.stdout + out.stderr
        assert out.returncode == 2, log  # found before its coordinator starts, as a tcp:// port in use is
        assert f"a coordinator (pid {owner}) already serves" in log and "coordinator started" not in log
        assert "vLLM started (pid" not in log, "vLLM was started against another sidecar's coordinator"
        assert fetch_status(endpoint)["pid"] == owner and first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 7
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.parametrize(
    "vllm_flags",
    [
        ["--data_parallel_size", "2", "--tensor_parallel_size=2", "--enable_eplb"],  # vLLM takes underscores
        ["--config", "V.YAML"],  # data_parallel_size: 2, tensor-parallel-size: 2, enable-eplb: true
        ["-dp", "2", "-pcp=2", "--enable-eplb"],  # EP group = DP x PCP x TP
    ],
    ids=["underscores", "config-file", "prefill-context-parallel"],
)
def test_the_coordinator_counts_the_ranks_vllm_runs_whatever_the_spelling(tmp_path, vllm_flags):
    config = tmp_path / "v.yaml"
    config.write_text("data_parallel_size: 2\ntensor-parallel-size: 2\nenable-eplb: true\n")
    flags = [str(config) if flag == "V.YAML" else flag for flag in vllm_flags]
    endpoint = f"ipc://{tmp_path}/c.sock"
    cmd = [sys.executable, "-m", "eplb_service.sidecar", "--endpoint", endpoint, "--", sys.executable, STAND_IN, *flags]
    _, proc, first = start_sidecar(tmp_path, cmd)
    try:
        assert first["world_size"] == 4, "the coordinator must wait for all of vLLM's EP ranks"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        assert "no --enable-eplb" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_lower_case_log_level_reaches_the_coordinator(tmp_path):
    """``logging`` takes upper-case names only: the sidecar spells the level out for the coordinator too."""
    out = subprocess.run(
        sidecar_cmd(f"ipc://{tmp_path}/c.sock", sys.executable, STAND_IN, "--exit-now", "3"),
        capture_output=True,
        text=True,
        timeout=90,
        env=dict(os.environ, EPLB_SERVICE_LOG_LEVEL="debug"),
    )
    log = out.stdout + out.stderr
    # vLLM's status: the coordinator took the level, started and was ready (one refusing it exits 2, and so would we)
    assert out.returncode == 3, log
    assert "Traceback" not in log and "Unknown level" not in log and "coordinator ready at" in log


def test_the_restart_back_off_starts_over_after_a_coordinator_that_ran_a_long_time(monkeypatch):
    """Before: the back-off only ever doubled, so after a few early crashes a coordinator that
    then ran for weeks and died waited the maximum (30 s) to come back. A run of at least
    ``STABLE_RUN_S`` now resets it; crashes in a row still double it."""
    from eplb_service import sidecar as sidecar_module

    clock = [1000.0]
    monkeypatch.setattr(sidecar_module.time, "monotonic", lambda: clock[0])

    class Process:
        returncode: int | None = None

        def poll(self) -> int | None:
            return self.returncode

    started: list[float] = []

    def start_coordinator(self) -> None:
        self.coordinator = Process()
        self._started_at = clock[0]
        started.append(clock[0])

    monkeypatch.setattr(sidecar_module.Sidecar, "_start_coordinator", start_coordinator)
    sidecar = sidecar_module.Sidecar(["vllm"], [], "ipc:///nonexistent/c.sock", 1.0, (2, 1))
    sidecar._start_coordinator()

    def crash_after(run_s: float) -> float:
        """The coordinator dies ``run_s`` after its start; returns how long its restart waited."""
        clock[0] += run_s
        sidecar.coordinator.returncode = 1
        died_at, restarts = clock[0], len(started)
        while len(started) == restarts:
            sidecar._supervise_coordinator()
            clock[0] += 0.2
        return started[-1] - died_at

    waits = [crash_after(1.0) for _ in range(6)]
    assert waits == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0, 30.0], abs=0.3)
    assert crash_after(sidecar_module.STABLE_RUN_S + 3600) == pytest.approx(sidecar_module.INITIAL_BACKOFF_S, abs=0.3)
    assert crash_after(1.0) == pytest.approx(2.0, abs=0.3)  # and crash-looping again doubles again


class ExitedCoordinator:
    """A coordinator process that has already exited with ``returncode`` (``None``: still running)."""

    pid = 4242

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


@pytest.mark.parametrize("code, expected", [(0, 1), (3, 3), (-signal.SIGKILL, 128 + signal.SIGKILL)])
def test_a_coordinator_that_exits_before_it_is_ready_ends_the_sidecar_with_its_code_never_0(
    monkeypatch, code, expected
):
    """vLLM is never started, so the sidecar did not do its job: exit 0 (the coordinator's own, when it
    gave none) would tell a wrapper script that vLLM ran and ended well. README: "1 if it gave none"."""
    from eplb_service import sidecar as sidecar_module

    monkeypatch.setattr(
        sidecar_module.Sidecar, "_start_coordinator", lambda self: setattr(self, "coordinator", ExitedCoordinator(code))
    )
    vllm_started: list[bool] = []
    monkeypatch.setattr(sidecar_module.Sidecar, "_start_vllm", lambda self: vllm_started.append(True))
    sidecar = sidecar_module.Sidecar(["vllm"], [], "ipc:///nonexistent/c.sock", 5.0, (2, 1))
    assert sidecar._run() == expected
    assert vllm_started == []


def test_only_the_sidecars_own_coordinator_answering_is_ready(monkeypatch):
    """Another coordinator answering at the endpoint (one that took it between the sidecar's check and
    its coordinator's bind) is not ours: vLLM would register with it while ours fails to start."""
    from eplb_service import sidecar as sidecar_module

    answering = {"pid": 777}
    monkeypatch.setattr(sidecar_module, "fetch_status", lambda endpoint, timeout_s: dict(answering))
    sidecar = sidecar_module.Sidecar(["vllm"], [], "ipc:///nonexistent/c.sock", 0.5, (2, 1))
    sidecar.coordinator = ExitedCoordinator(None)
    assert sidecar._wait_ready() is False
    answering["pid"] = ExitedCoordinator.pid
    assert sidecar._wait_ready() is True


def test_vllm_gets_the_sidecars_endpoint_over_an_inherited_one(monkeypatch):
    """A host-wide ``EPLB_SERVICE_ENDPOINT`` is replaced for vLLM by the sidecar's (README): else
    vLLM's workers would register with another coordinator than the one the sidecar started."""
    from eplb_service import sidecar as sidecar_module

    monkeypatch.setenv("EPLB_SERVICE_ENDPOINT", "tcp://10.0.0.5:5555")
    envs: list[dict] = []

    class Started:
        pid = 99

        def __init__(self, cmd, env) -> None:
            envs.append(env)

    monkeypatch.setattr(sidecar_module.subprocess, "Popen", Started)
    sidecar = sidecar_module.Sidecar(["vllm", "serve"], [], "ipc:///run/x/c.sock", 5.0, (2, 1))
    assert sidecar._start_vllm() is None
    assert [env["EPLB_SERVICE_ENDPOINT"] for env in envs] == ["ipc:///run/x/c.sock"]


def test_the_coordinator_is_stopped_with_sigterm_its_clean_shutdown():
    """SIGTERM lets the coordinator abort a plan in flight, tell the agents and close its ``--record``
    file; a SIGKILL would end it without any of that."""
    from eplb_service import sidecar as sidecar_module

    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    sidecar = sidecar_module.Sidecar(["vllm"], [], "ipc:///nonexistent/c.sock", 5.0, (2, 1))
    sidecar.coordinator = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert sidecar.coordinator.stdout.readline() == "ready\n"
        sidecar._stop_coordinator()
        assert sidecar.coordinator.returncode == 0, "the coordinator was not stopped by SIGTERM"
    finally:
        if sidecar.coordinator.poll() is None:
            sidecar.coordinator.kill()
        sidecar.coordinator.stdout.close()
