"""A rank that goes past another rank's commit step at the old epoch halts rebalancing as diverged."""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.epoch_watch import EpochLagWatch
from eplb_service.coordinator.registry import AgentRecord
from eplb_service.coordinator.server import Coordinator


def test_ranks_behind_but_not_past_the_commit_step_are_fine():
    watch = EpochLagWatch()
    watch.committed(epoch=3, step=500)
    assert watch.observe({0: (3, 520), 1: (2, 480), 2: (2, 500)}) is None  # 1 and 2 commit at 500, not yet past it


def test_a_rank_past_the_commit_step_at_the_old_epoch_has_diverged():
    watch = EpochLagWatch()
    watch.committed(epoch=3, step=500)
    watch.committed(epoch=3, step=900)  # a late duplicate never moves the step
    why = watch.observe({0: (3, 520), 1: (2, 501)})
    assert why is not None and "rank 1 is at step 501 with epoch 2, but epoch 3 was committed at step 500" in why


def test_no_known_commit_step_means_no_verdict():
    watch = EpochLagWatch()
    assert watch.observe({0: (5, 10_000), 1: (4, 10_000)}) is None


def _coordinator_with(records) -> Coordinator:
    coordinator = Coordinator(CoordinatorConfig(world_size=len(records)))
    for rank, (epoch, step) in enumerate(records):
        coordinator.registry.register(
            AgentRecord(
                rank=rank,
                identity=f"rank-{rank}".encode(),
                node="n",
                pid=rank,
                epoch=epoch,
                step=step,
                phy2log=np.zeros((1, 2), dtype=np.int64),
            )
        )
        coordinator._beats[rank] = (epoch, step)
    return coordinator


def test_the_coordinator_halts_and_counts_it_diverged():
    coordinator = _coordinator_with([(3, 120), (2, 100)])
    coordinator.epoch_watch.committed(epoch=3, step=110)
    coordinator._watch_epochs()
    assert coordinator.halted_reason is None  # rank 1 has not reached step 110 yet
    coordinator.registry.agents[1].step = 111  # from a load report: not a heartbeat, no verdict
    coordinator._watch_epochs()
    assert coordinator.halted_reason is None
    coordinator._beats[1] = (2, 111)  # a heartbeat: step 111 at epoch 2
    coordinator._watch_epochs()
    assert coordinator.halted_reason is not None and "rank 1 is at step 111 with epoch 2" in coordinator.halted_reason
    assert coordinator.counts["diverged"] == 1
    assert not coordinator._should_plan()


def test_only_the_newest_epochs_are_remembered():
    watch = EpochLagWatch(keep=4)
    for epoch in range(1, 11):
        watch.committed(epoch, epoch * 100)
    assert sorted(watch.commit_steps) == [7, 8, 9, 10]
