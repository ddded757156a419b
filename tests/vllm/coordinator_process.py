"""A real coordinator in a process of its own, with the e2e test's settings, for runs that kill it.

    python coordinator_process.py --endpoint ipc://... --ranks 2

It serves until SIGTERM (clean stop) or SIGKILL (the crash a real deployment can see); the
settings are the e2e driver's (short rebalance interval and load window, fast heartbeats), so
a tiny model's traffic makes plans within seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # tests/: coordinator_thread


def driver_config(endpoint: str, ranks: int):
    """The coordinator settings of the real-vLLM runs (``vllm_e2e_driver``, ``vllm_variants_driver``, this
    process): a short rebalance interval and load window, fast heartbeats, so a tiny model's traffic
    makes plans within seconds."""
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.protocol import AgentConfig

    return CoordinatorConfig(
        world_size=ranks,
        endpoint=endpoint,
        rebalance_interval_steps=24,
        min_window_steps=12,
        load_half_life_steps=16.0,
        min_gain=0.005,
        liveness_timeout_s=60.0,
        staging_timeout_s=60.0,
        voting_timeout_s=60.0,
        agent=AgentConfig(report_interval_steps=4, fence_steps=4, fence_timeout_s=10.0, heartbeat_interval_s=0.2),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    from coordinator_thread import CoordinatorThread

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [pid %(process)d] %(message)s")
    coord = CoordinatorThread(driver_config(args.endpoint, args.ranks)).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("coordinator ready", flush=True)
    done.wait()
    coord.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
