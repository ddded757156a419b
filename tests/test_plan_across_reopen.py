"""A rank's own process reopening its socket in the middle of a plan costs no plan.

An agent that hears nothing from the coordinator past its silence limit (a coordinator stalled,
a link that made ZeroMQ reconnect) opens a new socket and sends ``Hello`` with ``resume_session``:
the same process, its staged rows and side communicator intact. Before, the coordinator booked
that ``Hello`` as the rank lost: a plan staging aborted (``rank R lost during staging``,
``agent_lost``), a plan in its vote counted the rank out, and the side communicator was rebuilt.
Now the record moves to the new socket and what went to the old one is sent again (``resend``).
A new process in the rank still aborts the plan (``test_fault_scenarios.py``).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from plan_harness import harness

from eplb_service import protocol


def resume(c, rank: int, **changed) -> bytes:
    """``rank``'s process sends ``Hello`` resuming its session on a new socket; returns its identity."""
    held = c.registry.agents[rank]
    fields: dict = dict(node=held.node, pid=held.pid)
    if rank == 0:
        fields.update(store_host=held.store[0], store_port=held.store[1])
    fields.update(changed)
    identity = f"rank-{rank}-reopened".encode()
    c._handle(
        identity,
        protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=rank,
            model=c.model,
            phy2log=protocol.NDArray.from_numpy(held.phy2log),
            epoch=held.epoch,
            step=held.step,
            transport="gloo",
            resume_session=held.session,
            **fields,
        ),
    )
    assert c.registry.agents[rank].identity == identity
    return identity


def send_plan(c):
    """A one-layer plan (layer 0's row reversed), sent to both ranks: staging."""
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    return c.plans.plan


def answer(c, rank: int, message_type, **fields) -> None:
    r = c.registry.agents[rank]
    c._handle(r.identity, message_type(rank=rank, session=r.session, **fields))


def finish(c, plan, step: int = 40) -> None:
    """Both ranks read ``commit step`` from the record and commit there."""
    for rank in (0, 1):
        answer(c, rank, protocol.Voted, plan_id=plan.plan_id, commit_step=step, ok=True)
    for rank in (0, 1):
        answer(
            c, rank, protocol.Committed, plan_id=plan.plan_id, commit_step=step, epoch=plan.base_epoch + 1, stall_s=0
        )


def sent_to(sent, identity: bytes, message_type) -> list:
    return [m for i, m in sent if i == identity and isinstance(m, message_type)]


def test_a_rank_resuming_its_session_mid_staging_keeps_the_plan_and_the_communicator():
    c, sent = harness()
    generation = c.side_comm.generation
    plan = send_plan(c)
    answer(c, 0, protocol.Staged, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0)
    sent.clear()
    reopened = resume(c, 1)  # its Staged went to the old socket and was lost
    assert c.plans.plan is plan and plan.phase.value == "staging" and not c.plans.outcomes, c.plans.outcomes
    assert not [m for _, m in sent if isinstance(m, protocol.CommInit)] and c.comm_ready()
    c.plans.tick(time.monotonic())  # its copy of the Plan is due at once, on the new socket
    assert [m.plan_id for m in sent_to(sent, reopened, protocol.Plan)] == [plan.plan_id]
    answer(c, 1, protocol.Staged, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0)  # the answer again
    assert plan.phase.value == "voting" and sent_to(sent, reopened, protocol.VoteNow)
    finish(c, plan)
    assert [(o.phase, o.commit_step) for o in c.plans.outcomes] == [("committed", 40)], c.plans.outcomes
    assert c.epoch == 1 and c.side_comm.generation == generation and c.comm_ready()


def test_every_rank_resuming_mid_vote_gets_its_vote_request_again():
    """The coordinator stalled with the plan just staged: its ``VoteNow`` went to sockets the agents
    closed. Before: each resumed ``Hello`` counted its rank lost, and the plan, with every rank
    lost, aborted (``agent lost``) whatever the record was about to say."""
    c, sent = harness()
    plan = send_plan(c)
    for rank in (0, 1):
        answer(c, rank, protocol.Staged, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0)
    assert plan.phase.value == "voting" and plan.vote_sent
    sent.clear()
    reopened = [resume(c, rank) for rank in (0, 1)]
    assert c.plans.plan is plan and not plan.lost and not c.plans.outcomes, c.plans.outcomes
    c.plans.tick(time.monotonic())
    for identity in reopened:
        assert [m.plan_id for m in sent_to(sent, identity, protocol.VoteNow)] == [plan.plan_id], identity
    finish(c, plan)
    assert [o.phase for o in c.plans.outcomes] == ["committed"] and c.epoch == 1


def test_a_resumed_rank_that_dropped_the_plan_meanwhile_aborts_it_saying_why():
    """A coordinator silent past the agent's ``staged_timeout_s``: the agent dropped its staged plan
    (``Aborted(no_vote)``, lost with its old socket) and answers the ``Plan`` copy with it."""
    c, sent = harness()
    generation = c.side_comm.generation
    plan = send_plan(c)
    answer(c, 0, protocol.Staged, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0)
    resume(c, 1)
    reason = "no vote within staged_timeout_s=60.0"
    answer(c, 1, protocol.Aborted, plan_id=plan.plan_id, reason=reason, code="no_vote")
    assert [(o.phase, o.code, o.reason) for o in c.plans.outcomes] == [("aborted", "no_vote", f"rank 1: {reason}")]
    assert c.side_comm.generation == generation + 1  # a rank may have torn its communicator down: one rebuild


def test_a_resumed_rank_keeps_what_its_record_knew():
    """The record moves to the new socket: a worker restarted alone stays one (the halt that names it
    must not lift because its agent reopened), and a duplicated ``Committed`` is still a copy."""
    c, _ = harness()
    c.registry.agents[1].restarted = True
    c.registry.agents[1].committed_plans.append(99)
    resume(c, 1)
    assert c.registry.agents[1].restarted and list(c.registry.agents[1].committed_plans) == [99]


def test_a_resumed_rank_s_exported_counters_stay_where_its_heartbeats_put_them():
    """The process's counters only grow; between its resumed ``Hello`` and its first heartbeat on the
    new socket (a heartbeat interval, after every coordinator stall) a scrape read them as 0, and
    Prometheus took that for a counter reset (``rate()`` jumps by the whole value). Before: {}."""
    from plan_harness import beat

    c, _ = harness()
    counters = {"socket_reopened": 3, "staged": 5, "bytes_received": 1 << 20}
    beat(c, 1, step=10, epoch=0, counters=counters, internal_errors=2)
    resume(c, 1)
    assert c._agent_counters()[1] == counters
    assert c.registry.agents[1].internal_errors == 2
