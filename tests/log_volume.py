"""Log lines per process under faults: a coordinator thread, agents in threads, a serving loop each.

Run as a script (``python tests/log_volume.py SCENARIO SECONDS``) to measure a scenario at the
default intervals; the scenario test (``test_log_volume.py``) runs the same scenarios shortened.
Every log record is counted by its tag (``coordinator``, ``rank N``) through a handler on the
root logger, so the count is what an operator's log pipeline would receive at level INFO.

Scenarios:
- ``coordinator_down``: the coordinator stops for ``down_s`` while the agents keep serving, then
  a new one starts on the same endpoint.
- ``malformed_reports``: rank 0's load reports have the wrong shape; the coordinator drops each
  one and answers ``Reject(bad_message)``.
- ``flapping``: rank 1's agent stops (Goodbye) and starts again every ``flap_s``.
- ``unknown_epoch``: rank 0's load reports name an epoch the coordinator does not hold.
"""

from __future__ import annotations

import collections
import logging
import shutil
import sys
import tempfile
import threading
import time

import msgspec
import torch
from conftest import make_model
from coordinator_thread import CoordinatorThread

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.transport_gloo import GlooTransport

SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


class LineCounter(logging.Handler):
    """Counts records at or above ``level`` by tag, and keeps them for assertions."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.by_tag: collections.Counter = collections.Counter()
        self.records: list[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.by_tag[getattr(record, "eplb_tag", None) or record.name] += 1
            self.records.append(record)

    def lines(self, tag: str, since: float = 0.0) -> list[str]:
        with self._lock2:
            return [r.getMessage() for r in self.records if r.created >= since and r.eplb_tag == tag]


class MalformedReportAgent(WorkerAgent):
    """Sends each load report with one slot too few (an old or buggy agent)."""

    def _load_report(self, snap, counts):
        return super()._load_report(snap, counts[:, :-1].copy())


class UnknownEpochReportAgent(WorkerAgent):
    """Reports load at an epoch the coordinator never heard of (what a rank does for a moment after a commit)."""

    def _load_report(self, snap, counts):
        return msgspec.structs.replace(super()._load_report(snap, counts), epoch=snap.epoch + 7)


class Serving:
    """One rank's serving loop in a thread: ``after_step`` with a fixed load every ``step_s``."""

    def __init__(self, agent: WorkerAgent, step_s: float) -> None:
        self.agent, self.step_s = agent, step_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        load = torch.ones((SHAPE.num_layers, SHAPE.num_physical), dtype=torch.int32)
        while not self.stop.is_set():
            hooks = self.agent.hooks
            hooks.before_step()
            hooks.after_step(load)
            time.sleep(self.step_s)


def coordinator_config(endpoint: str, agent: protocol.AgentConfig) -> CoordinatorConfig:
    return CoordinatorConfig(
        world_size=SHAPE.num_ranks,
        endpoint=endpoint,
        agent=agent,
        check_step_clock=False,
        rebalance_interval_steps=10**9,
        liveness_timeout_s=max(3.0, 5 * agent.heartbeat_interval_s),
    )


def run(scenario: str, seconds: float, agent_cfg: protocol.AgentConfig, step_s: float = 0.01, **kw) -> dict:
    """Runs ``scenario`` for about ``seconds``; returns the lines per tag while the fault lasted
    (``during``), after it cleared (``after``), and the counter (``counter``)."""
    counter = LineCounter()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(counter)
    root.setLevel(logging.INFO)
    tmp = tempfile.mkdtemp(prefix="eplb-logvol-")
    endpoint = f"ipc://{tmp}/c.sock"
    overrides = {f: getattr(agent_cfg, f) for f in agent_cfg.__struct_fields__}
    coords = [CoordinatorThread(coordinator_config(endpoint, agent_cfg)).start()]
    classes = {"malformed_reports": MalformedReportAgent, "unknown_epoch": UnknownEpochReportAgent}

    def agent(rank: int) -> WorkerAgent:
        cls = classes.get(scenario, WorkerAgent) if rank == 0 else WorkerAgent
        return cls(make_model(rank, SHAPE), endpoint, GlooTransport(), config_overrides=overrides).start()

    agents = [agent(r) for r in range(SHAPE.num_ranks)]
    servings = [Serving(a, step_s) for a in agents]
    try:
        deadline = time.monotonic() + 20
        while not all(a.welcomed for a in agents):
            assert time.monotonic() < deadline, "agents not welcomed"
            time.sleep(0.02)
        time.sleep(1.0)
        fault_begin = time.time()
        counter.by_tag.clear()
        if scenario == "coordinator_down":
            coords[0].stop()
            time.sleep(seconds)
            coords.append(CoordinatorThread(coordinator_config(endpoint, agent_cfg)).start())
        elif scenario == "flapping":
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                servings[1].stop.set()
                agents[1].stop()
                agents[1] = agent(1)
                servings[1] = Serving(agents[1], step_s)
                time.sleep(kw.get("flap_s", 3.0))
        else:
            time.sleep(seconds)
        fault_end = time.time()
        during = dict(counter.by_tag)
        deadline = time.monotonic() + 20
        while not all(a.welcomed for a in agents):
            assert time.monotonic() < deadline, "agents not welcomed again"
            time.sleep(0.02)
        time.sleep(kw.get("settle_s", 2.0))
        after = {
            tag: n - during.get(tag, 0) for tag, n in counter.by_tag.items() if n - during.get(tag, 0) or tag in during
        }
        return {
            "during": during,
            "after": after,
            "fault_s": fault_end - fault_begin,
            "counter": counter,
            "fault_begin": fault_begin,
        }
    finally:
        for s in servings:
            s.stop.set()
        for a in agents:
            a.stop()
        for c in coords:
            c.stop()
        root.removeHandler(counter)
        root.setLevel(old_level)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    scenario, seconds = sys.argv[1], float(sys.argv[2])
    result = run(scenario, seconds, protocol.AgentConfig(), step_s=0.01)
    per_min = {tag: round(n * 60 / result["fault_s"], 1) for tag, n in sorted(result["during"].items())}
    print(f"{scenario}: fault {result['fault_s']:.1f}s, lines during {result['during']}, per minute {per_min}")
    print(f"  after the fault cleared: {result['after']}")
    counts = collections.Counter(
        (r.eplb_tag, r.levelname, r.msg if isinstance(r.msg, str) else str(r.msg))
        for r in result["counter"].records
        if r.created >= result["fault_begin"]
    )
    for (tag, level, msg), n in counts.most_common(12):
        print(f"  {n:5d} {tag} {level} {msg[:110]}")


if __name__ == "__main__":
    main()
