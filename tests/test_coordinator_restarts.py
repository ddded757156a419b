"""Agents outliving many coordinator restarts in a row, with plans in flight.

Simulated serving ranks (real processes, real serving all-to-alls, the exact output check on
every step) against an ``eplb-coordinator`` daemon that is SIGKILLed at random moments and
started again at once, ten times. The promises: every plan committed at one step on every
rank or on none, no stuck or reset agent, and the last coordinator rebalances again.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from sim_cluster import SimCluster, assert_all_or_none, daemon, wait_status

from eplb_service.coordinator.status_client import fetch_status
from eplb_service.sim.workload import SimModelConfig

WORLD = 4
ARGS = ("--rebalance-interval-steps", "40", "--report-interval-steps", "5", "--fence-timeout-s", "1")


@pytest.mark.slow
def test_ten_coordinator_sigkills_in_a_row_never_split_a_commit(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    rng = random.Random(11)
    proc = daemon(endpoint, WORLD, *ARGS, log_path=str(tmp_path / "c0.log"))
    cluster = SimCluster(WORLD, endpoint, steps=2600, seed=6, model=SimModelConfig(num_layers=2)).start()
    phases: list[str | None] = []
    try:
        wait_status(endpoint, lambda s: s["plans"]["committed"] >= 1, 120, "a first commit")
        for i in range(10):
            time.sleep(rng.uniform(0.0, 0.4))
            try:  # most kills land on a plan in flight, staging or voting
                status = wait_status(endpoint, lambda s: s["plan_in_flight"] is not None, 5, "a plan in flight")
                phases.append(status["plan_in_flight"]["phase"])
                time.sleep(rng.uniform(0.0, 0.3))
            except AssertionError:
                phases.append(None)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = daemon(endpoint, WORLD, *ARGS, log_path=str(tmp_path / f"c{i + 1}.log"))
        wait_status(endpoint, lambda s: s["plans"]["committed"] >= 1, 120, "a commit after the last restart")
        results = cluster.collect(300)
        status = fetch_status(endpoint)
    finally:
        cluster.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    print("plan phases at the kills:", phases, "epoch", status["epoch"], status["plans"])
    assert_all_or_none(results, WORLD)
    assert status["halted"] is None, status["halted"]
    assert all(r["epoch"] == status["epoch"] for r in results.values()), (
        status["epoch"],
        [r["epoch"] for r in results.values()],
    )
