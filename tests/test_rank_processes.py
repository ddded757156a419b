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


def test_stopping_ranks_that_take_their_time_leaves_the_event_loop_running():
    """The simulation's coordinator serves on the loop that stops the ranks: joining them there held
    it for as long as the ranks took to exit, and it logged its own stall at the end of every run."""
    ranks = RankProcesses(2, "lingering-rank")

    async def stop_while_ticking() -> float:
        await ranks.wait(0.05, timeout_s=60)
        largest_gap = 0.0
        stopping = asyncio.create_task(ranks.stop_async(join_timeout_s=10))
        last = time.monotonic()
        while not stopping.done():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            largest_gap, last = max(largest_gap, now - last), now
        await stopping
        return largest_gap

    try:
        ranks.start(rank_targets.report_then_linger, lambda r: (r, ranks.results, 1.5))
        started = time.monotonic()
        largest_gap = asyncio.run(stop_while_ticking())
        waited = time.monotonic() - started
    finally:
        ranks.stop(join_timeout_s=10)
    assert not any(p.is_alive() for p in ranks.procs)
    assert waited >= 1.5  # the joins did wait for the lingering ranks
    assert largest_gap < 0.75, f"the loop did not run for {largest_gap:.2f}s while the ranks were joined"


def test_a_simulated_rank_ends_once_its_result_is_sent_without_the_interpreters_shutdown(tmp_path):
    """Interpreter shutdown in a process that imported torch took 4-9 s per rank when 8 ranks
    exited together on 2 cores, after their results were sent; a rank now ends right after its
    result is in the pipe (all of it: a result larger than a pipe holds still arrives whole)."""
    ranks = RankProcesses(1, "sim-like-rank")
    marker = tmp_path / "interpreter-shutdown-ran"
    try:
        ranks.start(rank_targets.report_large_then_end_as_a_simulated_rank, lambda r: (r, ranks.results, str(marker)))
        (result,) = ranks.wait_blocking(0.05, timeout_s=60)
    finally:
        ranks.stop(join_timeout_s=10)
    assert result["payload"] == list(range(200_000))
    assert ranks.procs[0].exitcode == 0
    assert not marker.exists()


def test_the_wait_returns_once_every_rank_reported_not_the_first():
    """Ranks that report at different polls: the wait returns all of them (the summary is written
    from what it returns, so one that returned early or forgot a poll's results would lose ranks)."""
    ranks = RankProcesses(3, "test-rank")
    try:
        ranks.start(rank_targets.report, lambda r: (r, ranks.results, 0.3 * r))
        results = asyncio.run(ranks.wait(0.05, timeout_s=30))
    finally:
        ranks.stop(join_timeout_s=10)
    assert sorted(r["rank"] for r in results) == [0, 1, 2]


@pytest.mark.parametrize("exit_code", [3, 1])
@pytest.mark.parametrize("waiting", ["async", "blocking"])
def test_a_dead_rank_is_named_after_the_grace_period(exit_code, waiting):
    """Exit code 1 is what a simulated rank stopped by an exception exits with (``run_rank``): not
    seeing it would leave the simulation waiting out its whole timeout. The simulation waits on its
    event loop (``wait``), the GPU benchmarks without one (``wait_blocking``)."""
    ranks = RankProcesses(2, "test-rank")
    # Rank 1 dies only once rank 0 has reported: two fresh interpreters start in either order on
    # a loaded machine, and a rank 0 later than the 0.2 s grace would not be in ``collected``.
    rank0_reported = ranks.ctx.Event()
    try:
        ranks.start(rank_targets.die_unless_rank0, lambda r: (r, ranks.results, exit_code, rank0_reported))
        with pytest.raises(RankProcessesDied, match=rf"test-rank-1', {exit_code}"):
            if waiting == "async":
                asyncio.run(ranks.wait(0.05, dead_grace_s=0.2, timeout_s=20))
            else:
                ranks.wait_blocking(0.05, dead_grace_s=0.2, timeout_s=20)
    finally:
        ranks.stop(join_timeout_s=10)
    assert [r["rank"] for r in ranks.collected] == [0]


def test_stopping_hung_ranks_waits_the_join_timeout_once_not_once_per_rank():
    """A run stopped at its timeout with every rank hung waited the join timeout for each rank in
    turn (80 s for 8 ranks) before it could say why it stopped."""
    ranks = RankProcesses(4, "hung-rank")
    ranks.start(rank_targets.report, lambda r: (r, ranks.results, 60.0))
    started = time.monotonic()
    ranks.stop(join_timeout_s=1.0)
    took = time.monotonic() - started
    assert not any(p.is_alive() for p in ranks.procs)
    assert all(p.exitcode == -9 for p in ranks.procs)  # killed, none reported
    assert took < 3.0, f"stopping 4 hung ranks with a 1 s join timeout took {took:.1f}s"


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
