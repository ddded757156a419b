"""What a simulated rank's serving loop hands its agent, and how a rank that fails is reported.

The end-to-end simulation trusts three things it never checks itself: that every step's load
reaches the agent once and alone (the coordinator plans from it), that one seed is one workload
(so a failing run can be replayed), and that a rank that fails says so, in its result or in its
exit code, so that neither the summary nor the CLI's exit status can count it as passed.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from dataclasses import replace

import numpy as np
import pytest
import sim_hook_ranks
import torch.distributed as dist
from serving_group import run_serving_ranks

from eplb_service.sim.processes import RankProcesses, RankProcessesDied, free_port
from eplb_service.sim.serving_loop import RankSpec, run_rank
from eplb_service.sim.workload import SimModelConfig

WORLD = 2
STEPS = 5
SEEDS = [4, 4, 5]


@pytest.fixture(scope="module")
def runs() -> list[list[dict]]:
    """``runs[rank][i]``: what rank ``rank`` recorded serving ``STEPS`` steps with seed ``SEEDS[i]``."""
    return run_serving_ranks(sim_hook_ranks.serve_recording, WORLD, (STEPS, SEEDS), "sim-hooks")


def test_every_step_hands_the_agent_its_own_load_once(runs):
    """``before_step`` then ``after_step`` once per step, every step served, and each ``after_step``
    sees that step's tokens alone (a load left to pile up over steps reports a growing total)."""
    cfg = SimModelConfig()
    per_step = cfg.tokens_per_rank * cfg.top_k
    for rank, by_seed in enumerate(runs):
        run = by_seed[0]
        assert run["calls"] == ["before", "after"] * STEPS, f"rank {rank}: hook calls {run['calls']}"
        load = np.array(run["loads"])  # [steps, L, P]
        assert load.shape == (STEPS, cfg.num_layers, cfg.num_logical + cfg.num_redundant)
        assert (load.sum(axis=2) == per_step).all(), f"rank {rank}: load per step and layer {load.sum(axis=2)}"
    # every step's tokens were received somewhere: no step left out of the record
    received = np.sum([np.array(by_seed[0]["recv_counts"]) for by_seed in runs], axis=0)  # [steps, L]
    assert (received == WORLD * per_step).all(), received.tolist()


def test_one_seed_is_one_workload_and_another_seed_another(runs):
    """The same seed replays the same tokens and routing on every rank; another seed does not."""
    for rank, (first, again, other) in enumerate(runs):
        assert first["loads"] == again["loads"] and first["recv_counts"] == again["recv_counts"], f"rank {rank}"
        assert first["loads"] != other["loads"], f"rank {rank}: seeds {SEEDS[0]} and {SEEDS[2]} routed alike"
        assert first["mismatches"] == again["mismatches"] == other["mismatches"] == 0


def _rank_specs(model: SimModelConfig) -> list[RankSpec]:
    """Ranks whose agent has no coordinator to talk to: they serve after a short wait for a Welcome."""
    base = RankSpec(
        rank=0,
        world_size=WORLD,
        steps=STEPS,
        seed=0,
        model=model,
        coordinator_endpoint=f"ipc:///tmp/eplb-no-coordinator-{os.getpid()}.sock",
        serving_store_port=free_port(),
        welcome_timeout_s=0.5,
    )
    return [replace(base, rank=r) for r in range(WORLD)]


def _serve(ranks: RankProcesses, specs: list[RankSpec], timeout_s: float) -> list[dict]:
    """Run ``run_rank`` for ``specs`` as the simulation does (spawned, waited for on an event loop)."""
    store = dist.TCPStore(  # noqa: F841 - the serving group's store, alive while the ranks run
        "127.0.0.1",
        specs[0].serving_store_port,
        WORLD,
        True,
        timeout=datetime.timedelta(seconds=60),
        wait_for_workers=False,
    )
    try:
        ranks.start(run_rank, lambda r: (specs[r], ranks.results))
        return asyncio.run(ranks.wait(0.1, timeout_s=timeout_s))
    finally:
        ranks.stop(join_timeout_s=10)


def test_a_serving_loop_that_fails_reports_the_error_in_its_result():
    """Routing 40 distinct experts per token out of 32 fails in the first forward pass on every rank:
    each rank still reports, and its result names the error (the summary's ``errors``)."""
    ranks = RankProcesses(WORLD, "sim-rank")
    results = sorted(_serve(ranks, _rank_specs(SimModelConfig(top_k=40)), timeout_s=120), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(WORLD))
    for r in results:
        assert r["error"] == f"rank {r['rank']}: ValueError: top_k=40 distinct experts per token, but the model has 32"
    assert [p.exitcode for p in ranks.procs] == [0] * WORLD


def test_a_rank_that_cannot_start_serving_exits_1_and_the_wait_names_it():
    """32 experts + 7 redundant slots do not spread over 2 ranks: every rank stops before it reports,
    with exit code 1, and the simulation's wait ends in ``RankProcessesDied`` naming them rather than
    waiting out its timeout or returning a summary of nothing."""
    ranks = RankProcesses(WORLD, "sim-rank")
    with pytest.raises(RankProcessesDied, match=r"\('sim-rank-[01]', 1\)"):
        _serve(ranks, _rank_specs(SimModelConfig(num_redundant=7)), timeout_s=90)
    assert [p.exitcode for p in ranks.procs] == [1] * WORLD and ranks.collected == []
