"""Simulated serving ranks against any coordinator: the fault scenarios' deployment.

Each rank is a real process running the simulation's serving loop (``sim.serving_loop``):
MoE layers with real gloo all-to-alls on a serving group (so ranks step in lockstep, as
vLLM's do), the live maps and rows, an exact output check on every step, and a real agent.
The coordinator is whatever the scenario needs: a thread it can inspect, a daemon it can
kill, behind a proxy that holds messages back.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import torch.distributed as dist
from child_context import CTX

from eplb_service.coordinator.status_client import fetch_status
from eplb_service.sim.serving_loop import RankSpec, run_rank
from eplb_service.sim.workload import SimModelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimCluster:
    """``world`` simulated ranks connecting to ``endpoint``; ``per_rank`` overrides ``RankSpec`` fields."""

    def __init__(
        self,
        world: int,
        endpoint: str,
        steps: int,
        seed: int = 0,
        model: SimModelConfig | None = None,
        step_sleep_s: float = 0.0,
        per_rank: dict[int, dict] | None = None,
        **common,
    ) -> None:
        self.world = world
        self.port = free_port()
        self.store = dist.TCPStore(
            "127.0.0.1", self.port, world, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
        )
        self.results = CTX.Queue()
        base = RankSpec(
            rank=0,
            world_size=world,
            steps=steps,
            seed=seed,
            model=model or SimModelConfig(),
            coordinator_endpoint=endpoint,
            serving_store_port=self.port,
            step_sleep_s=step_sleep_s,
            **common,
        )
        self.procs = [
            CTX.Process(
                target=run_rank,
                name=f"sim-rank-{r}",
                args=(replace(base, rank=r, **(per_rank or {}).get(r, {})), self.results),
            )
            for r in range(world)
        ]

    def start(self) -> "SimCluster":
        for p in self.procs:
            p.start()
        return self

    def pid(self, rank: int) -> int:
        return self.procs[rank].pid

    def collect(self, timeout_s: float = 180.0) -> dict[int, dict]:
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) < self.world and time.monotonic() < deadline:
            try:
                r = self.results.get(timeout=0.5)
                results[r["rank"]] = r
            except queue.Empty:
                if all(p.exitcode is not None for p in self.procs):
                    break
        self.stop()
        return results

    def stop(self) -> None:
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()


def record_in_ledger(results: dict[int, dict], world: int) -> None:
    """One JSON line per checked run into ``$EPLB_SERVICE_FAULT_LEDGER`` (``tests/fault_soak.py``
    sums them over its iterations); written before the asserts, so a failing run is counted too."""
    path = os.environ.get("EPLB_SERVICE_FAULT_LEDGER")
    if not path:
        return
    commits = [results[r]["commits"] for r in sorted(results)]
    entry = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
        "ranks": len(results),
        "mismatches": int(sum(r["mismatches"] for r in results.values())),
        "dead_agent_threads": sum(not r["agent_thread_alive"] for r in results.values()),
        "agent_resets": int(sum(r["agent_stats"].get("internal_errors", 0) for r in results.values())),
        "split_commits": not all(c == commits[0] for c in commits),
        "maps_differ": not all(results[r]["phy2log"] == results[min(results)]["phy2log"] for r in results),
        "plans_committed": len(commits[0]) if commits else 0,
        "errors": [r["error"] for r in results.values() if r["error"]],
        "rank_errors": sum(bool(r["error"]) for r in results.values()) + max(0, world - len(results)),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def assert_all_or_none(results: dict[int, dict], world: int) -> None:
    """Every rank finished, served every step exactly, committed the same plans at the same
    steps, holds the same maps, and its agent thread is alive and never had to reset."""
    record_in_ledger(results, world)
    assert sorted(results) == list(range(world)), f"ranks that reported: {sorted(results)}"
    errors = [r["error"] for r in results.values() if r["error"]]
    assert not errors, errors
    mismatches = {r: results[r]["mismatches"] for r in results}
    assert sum(mismatches.values()) == 0, f"output mismatches per rank: {mismatches}"
    commits = {r: results[r]["commits"] for r in results}
    assert all(c == commits[0] for c in commits.values()), f"ranks committed differently: {commits}"
    assert all(results[r]["phy2log"] == results[0]["phy2log"] for r in results), "maps differ between ranks"
    assert all(results[r]["agent_thread_alive"] for r in results), "an agent thread died"
    resets = {r: results[r]["agent_stats"].get("internal_errors", 0) for r in results}
    assert not any(resets.values()), f"agent loops that failed and reset: {resets}"


def daemon(endpoint: str, world: int, *extra: str, log_path: str | None = None) -> subprocess.Popen:
    """``eplb-coordinator`` as its own process (so a scenario can kill it)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", str(world), "--endpoint", endpoint, *extra],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def wait_status(endpoint: str, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = fetch_status(endpoint, timeout_s=0.5)
            if predicate(status):
                return status
        except TimeoutError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
