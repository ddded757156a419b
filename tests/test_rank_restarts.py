"""A rank's process killed after its plan's vote was decided, then started again alone.

Real agent processes (each on its own step clock, no serving collectives: the survivors keep
serving whatever happens to the victim) and a real coordinator. The record said ``commit``, so
the survivors must apply the plan at the one step ``S`` it names, and the victim's restart
comes back as a new process with its initial maps: it cannot serve the survivors' placement, and
no plan can move it there alone. The coordinator must say so (a halt naming the rank, and the
recovery: restart every worker), and once the old processes are gone it must treat the
restarted ones as a new deployment and rebalance them again.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import msgspec
import pytest
from agent_process import AgentSpec, StepBudget, agent_main
from child_context import CTX
from coordinator_thread import CoordinatorThread
from test_deployment_processes import SHAPE3, collect, config, start_agents, wait_for

WORLD = 3


def spec(rank: int, endpoint: str, steps: int, fault: str | None = None) -> AgentSpec:
    # The hot expert moves every 300 steps: there is always something to rebalance.
    return AgentSpec(rank, endpoint, SHAPE3, steps=steps, fault=fault, switch_every_steps=300)


@pytest.mark.parametrize(
    "victim, moment",
    [(2, "before_commit_step"), (0, "before_commit_step"), (1, "while_applying")],
)
def test_a_rank_killed_after_a_decided_commit_and_restarted_alone(tmp_path, victim, moment):
    """Before: the survivors committed (right), but the restarted rank was judged as having gone
    "past the commit with the old maps", and that halt stayed after every worker was restarted:
    the new processes joined the old deployment's book (its commit steps), no plan ran again."""
    endpoint = f"ipc://{tmp_path}/c.sock"
    cfg = config(endpoint, WORLD)
    # 200 fence steps (about 1.5 s here): room to kill the victim between the decision and S
    cfg = dataclasses.replace(cfg, agent=msgspec.structs.replace(cfg.agent, fence_steps=200))
    coord = CoordinatorThread(cfg).start()
    c = coord.coordinator
    # Which ranks have read the decision record (their Voted, or a heartbeat naming the decision).
    # Rank 0 hosts the record: killed before a survivor read it, that survivor cannot know the
    # decision and stops at its fence by design (UndecidedCommit, after decision_timeout_s = 60 s),
    # which is not this test's case. Seen once on a loaded 2-core machine: rank 0 read its own
    # record first, the coordinator knew the decision from it, and the kill came before the others.
    read_record: set[int] = set()
    learn = c.router._learn_decision

    def learn_and_note(record, plan_id, *args, **kwargs):
        read_record.add(record.rank)
        return learn(record, plan_id, *args, **kwargs)

    c.router._learn_decision = learn_and_note
    fault = "exit_while_applying" if moment == "while_applying" else None
    # Each group of processes stops once the test has seen what it waits for (a budget each: the
    # victim's restart steps on a clock of its own, ahead of the fresh ranks started after it).
    first, again, fresh = StepBudget(WORLD, 1400), StepBudget(WORLD, 2200), StepBudget(WORLD, 1400)
    procs, out = start_agents([spec(r, endpoint, 1400, fault if r == victim else None) for r in range(WORLD)], first)
    later = []
    try:
        wait_for(lambda: c.plan is not None and c.plan.decision is not None, 60, "a decided vote")
        plan_id, (commit_step, ok) = c.plan.plan_id, c.plan.decision
        assert ok, "the first vote was decided abort"
        if moment == "before_commit_step":
            wait_for(lambda: read_record >= set(range(WORLD)), 30, "every rank to read the decision record")
            wait_for(lambda: len(c.plan.committed if c.plan else ()) == 0, 1, "")  # no rank at S yet
            os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].join(30)
        assert procs[victim].exitcode is not None, "the victim did not die"
        wait_for(lambda: c.counts["committed"] >= 1, 30, "the survivors' commit")
        later.append(CTX.Process(target=agent_main, args=(spec(victim, endpoint, 2200), out, again)))
        later[-1].start()
        wait_for(lambda: c.halted_reason is not None, 30, "the coordinator to see the split")
        reason = c.halted_reason
        first.end_soon()  # the survivors served the decided plan and the split is named: nothing more to see
        survivors = collect([p for r, p in enumerate(procs) if r != victim], out, WORLD - 1)
        # Recovery: the operator restarts every worker; here the survivors ended (Goodbye) and
        # fresh processes take their ranks, while the victim's restart still runs.
        later += [CTX.Process(target=agent_main, args=(spec(r, endpoint, 1400), out, fresh)) for r in range(WORLD)]
        for r, p in enumerate(later[1:]):
            if r != victim:
                p.start()
        wait_for(lambda: c.halted_reason is None and c.counts["committed"] >= 2, 60, "rebalancing after the restart")
        again.end_soon()
        fresh.end_soon()
        restarted = collect([p for p in later if p.pid is not None], out, WORLD)
    finally:
        coord.stop()
        for p in procs + later:
            if p.pid is not None and p.is_alive():
                p.kill()
    # The survivors applied the decided plan at the record's step, both of them, rows and maps whole.
    assert sorted(survivors) == sorted(set(range(WORLD)) - {victim})
    for r in survivors.values():
        assert r["commits"][0] == (plan_id, commit_step), (r["commits"], plan_id, commit_step)
        assert r["rows_match_maps"]
    assert len({tuple(map(tuple, r["commits"])) for r in survivors.values()}) == 1
    # The split is named for what it is, with the way out.
    assert f"rank {victim} restarted" in reason and "restart every worker" in reason, reason
    assert "went past the commit" not in reason, reason
    # The restarted deployment rebalances: one outcome on every rank. These ranks step on their
    # own clocks and the victim's restart started earlier: it may reach the commit step of a
    # last plan after the others stopped serving (a stopped rank never serves a step again),
    # so the plans compared are those every rank lived through.
    assert sorted(restarted) == list(range(WORLD)), sorted(restarted)
    commits = [restarted[r]["commits"] for r in range(WORLD)]
    shared = min(len(cm) for cm in commits)
    assert shared >= 1 and all(cm[:shared] == commits[0][:shared] for cm in commits), commits
    if all(len(cm) == shared for cm in commits):
        assert all(restarted[r]["phy2log"] == restarted[0]["phy2log"] for r in range(WORLD))
    assert all(restarted[r]["rows_match_maps"] for r in range(WORLD))
