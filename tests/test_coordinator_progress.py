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
