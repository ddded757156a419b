"""The rank-process runner the simulation and the GPU benchmarks share, and the harness's
named shared state, across real spawned processes."""

from __future__ import annotations

import asyncio
import time

import pytest
import rank_targets

from bench.gpu.control import RankProgress, shared_control
from eplb_service.sim.processes import RankProcesses, RankProcessesDied


def test_every_rank_reports_and_nothing_is_left_running():
    ranks = RankProcesses(2, "test-rank")
    try:
        ranks.start(rank_targets.report, lambda r: (r, ranks.results))
        results = asyncio.run(ranks.wait(0.05, timeout_s=60))
    finally:
        ranks.stop(join_timeout_s=10)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert not any(p.is_alive() for p in ranks.procs)
    assert [p.name for p in ranks.procs] == ["test-rank-0", "test-rank-1"]


@pytest.mark.parametrize("exit_code", [3, 1])
def test_a_dead_rank_is_named_after_the_grace_period(exit_code):
    """Exit code 1 is what a simulated rank stopped by an exception exits with (``run_rank``): not
    seeing it would leave the simulation waiting out its whole timeout."""
    ranks = RankProcesses(2, "test-rank")
    try:
        ranks.start(rank_targets.die_unless_rank0, lambda r: (r, ranks.results, exit_code))
        with pytest.raises(RankProcessesDied, match=rf"test-rank-1', {exit_code}"):
            ranks.wait_blocking(0.05, dead_grace_s=0.2, timeout_s=20)
    finally:
        ranks.stop(join_timeout_s=10)
    assert [r["rank"] for r in ranks.collected] == [0]


def test_the_poll_callback_can_end_the_wait_and_a_timeout_says_how_many_reported():
    ranks = RankProcesses(1, "slow-rank")
    polls: list[float] = []

    def stop_after_two() -> bool:
        polls.append(time.monotonic())
        return len(polls) >= 2

    try:
        ranks.start(rank_targets.report, lambda r: (r, ranks.results, 30.0))
        assert asyncio.run(ranks.wait(0.05, stop_after_two)) == []
        assert len(polls) == 2
        with pytest.raises(TimeoutError, match=r"only 0/1 ranks reported within 0.3s"):
            asyncio.run(ranks.wait(0.05, timeout_s=0.3))
    finally:
        ranks.stop(join_timeout_s=0.1)
    assert not ranks.procs[0].is_alive()


def test_harness_control_fields_cross_processes_by_name():
    ranks = RankProcesses(2, "control-rank")
    control = shared_control(ranks.ctx)
    progress = RankProgress(ranks.ctx, 2)
    control.coordinator_idle = True
    try:
        ranks.start(rank_targets.write_control, lambda r: (r, control, progress, ranks.results))
        results = ranks.wait_blocking(0.05, timeout_s=60)
    finally:
        ranks.stop()
    assert all(r["coordinator_idle"] for r in results)
    assert (control.plans_enabled, control.experts_per_rank, control.layers_per_batch, control.phase) == (True, 8, 2, 5)
    assert progress.steps() == [10, 11] and progress.total() == 21 and progress.all_started()


def test_rank_progress_and_runner_refuse_an_empty_world():
    with pytest.raises(ValueError, match="world_size=0"):
        RankProcesses(0, "x")
    with pytest.raises(ValueError, match="world_size=0"):
        RankProgress(RankProcesses(1, "x").ctx, 0)
