"""What the message router takes from each message, and what it does when a rank goes: a load report
never sets the rank's step back, a heartbeat's ``staging_plan`` holds back the plan's copies, the
step-leap bound is where its ``Reject`` says, a rank that left gets a fresh side communicator when
it is back, and one restarted worker among old ones is no new deployment; the placement book keeps
exactly ``HISTORY_EPOCHS`` placements.

Written against hand-made mutations of ``router`` and ``placement_book`` that the rest of the
suite let through (a rank's step overwritten by each load report's end step, which lags its
heartbeats by a report interval; "every live rank restarted" read as "any")."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from conftest import send_load_report
from plan_harness import beat, commit_plan, harness, hello_again

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.placement_book import HISTORY_EPOCHS
from eplb_service.coordinator.resend import PLAN_FIRST_S
from eplb_service.coordinator.router import MAX_STEP_LEAP
from eplb_service.coordinator.server import Coordinator
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.testing.protocol_fuzz import SocketSink

LOAD = np.ones((2, 8), dtype=np.int64)


def test_a_load_report_behind_the_heartbeats_leaves_the_rank_s_step_where_they_put_it():
    """Load reports cover the steps up to the last report interval; heartbeats run ahead of them.
    Taken as the rank's step, each report set it back: the rebalance interval (counted from the
    lowest rank's step) and the status showed a step the rank was past."""
    c, _ = harness()
    beat(c, 0, step=300, epoch=0)
    send_load_report(c, 0, 250, LOAD)
    assert c.registry.agents[0].step == 300
    send_load_report(c, 0, 320, LOAD)  # one ahead of the last heartbeat does move it on
    assert c.registry.agents[0].step == 320


def test_a_rank_whose_heartbeat_says_it_stages_the_plan_gets_no_copy_of_it():
    """A large plan stages for many seconds: its ``Staged`` comes late, not lost. The heartbeat's
    ``staging_plan`` is what tells the two apart; dropped on the way to the runner, every rank
    staging a large plan got a ``Plan`` copy at each back-off interval."""

    c, sent = harness()
    rows = c.placements[0][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    plan = c.plans.plan
    beat(c, 0, step=10, epoch=0, staging_plan=plan.plan_id)
    beat(c, 1, step=10, epoch=0)
    sent.clear()
    c.plans.tick(plan.phase_started_at + PLAN_FIRST_S + 0.01)
    copies = [identity for identity, m in sent if isinstance(m, protocol.Plan)]
    assert copies == [c.registry.agents[1].identity]


def test_a_step_exactly_max_step_leap_past_the_last_is_taken_and_one_more_is_refused():
    """The Reject says "at most MAX_STEP_LEAP expected": that many is still a plausible step."""

    c, sent = harness()
    beat(c, 0, step=100, epoch=0)
    sent.clear()
    beat(c, 0, step=100 + MAX_STEP_LEAP, epoch=0)
    assert [type(m).__name__ for _, m in sent] == ["HeartbeatAck"]
    assert c.registry.agents[0].step == 100 + MAX_STEP_LEAP
    sent.clear()
    beat(c, 0, step=100 + 2 * MAX_STEP_LEAP + 1, epoch=0)
    assert [(type(m).__name__, m.code) for _, m in sent if isinstance(m, protocol.Reject)] == [
        ("Reject", "bad_message")
    ]
    assert c.registry.agents[0].step == 100 + MAX_STEP_LEAP


def test_the_book_keeps_exactly_history_epochs_placements():
    """``HISTORY_EPOCHS`` placements: a load report of an older epoch is dropped, the newest 16 fold."""

    c, _ = harness()
    for k in range(HISTORY_EPOCHS + 2):
        commit_plan(c, step=50 + 70 * k)
    assert sorted(c.placements) == list(range(c.epoch - HISTORY_EPOCHS + 1, c.epoch + 1))


def test_a_rank_that_left_and_registers_again_gets_a_new_side_communicator_with_every_rank():
    """The generation built before the rank left had it as a member: its new process cannot join the
    others in it. Without a fresh generation the deployment waited out the coordinator's retry
    (``2 x transport_timeout_s + 2`` s) before it could rebalance again."""

    c, sent = harness()
    before = c.side_comm.generation
    r1 = c.registry.agents[1]
    c._handle(r1.identity, protocol.Goodbye(rank=1, reason="worker restart", session=r1.session))
    assert 1 not in c.registry.agents
    sent.clear()
    c._handle(b"rank-1-new", hello_again(c, 1, step=0))
    inits = [(identity, m.generation) for identity, m in sent if isinstance(m, protocol.CommInit)]
    assert sorted(inits) == sorted((c.registry.agents[rank].identity, before + 1) for rank in (0, 1))


def _three_ranks():
    """A coordinator with ranks 0, 1, 2 registered at epoch 0, the side communicator built."""

    c = Coordinator(CoordinatorConfig(world_size=3, endpoint="ipc:///nonexistent/three.sock"))
    c._sock = SocketSink()
    c.send = lambda identity, message: None
    placement = initial_phy2log(PlacementShape(2, 6, 9, 3))

    def hello(rank: int, pid: int) -> protocol.Hello:
        return protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=rank,
            model=protocol.ModelShape(2, 6, 9, 3, 36),
            phy2log=protocol.NDArray.from_numpy(placement),
            epoch=0,
            step=0,
            transport="gloo",
            store_host="127.0.0.1" if rank == 0 else "",
            store_port=1 if rank == 0 else 0,
            pid=pid,
        )

    for rank in range(3):
        c._handle(f"rank-{rank}".encode(), hello(rank, pid=100 + rank))
    c.side_comm.next(c.registry.agents[0].store)
    for record in c.registry.alive:
        record.comm_generation = c.side_comm.generation
    return c, hello


def test_one_restarted_worker_left_with_an_old_one_is_not_taken_for_a_new_deployment():
    """Every rank at epoch 1; rank 0's worker restarts alone (its new process serves epoch 0), then
    rank 2 leaves. Rank 1 is still the old deployment's process: only when *every* live rank is a
    restarted worker is the deployment a new one (its book, window and epoch then dropped)."""

    c, hello = _three_ranks()
    rows = c.placements[0][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    plan_id = c.plans.plan.plan_id
    for kind in ("Staged", "Voted", "Committed"):
        for r in list(c.registry.alive):
            fields = {
                "Staged": dict(bytes_received=0, duration_s=0.0),
                "Voted": dict(commit_step=30, ok=True),
                "Committed": dict(commit_step=30, epoch=1, stall_s=0.0),
            }[kind]
            c._handle(r.identity, getattr(protocol, kind)(rank=r.rank, plan_id=plan_id, session=r.session, **fields))
    assert c.epoch == 1
    deployments = c.deployments
    r0 = c.registry.agents[0]
    c._handle(r0.identity, protocol.Goodbye(rank=0, reason="worker restart", session=r0.session))
    c._handle(b"rank-0-new", hello(0, pid=200))  # the restarted worker
    assert c.registry.agents[0].restarted and c.registry.agents[0].epoch == 0
    r2 = c.registry.agents[2]
    c._handle(r2.identity, protocol.Goodbye(rank=2, reason="scaled down", session=r2.session))
    assert c.deployments == deployments and c.epoch == 1 and 1 in c.placements
    assert c.registry.agents[0].restarted  # still told apart from the old deployment's rank 1
