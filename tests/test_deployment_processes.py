"""Real coordinator, real agent processes, real sockets and a real gloo side group.

Covers the commit protocol (all ranks commit at the same step, or none do) and the
abort paths: an agent exits before the vote or while staging, the coordinator vanishes
after staging and comes back, an agent thread stalls past the fence.
"""

from __future__ import annotations

import queue
import time

import pytest
from agent_process import AgentSpec, StepBudget, agent_main
from child_context import CTX
from coordinator_thread import CoordinatorThread

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator
from eplb_service.coordinator.status_client import fetch_status, format_status
from eplb_service.placement import PlacementShape
from eplb_service.protocol import AgentConfig, VoteNow


def config(endpoint: str, world: int, **kw) -> CoordinatorConfig:
    agent = AgentConfig(
        report_interval_steps=5,
        fence_steps=4,
        fence_timeout_s=kw.pop("fence_timeout_s", 1.0),
        heartbeat_interval_s=0.2,
        transport_timeout_s=kw.pop("transport_timeout_s", 5.0),
    )
    # These agent processes step on their own, not in lockstep: no step clock to compare.
    base = dict(
        world_size=world,
        endpoint=endpoint,
        rebalance_interval_steps=30,
        min_window_steps=10,
        load_half_life_steps=20.0,
        liveness_timeout_s=2.0,
        staging_timeout_s=10.0,
        voting_timeout_s=10.0,
        agent=agent,
        check_step_clock=False,
    )
    base.update(kw)
    return CoordinatorConfig(**base)


def start_agents(specs, budget: StepBudget | None = None):
    """One process per spec; ``budget``, when given, lets the test end their run early (all alike)."""
    out = CTX.Queue()
    procs = [CTX.Process(target=agent_main, args=(s, out, budget), name=f"agent-{s.rank}") for s in specs]
    for p in procs:
        p.start()
    return procs, out


def collect(procs, out, expected: int, timeout_s: float = 90.0) -> dict[int, dict]:
    results: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < expected and time.monotonic() < deadline:
        try:
            r = out.get(timeout=0.5)
            results[r["rank"]] = r
        except queue.Empty:
            pass
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return results


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


SHAPE3 = PlacementShape(num_layers=2, num_logical=10, num_physical=12, num_ranks=3)
SHAPE2 = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


def test_all_ranks_commit_every_plan_at_the_same_step(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    # 36 bytes per expert here: a budget of 4 experts per rank forces small batches
    coord = CoordinatorThread(config(endpoint, 3, staging_budget_bytes=4 * 36)).start()
    try:
        procs, out = start_agents([AgentSpec(r, endpoint, SHAPE3, steps=700, switch_hot_at_step=300) for r in range(3)])
        wait_for(lambda: coord.coordinator.counts["committed"] >= 1, 60, "a first commit")
        status = fetch_status(endpoint)
        results = collect(procs, out, 3)
    finally:
        coord.stop()
    assert sorted(results) == [0, 1, 2]
    c = coord.coordinator
    assert c.counts["committed"] >= 2, c.outcomes  # the hot expert switches at step 300
    assert c.counts["aborted"] == 0 and c.counts["diverged"] == 0
    commits = [results[r]["commits"] for r in range(3)]
    assert commits[0] == commits[1] == commits[2], f"ranks committed at different steps: {commits}"
    assert len(commits[0]) == c.counts["committed"]
    assert results[0]["phy2log"] == results[1]["phy2log"] == results[2]["phy2log"]
    assert all(results[r]["rows_match_maps"] for r in range(3)), "a live row holds another expert than its map says"
    assert all(results[r]["epoch"] == c.epoch for r in range(3))
    assert sum(results[r]["stats"].get("bytes_received", 0) for r in range(3)) > 0, "no expert crossed ranks"
    assert c.bytes_moved_total > 0
    for epoch in range(c.epoch):  # every committed batch respected the staging budget on every rank
        changed = (c.placements[epoch] != c.placements[epoch + 1]).reshape(SHAPE3.num_layers, 3, -1).sum(axis=(0, 2))
        assert changed.max() * 36 <= 4 * 36, f"epoch {epoch}->{epoch + 1} staged {changed} rows per rank"
    # the status document saw every rank, the load and the plans
    assert [r["rank"] for r in status["ranks"]] == [0, 1, 2] and status["load_reports"] > 0
    assert status["plans"]["committed"] >= 1
    assert "balancedness: model" in format_status(status)


def test_copy_engine_stand_in_commits_every_plan_at_the_same_step(tmp_path):
    """The whole agent over the copy-engine transport (its CPU stand-in): same commits as gloo."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(config(endpoint, 2)).start()
    try:
        specs = [
            AgentSpec(r, endpoint, SHAPE2, steps=600, switch_hot_at_step=250, transport="copy-engine") for r in (0, 1)
        ]
        procs, out = start_agents(specs)
        wait_for(lambda: coord.coordinator.counts["committed"] >= 1, 60, "a first commit")
        results = collect(procs, out, 2)
    finally:
        coord.stop()
    assert sorted(results) == [0, 1]
    c = coord.coordinator
    assert c.counts["committed"] >= 1 and c.counts["aborted"] == 0 and c.counts["diverged"] == 0, c.outcomes
    assert results[0]["commits"] == results[1]["commits"] and len(results[0]["commits"]) == c.counts["committed"]
    assert results[0]["phy2log"] == results[1]["phy2log"]
    assert all(results[r]["rows_match_maps"] for r in (0, 1)), "a live row holds another expert than its map says"
    assert sum(results[r]["stats"].get("bytes_received", 0) for r in (0, 1)) > 0, "no expert crossed ranks"


def _run_fault(tmp_path, fault_rank_spec, world=2, steps=500, coordinator_cls=Coordinator, **cfg):
    endpoint = f"ipc://{tmp_path}/c.sock"
    coord = CoordinatorThread(config(endpoint, world, **cfg), coordinator_cls).start()
    specs = [fault_rank_spec(r, endpoint) for r in range(world)]
    try:
        procs, out = start_agents(specs)
        results = collect(
            procs, out, sum(1 for s in specs if s.fault not in ("exit_before_vote", "exit_while_staging"))
        )
    finally:
        coord.stop()
    return coord.coordinator, results


@pytest.mark.parametrize(
    "fault, transport",
    [("exit_before_vote", "gloo"), ("exit_while_staging", "gloo"), ("exit_while_staging", "copy-engine")],
)
def test_agent_exit_mid_plan_aborts_cleanly_on_the_others(tmp_path, fault, transport):
    c, results = _run_fault(
        tmp_path,
        lambda r, ep: AgentSpec(r, ep, SHAPE2, steps=400, fault=fault if r == 1 else None, transport=transport),
    )
    assert list(results) == [0]
    r0 = results[0]
    assert r0["epoch"] == 0 and r0["commits"] == [], "a rank committed without its peer"
    assert r0["rows_match_maps"]
    assert c.counts["committed"] == 0 and c.counts["aborted"] >= 1 and c.counts["diverged"] == 0
    # the abort names the lost rank, or the peer failure rank 0's transport saw
    assert any(o.phase == "aborted" and ("rank 1" in o.reason or "failed" in o.reason) for o in c.outcomes), [
        o.reason for o in c.outcomes
    ]
    assert r0["max_step_s"] < 1.5, "serving stalled beyond the fence bound"


class VanishAfterStaging(Coordinator):
    """A coordinator that goes away once every rank has staged (before VoteNow)."""

    def broadcast(self, message):
        if isinstance(message, VoteNow):
            self.stop()
            return
        super().broadcast(message)


def test_coordinator_gone_after_staging_then_restarted(tmp_path):
    endpoint = f"ipc://{tmp_path}/c.sock"
    first = CoordinatorThread(config(endpoint, 2), VanishAfterStaging).start()
    budget = StepBudget(2, 900)
    procs, out = start_agents(
        [AgentSpec(r, endpoint, SHAPE2, steps=900, staged_timeout_s=1.0) for r in range(2)], budget
    )
    try:
        first.thread.join(60)
        assert not first.thread.is_alive(), "the first coordinator never reached the vote"
        time.sleep(1.5)  # agents drop the staged plan after staged_timeout_s, serving goes on
        second = CoordinatorThread(config(endpoint, 2)).start()
        try:
            wait_for(lambda: second.coordinator.counts["committed"] >= 1, 60, "a commit by the restarted coordinator")
            budget.end_soon()  # both ranks stop at one step, as at the end of a shorter run
            results = collect(procs, out, 2)
        finally:
            second.stop()
    finally:
        for p in procs:
            p.kill() if p.is_alive() else None
    assert results[0]["commits"] == results[1]["commits"] and len(results[0]["commits"]) >= 1
    assert results[0]["phy2log"] == results[1]["phy2log"]
    assert all(r["rows_match_maps"] for r in results.values())
    assert all(r["stats"].get("aborted", 0) >= 1 for r in results.values()), "the staged plan was not dropped"
    assert all(r["max_step_s"] < 1.5 for r in results.values())


def test_stalled_agent_thread_makes_everyone_abort_at_the_fence(tmp_path):
    c, results = _run_fault(
        tmp_path,
        lambda r, ep: AgentSpec(r, ep, SHAPE2, steps=600, fault="stall_before_vote" if r == 1 else None),
        fence_timeout_s=0.5,
        transport_timeout_s=2.0,
    )
    assert sorted(results) == [0, 1]
    assert results[0]["commits"] == results[1]["commits"], "ranks diverged"
    assert c.counts["diverged"] == 0 and c.counts["aborted"] >= 1
    assert all(r["rows_match_maps"] for r in results.values())
    # the fence (0.5 s) and a worst step's own slack, below the transport's 2 s a missed bound would show
    assert results[0]["max_step_s"] < 0.5 + 1.0, "the fence wait exceeded its bound"
