"""Does anything grow while a deployment runs for weeks? RSS, fds and threads under repetition.

Four cases, each printing one JSON line per sample and a summary line:

- ``commits``: the simulated deployment (real coordinator on this process, two real agent
  processes) with a fast-drifting load and a short rebalance interval, for ``--commits`` x 60
  steps (at least ``--commits`` commits; 200 gave 298); the coordinator's RSS, fds and threads
  sampled every second.
- ``reopens``: one agent's coordinator link reopened ``--reopens`` times (what an agent does
  after 4 silent heartbeat intervals): fds and threads of the process.
- ``gloo``: ``--cycles`` side-communicator generations built and torn down by two gloo
  transports (threads of this process): fds, threads, RSS.
- ``restarts``: a real coordinator (thread of this process) started and stopped
  ``--restarts`` times while two real agents stay up and register with each one.

Usage: ``python bench/long_running.py commits|reopens|gloo|restarts [...]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def usage() -> dict:
    """This process's RSS (MiB), open fds and OS threads."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(fields["Threads"]),
    }


def report(case: str, samples: list[dict]) -> None:
    first, last = samples[0], samples[-1]
    peak = {k: max(s[k] for s in samples) for k in ("rss_mib", "fds", "threads")}
    print(json.dumps({"case": case, "first": first, "last": last, "peak": peak}), flush=True)


def commits(n: int) -> None:
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.sim.deployment import SimulationOptions, run_simulation
    from eplb_service.sim.workload import SimModelConfig

    samples: list[dict] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(1.0):
            samples.append({"t_s": round(time.monotonic() - t0), **usage()})
            print(json.dumps(samples[-1]), flush=True)

    cfg = CoordinatorConfig(
        world_size=2, rebalance_interval_steps=25, min_window_steps=20, load_half_life_steps=20, min_gain=0.0
    )
    steps = n * 60
    opts = SimulationOptions(
        world_size=2, steps=steps, model=SimModelConfig(drift_interval_steps=30), timeout_s=3600, progress_interval_s=60
    )
    threading.Thread(target=sample, daemon=True).start()
    summary = run_simulation(opts, cfg)
    done.set()
    print(json.dumps({k: summary[k] for k in ("committed", "aborted", "output_mismatches", "wall_s", "errors")}))
    report("commits", samples)


def reopens(n: int) -> None:
    import collections
    import logging

    from eplb_service.worker_agent.link import CoordinatorLink

    link = CoordinatorLink(
        0,
        "ipc:///tmp/eplb-bench-nowhere.sock",
        None,
        collections.Counter(),
        logging.LoggerAdapter(logging.getLogger("x")),
    )
    link.open()
    samples = [usage()]
    for i in range(1, n + 1):
        link.open()
        link.receive(0)
        time.sleep(0.001)  # an agent reopens after 4 silent heartbeats (seconds): let zmq's reaper keep up
        if i % 100 == 0:
            samples.append({"reopens": i, **usage()})
    link.close()
    samples.append({"reopens": n, "closed": True, **usage()})
    report("reopens", samples)


def gloo(n: int) -> None:
    import torch.distributed as dist

    from eplb_service.protocol import CommInit
    from eplb_service.worker_agent.transport_gloo import GlooTransport

    server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    transports = [GlooTransport(), GlooTransport()]
    samples = [usage()]
    for gen in range(1, n + 1):
        comm = CommInit(generation=gen, store_host="127.0.0.1", store_port=server.port, world_size=2, nonce="bench")
        threads = [threading.Thread(target=t.connect, args=(comm, r, 30.0)) for r, t in enumerate(transports)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in transports:
            t.abort()
        for key in transports[0].store_keys(comm):
            server.delete_key(key)
        if gen % 20 == 0:
            time.sleep(0.2)  # the teardown threads end
            samples.append({"cycles": gen, "store_keys": server.num_keys(), **usage()})
    report("gloo", samples)


def restarts(n: int) -> None:
    import tempfile

    from conftest import make_model
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.placement import PlacementShape
    from eplb_service.worker_agent.agent import WorkerAgent
    from eplb_service.worker_agent.transport_gloo import GlooTransport

    shape = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)
    tmp = tempfile.mkdtemp(prefix="eplb-bench-")
    endpoint = f"ipc://{tmp}/c.sock"
    agents = [
        WorkerAgent(make_model(r, shape), endpoint, GlooTransport(), hello_interval_s=0.05).start() for r in range(2)
    ]
    samples = []
    try:
        for i in range(1, n + 1):
            coordinator = CoordinatorThread(CoordinatorConfig(world_size=2, endpoint=endpoint)).start()
            deadline = time.monotonic() + 30
            while not (all(a.welcomed for a in agents) and all(a.side_ready for a in agents)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restart {i}: agents not registered")
                time.sleep(0.01)
            coordinator.stop()
            while any(a.welcomed for a in agents):
                time.sleep(0.01)
            if i % 5 == 0 or i == 1:
                samples.append({"restarts": i, **usage()})
                print(json.dumps(samples[-1]), flush=True)
    finally:
        for a in agents:
            a.stop()
    report("restarts", samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=["commits", "reopens", "gloo", "restarts"])
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--reopens", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=50)
    args = parser.parse_args()
    {
        "commits": lambda: commits(args.commits),
        "reopens": lambda: reopens(args.reopens),
        "gloo": lambda: gloo(args.cycles),
        "restarts": lambda: restarts(args.restarts),
    }[args.case]()


if __name__ == "__main__":
    main()
