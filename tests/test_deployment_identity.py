"""Two vLLM deployments of one model shape and world size pointed at one coordinator.

Nothing else in a ``Hello`` tells them apart, so without a deployment id the coordinator admitted
ranks of both as one deployment: A's rank 0 with B's rank 1 when both started at once, or B's rank
taking the place of one of A's that went silent. B's agent then dialled A's rendezvous store and
joined A's side communicator and decision records, and a plan could be applied on the ranks of one
while the other's kept the old maps. Real processes and a real coordinator: exactly one
deployment is admitted, the other is refused with one line naming both ids and the remedy.
"""

from __future__ import annotations

import os
import signal
import time

from agent_process import AgentSpec, StepBudget
from coordinator_thread import CoordinatorThread
from sim_cluster import SimCluster, assert_all_or_none
from test_deployment_processes import SHAPE2, collect, config, start_agents, wait_for
from test_fault_scenarios import SHALLOW, sim_config

REFUSAL = "is of deployment"
"""What the coordinator's refusal line (and the Reject's reason) says of the refused rank."""


def refusal_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if REFUSAL in r.getMessage()]


def test_two_deployments_started_at_once_against_one_coordinator_admit_exactly_one(tmp_path, caplog):
    """Before: A's and B's ranks were admitted side by side (or refused as ``rank_taken``, rank by
    rank), so the coordinator's "deployment" mixed the two."""
    caplog.set_level("INFO")
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(sim_config(endpoint, world_size=2)).start()
    ids = ("deploy-a", "deploy-b")
    try:
        clusters = [
            SimCluster(2, endpoint, steps=450, seed=5, model=SHALLOW, deployment=d, welcome_timeout_s=4.0) for d in ids
        ]
        for cluster in clusters:  # at once: the first Hello to arrive decides which one is admitted
            cluster.start()
        c = coord.coordinator
        wait_for(lambda: len(c.registry.alive) == 2, 30, "one deployment to register")
        admitted = ids.index(c.registry.deployment)
        refused = 1 - admitted
        registered = {pid for _, pid in c.router.registrar.processes}
        results = [cluster.collect() for cluster in clusters]
    finally:
        coord.stop()
    assert {clusters[admitted].pid(r) for r in (0, 1)} <= registered
    assert not {clusters[refused].pid(r) for r in (0, 1)} & registered, "a rank of the other deployment registered"
    # The admitted deployment rebalanced as if alone: every plan on both ranks at one step, 0 mismatches.
    assert_all_or_none(results[admitted], 2)
    assert c.counts["diverged"] == 0, c.outcomes
    assert all(r["commits"] for r in results[admitted].values())
    # The refused one served on, untouched, and its agents were told to ask again (``rank_taken``); once
    # the admitted one had ended (goodbye), it may have become the next deployment: all or none there too.
    assert sum(r["mismatches"] for r in results[refused].values()) == 0
    assert all(r["agent_stats"].get("rank_taken", 0) >= 1 for r in results[refused].values())
    assert_all_or_none(results[refused], 2)
    lines = refusal_lines(caplog)
    assert len(lines) == 1, lines  # both ranks of the refused deployment: one line
    line = lines[0]
    assert f"deployment {ids[refused]!r}" in line and f"ranks of deployment {ids[admitted]!r} are alive" in line, line
    assert "pid " in line and "coordinator of its own" in line and "EPLB_SERVICE_ENDPOINT" in line, line


def test_a_silent_rank_is_not_replaced_by_the_same_rank_of_another_deployment(tmp_path, caplog):
    """Before: once A's rank 1 was declared dead, B's rank 1 (same shape, same world size) took its
    place beside A's rank 0 and was handed A's rendezvous store; A's rank 1, back, found its rank
    taken."""
    caplog.set_level("INFO")
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(config(endpoint, 2)).start()  # liveness_timeout_s=2
    c = coord.coordinator
    # A runs until the test has seen its plan commit: rank 0 steps on while rank 1 is stopped, and
    # with a fixed 900 steps it could reach its end before rank 1, back, voted (3 of 17 runs on a
    # busy 2-core machine), so A's plan was never applied.
    budget = StepBudget(2, 6000)
    a = [AgentSpec(r, endpoint, SHAPE2, steps=6000, switch_hot_at_step=600, deployment="deploy-a") for r in (0, 1)]
    procs, out = start_agents(a, budget)
    intruder: list = []
    try:
        wait_for(lambda: sorted(r.rank for r in c.registry.alive) == [0, 1], 20, "A's ranks to register")
        os.kill(procs[1].pid, signal.SIGSTOP)  # A's rank 1 goes silent, past the liveness limit
        wait_for(lambda: [r.rank for r in c.registry.alive] == [0], 10, "A's rank 1 declared dead")
        b_spec = AgentSpec(1, endpoint, SHAPE2, steps=1500, deployment="deploy-b")  # asks all through
        intruder, b_out = start_agents([b_spec])
        wait_for(lambda: len(refusal_lines(caplog)) >= 1, 10, "B's rank 1 refused")
        time.sleep(2.0)  # B asks again within a second or two while rank 1 stays free
        assert [r.rank for r in c.registry.alive] == [0], "B's rank 1 took A's rank"
        os.kill(procs[1].pid, signal.SIGCONT)
        wait_for(lambda: 1 in c.registry.agents and c.registry.agents[1].pid == procs[1].pid, 20, "A's rank 1 back")
        wait_for(lambda: c.counts["committed"] >= 1, 30, "A to rebalance")
        budget.end_soon()
        registered = {pid for _, pid in c.router.registrar.processes}  # B may be admitted alone once A has ended
        serving = c.status()["deployment"]
        results = collect(procs, out, 2)
        b_results = collect(intruder, b_out, 1)
    finally:
        coord.stop()
        for p in procs + intruder:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    assert intruder[0].pid not in registered, "B's rank registered beside A's"
    assert b_results[1]["stats"].get("rank_taken", 0) >= 2, b_results[1]["stats"]  # it kept asking, and was refused
    assert b_results[1]["epoch"] == 0 and b_results[1]["commits"] == []
    assert sorted(results) == [0, 1]
    assert results[0]["commits"] == results[1]["commits"] and results[0]["commits"], results
    assert results[0]["phy2log"] == results[1]["phy2log"] and all(r["rows_match_maps"] for r in results.values())
    lines = refusal_lines(caplog)
    assert len(lines) == 1, lines  # asked again and again: one line
    assert "'deploy-b'" in lines[0] and "ranks of deployment 'deploy-a' are alive" in lines[0], lines[0]
    assert "rank 1" in lines[0] and f"pid {intruder[0].pid}" in lines[0], lines[0]
    assert serving == "deploy-a"


def test_a_restarted_deployment_is_admitted_as_soon_as_the_old_ranks_are_declared_dead(tmp_path, caplog):
    """vLLM restarted under a coordinator that kept running: its new ranks derive a new deployment
    id while the old ranks, killed without a goodbye, are alive here until the liveness timeout.
    Refused as ``refused``, they asked again only after 30 s (and every rank logged an error); as
    ``rank_taken`` they are admitted within seconds of the old ranks being declared dead."""
    caplog.set_level("INFO")
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(config(endpoint, 2)).start()  # liveness_timeout_s=2
    c = coord.coordinator
    old = [AgentSpec(r, endpoint, SHAPE2, steps=5000, deployment="vllm-old") for r in (0, 1)]
    procs, _ = start_agents(old)
    new_procs: list = []
    try:
        wait_for(lambda: sorted(r.rank for r in c.registry.alive) == [0, 1], 20, "the old ranks to register")
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)  # vLLM kills its workers: no goodbye
        new = [AgentSpec(r, endpoint, SHAPE2, steps=5000, deployment="vllm-new") for r in (0, 1)]
        new_procs, _ = start_agents(new)
        started = time.monotonic()
        wait_for(lambda: len(refusal_lines(caplog)) >= 1, 10, "a new rank refused while the old ones are alive")
        wait_for(
            lambda: c.registry.deployment == "vllm-new" and sorted(r.rank for r in c.registry.alive) == [0, 1],
            15,
            "the new ranks to be admitted",
        )
        took = time.monotonic() - started
    finally:
        coord.stop()
        for p in procs + new_procs:
            if p.is_alive():
                p.kill()
    assert took < 12, took  # the 2 s liveness timeout and a Hello back-off of at most 5 s, not 30 s
