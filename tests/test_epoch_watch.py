"""A rank that goes past another rank's commit step at the old epoch halts rebalancing as diverged."""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.epoch_watch import EpochLagWatch
from eplb_service.coordinator.registry import AgentRecord
from eplb_service.coordinator.server import Coordinator


def test_ranks_behind_but_not_past_the_commit_step_are_fine():
    watch = EpochLagWatch()
    watch.committed(epoch=3, step=500, rank=0)
    assert watch.observe({0: (3, 520), 1: (2, 480), 2: (2, 500)}) is None  # 1 and 2 commit at 500, not yet past it


def test_a_rank_past_the_commit_step_at_the_old_epoch_has_diverged():
    watch = EpochLagWatch()
    watch.committed(epoch=3, step=500, rank=0)
    watch.committed(epoch=3, step=900, rank=2)  # a late duplicate never moves the step
    why = watch.observe({0: (3, 520), 1: (2, 501)})
    assert why is not None and "rank 1 is at step 501 with epoch 2, but epoch 3 was committed at step 500" in why
    assert "(reported by rank 0)" in why  # the one report the verdict rests on


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
    coordinator.epoch_watch.committed(epoch=3, step=110, rank=0)
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
        watch.committed(epoch, epoch * 100, rank=0)
    assert sorted(watch.commit_steps) == [7, 8, 9, 10]


def test_a_commit_of_an_unknown_plan_is_logged_and_the_halt_names_the_rank_that_reported_it(caplog):
    """After a restart a Committed may name a plan this coordinator never proposed: its step
    still counts, but the warning and a resulting halt name the rank it rests on."""
    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    rank0, rank1 = c.registry.agents[0], c.registry.agents[1]
    with caplog.at_level("WARNING"):
        c._handle(
            rank1.identity,
            protocol.Committed(rank=1, plan_id=424242, commit_step=100, epoch=1, stall_s=0.0, session=rank1.session),
        )
    warned = [r.getMessage() for r in caplog.records if "424242" in r.getMessage()]
    assert warned and "rank 1" in warned[0] and "epoch 1" in warned[0] and "no record" in warned[0], caplog.text
    assert c.epoch_watch.commit_steps[1] == (100, 1)
    c._handle(rank0.identity, protocol.Heartbeat(rank=0, step=101, epoch=0, session=rank0.session))
    assert c.halted_reason is not None and "rank 0 is at step 101 with epoch 0" in c.halted_reason
    assert "reported by rank 1" in c.halted_reason, c.halted_reason


def test_a_commit_of_a_plan_this_coordinator_proposed_is_not_warned_about(caplog):
    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    c.plans._numbers[77] = 1  # as if proposed: ids this coordinator sent are known
    rank1 = c.registry.agents[1]
    with caplog.at_level("WARNING"):
        c._handle(
            rank1.identity,
            protocol.Committed(rank=1, plan_id=77, commit_step=100, epoch=1, stall_s=0.0, session=rank1.session),
        )
    assert "no record" not in caplog.text
    assert c.epoch_watch.commit_steps[1] == (100, 1)


def test_step_clock_verdicts_follow_new_probes_between_repeated_queries():
    """Verdicts are kept between queries until a rank's probes change: a rank that starts counting
    a step apart is seen at its next probes, and one that re-registers is compared afresh."""
    import numpy as np

    from eplb_service.step_clock import StepClockWatch

    step = 0.05
    watch = StepClockWatch(confirm=2)

    def beat(rank: int, probes: list[int], shift: int = 0) -> None:
        times = [[(k + j + shift) * step for j in range(-3, 4)] for k in probes]
        watch.observe(rank, probes, times, 1000.0)

    beat(0, [32, 64])
    beat(1, [32, 64])
    for _ in range(3):
        assert {r: s.offset for r, s in watch.states([0, 1]).items()} == {0: 0, 1: 0}
    beat(2, [96, 128], shift=-1)  # rank 2 counts one step ahead
    beat(0, [96, 128])
    assert watch.states([0, 1, 2])[2].offset == 1
    assert watch.states([0, 1, 2])[2].offset == 1
    watch.forget(2)
    assert watch.states([0, 1, 2])[2].offset is None
    beat(2, [96, 128])  # a new process that counts as the others do
    assert watch.states([0, 1, 2])[2].offset == 0
    assert np.isfinite(watch.clocks[0].probes[96]).all()
