"""An overloaded host: processes that are not scheduled for seconds (SIGSTOP/SIGCONT stands in
for a starved CPU, a paused VM, a worker whose GIL another thread holds through a long C call).

A process that was not scheduled heard nothing while it was not running, and said nothing
either: the silence it finds on waking is its own, not its peer's. Each side measures silence
in the time its own loop ran (``loop_stalls``), so such a stall costs no reopened connection,
no rank declared dead and no aborted plan. Timings are the fault scenarios' (heartbeat
0.2-0.3 s, liveness 3 s) so each stall is a few seconds.
"""

from __future__ import annotations

import os
import signal
import time

from coordinator_child import coordinator_child
from coordinator_thread import CoordinatorThread
from sim_cluster import SimCluster, assert_all_or_none, wait_status
from test_fault_scenarios import SHALLOW, sim_config

from eplb_service.coordinator.status_client import fetch_status

WORLD = 2
THROTTLE_BYTES_PER_S = 20_000.0
"""Slow enough that a plan of the shallow model stages for a second or two (the stall lands in it)."""


def phase(status: dict) -> str | None:
    return (status["plan_in_flight"] or {}).get("phase")


def sessions(status: dict) -> dict[int, tuple[int, bool]]:
    return {r["rank"]: (r["pid"], r["alive"]) for r in status["ranks"] if r is not None}


def test_ranks_descheduled_past_the_silence_limit_keep_their_connection(tmp_path):
    """Every rank process stopped for 2.5 s, past the agents' silence limit (1.8 s at a 0.2 s
    heartbeat): the vLLM workers' threads not scheduled (a starved host, a GIL held by a compile).
    Before: every agent found 2.5 s without a word on waking and reopened its socket at once,
    before reading what was waiting there (and a plan staging then aborted, ``rank R lost during
    staging``). Now the agents' own stall does not count as the coordinator's silence."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(
        sim_config(endpoint, world_size=WORLD, liveness_timeout_s=30.0, agent={"heartbeat_interval_s": 0.2})
    ).start()
    cluster = SimCluster(WORLD, endpoint, steps=700, seed=4, model=SHALLOW).start()
    try:
        wait_status(endpoint, lambda s: s["plans"]["committed"] >= 1, 60, "a first commit")
        for rank in range(WORLD):
            os.kill(cluster.pid(rank), signal.SIGSTOP)
        time.sleep(2.5)
        for rank in range(WORLD):
            os.kill(cluster.pid(rank), signal.SIGCONT)
        # What the stall cost, judged once a plan committed after it: a plan aborted at the end of
        # the run (ranks leaving mid-plan, ``agent lost``) is the harness's, not the stall's.
        committed = coord.coordinator.counts["committed"]
        wait_status(endpoint, lambda s: s["plans"]["committed"] > committed, 60, "a commit after the stall")
        aborted_across_the_stall = coord.coordinator.counts["aborted"]
        outcomes = list(coord.coordinator.outcomes)
        results = cluster.collect()
    finally:
        cluster.stop()
        coord.stop()
    assert_all_or_none(results, WORLD)
    reopens = {r: results[r]["agent_stats"].get("socket_reopened", 0) for r in results}
    assert not any(reopens.values()), f"agents that reopened their connection after their own stall: {reopens}"
    assert aborted_across_the_stall == 0, outcomes
    # ... and the agents counted their own stall (exported as eplb_agent_events_total{event="own_stalls"}).
    own = {r: results[r]["agent_stats"].get("own_stalls", 0) for r in results}
    assert all(n >= 1 for n in own.values()), own


def test_the_coordinator_s_own_stalls_are_a_metric():
    from eplb_service.coordinator.server import Coordinator

    c = Coordinator(sim_config("ipc:///tmp/eplb-test-never-bound.sock", world_size=WORLD))
    name = "eplb_coordinator_loop_stall_seconds_total"
    c._note_stall(10.0, 10.1)  # within the slack: ordinary scheduling
    assert c.metrics.registry.get_sample_value(name) == 0.0
    c._note_stall(10.0, 12.5)
    assert c.metrics.registry.get_sample_value(name) == 2.5


def test_a_coordinator_woken_from_a_stall_declares_no_rank_dead(tmp_path):
    """The coordinator and every rank stopped for 6 s (a paused VM, a host starved for seconds),
    twice the liveness timeout; the coordinator is scheduled again 0.3 s before the ranks.
    Before: its first tick found every rank silent for 6 s and declared them all dead (its own
    socket held nothing: the ranks had sent nothing either), aborting the plan in flight and
    making every rank register again. Now its liveness counts only the time its loop ran."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    os.chmod(tmp_path, 0o700)
    log = str(tmp_path / "coordinator.log")
    cfg = sim_config(endpoint, world_size=WORLD, agent={"heartbeat_interval_s": 0.3})
    proc = coordinator_child(cfg, log)
    cluster = None
    try:
        wait_status(endpoint, lambda s: True, 30, "the coordinator")
        cluster = SimCluster(WORLD, endpoint, steps=700, seed=4, model=SHALLOW).start()
        before = sessions(wait_status(endpoint, lambda s: s["plans"]["committed"] >= 1, 60, "a first commit"))
        for rank in range(WORLD):
            os.kill(cluster.pid(rank), signal.SIGSTOP)
        committed = fetch_status(endpoint)["plans"]["committed"]  # the ranks are stopped: none commits now
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(6.0)
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
        for rank in range(WORLD):
            os.kill(cluster.pid(rank), signal.SIGCONT)
        time.sleep(1.0)  # the ranks' next heartbeats are read
        after = sessions(fetch_status(endpoint))
        # What the stall cost, judged once a plan committed after it: a plan in flight when the
        # ranks leave at the end of the run (``agent lost``) is the harness's, not the stall's.
        across = wait_status(endpoint, lambda s: s["plans"]["committed"] > committed, 60, "a commit after the stall")
        results = cluster.collect()
    finally:
        if cluster is not None:
            cluster.stop()
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(15)
    text = open(log).read()
    assert "declared dead" not in text.replace("no rank is declared dead", ""), text[-3000:]
    assert after == before, (before, after)
    assert_all_or_none(results, WORLD)
    reopens = {r: results[r]["agent_stats"].get("socket_reopened", 0) for r in results}
    assert not any(reopens.values()), f"agents that reopened their connection after a stall of all: {reopens}"
    assert across["plans"]["aborted"] == 0, across["plans"]


def stall_mid_staging(endpoint: str, pid: int, stall_s: float) -> tuple[dict, dict]:
    """Stop the coordinator ``pid`` for ``stall_s`` as soon as a plan stages; returns the status seen
    then and the status once that plan has an outcome."""
    staging = wait_status(endpoint, lambda s: phase(s) == "staging", 60, "a plan staging")
    os.kill(pid, signal.SIGSTOP)
    time.sleep(stall_s)
    os.kill(pid, signal.SIGCONT)
    plan_id = staging["plan_in_flight"]["plan_id"]
    return staging, wait_status(
        endpoint, lambda s: any(o["plan_id"] == plan_id for o in s["last_plans"]), 30, "the plan's outcome"
    )


def test_a_coordinator_stalled_past_the_agents_silence_limit_mid_staging_costs_no_plan(tmp_path):
    """The coordinator alone stopped for 3 s while a plan stages, past the agents' silence limit
    (1.8 s at a 0.2 s heartbeat): every agent finishes staging, hears nothing, reopens its socket
    and resumes its session, the same process with its staged rows and side communicator.
    Before: the coordinator booked each resumed ``Hello`` as the rank lost, the plan aborted
    (``rank R lost during staging``, ``agent_lost``) and a new side-communicator generation was
    built. Now the plan goes on over the new sockets and commits, on the generation it had."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    os.chmod(tmp_path, 0o700)
    log = str(tmp_path / "coordinator.log")
    agent = {"heartbeat_interval_s": 0.2, "throttle_bytes_per_s": THROTTLE_BYTES_PER_S}
    proc = coordinator_child(sim_config(endpoint, world_size=WORLD, agent=agent), log)
    cluster = None
    try:
        wait_status(endpoint, lambda s: True, 30, "the coordinator")
        cluster = SimCluster(WORLD, endpoint, steps=600, seed=4, model=SHALLOW, step_sleep_s=0.005).start()
        staging, status = stall_mid_staging(endpoint, proc.pid, 3.0)
        results = cluster.collect()
    finally:
        if cluster is not None:
            cluster.stop()
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(15)
    text = open(log).read()
    assert "resumed its session" in text, text[-3000:]  # the fault was injected: the agents reopened
    (outcome,) = [o for o in status["last_plans"] if o["plan_id"] == staging["plan_in_flight"]["plan_id"]]
    assert outcome["phase"] == "committed", (outcome, text[-3000:])
    assert status["comm_generation"] == staging["comm_generation"], text[-3000:]
    assert_all_or_none(results, WORLD)
