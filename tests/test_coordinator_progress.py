"""``Coordinator.progress()``: the frozen snapshot the simulation and the GPU harness poll."""

from __future__ import annotations

import dataclasses

import pytest

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator, CoordinatorProgress


def test_a_fresh_coordinator_reports_nothing_done_and_the_snapshot_is_frozen(tmp_path):
    coordinator = Coordinator(CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/c.sock"))
    try:
        state = coordinator.progress()
        assert state == CoordinatorProgress(
            epoch=-1,
            agents_alive=0,
            committed=0,
            aborted=0,
            diverged=0,
            skipped=0,
            bytes_moved=0,
            experts_moved=0,
            busy=False,
            plan_id=None,
            plan_phase=None,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            state.committed = 1  # type: ignore[misc]
        coordinator.plans.planning = True  # the policy is running: busy, in the snapshot and the property alike
        assert coordinator.progress().busy and coordinator.busy
        assert not state.busy, "a snapshot does not follow the coordinator"
    finally:
        coordinator.plans.close()


def test_the_snapshot_reads_each_count_from_its_own_source():
    """Each field from its own part (a fresh coordinator's zeros cannot tell ``aborted`` from
    ``diverged``), and batches still waiting make the coordinator busy, as a plan in flight does."""
    from types import SimpleNamespace

    from eplb_service.coordinator.progress import progress_of

    plans = SimpleNamespace(
        plan=None,
        counts={"committed": 1, "aborted": 2, "diverged": 3, "skipped": 4},
        bytes_moved_total=5000,
        experts_moved_total=6,
        pending_batches=[[0, 1]],
        planning=False,
    )
    registry, book = SimpleNamespace(alive=["rank 0", "rank 1"]), SimpleNamespace(epoch=7)
    expected = CoordinatorProgress(
        epoch=7,
        agents_alive=2,
        committed=1,
        aborted=2,
        diverged=3,
        skipped=4,
        bytes_moved=5000,
        experts_moved=6,
        busy=True,
        plan_id=None,
        plan_phase=None,
    )
    assert progress_of(registry, book, plans) == expected  # type: ignore[arg-type]
    plans.pending_batches, plans.plan = [], SimpleNamespace(plan_id=11, phase=SimpleNamespace(value="staging"))
    in_flight = dataclasses.replace(expected, plan_id=11, plan_phase="staging")
    assert progress_of(registry, book, plans) == in_flight  # type: ignore[arg-type]
    plans.plan = None
    assert not progress_of(registry, book, plans).busy  # type: ignore[arg-type]
