"""A real Coordinator with two registered ranks, driven message by message (no sockets): plans
started, staged, voted and committed as the ranks' messages say."""

from __future__ import annotations

from types import SimpleNamespace

from eplb_service import protocol
from eplb_service.testing.protocol_fuzz import HandlerHarness


def harness():
    """A coordinator with two registered ranks whose side communicator is built; what it sends is kept."""
    c = HandlerHarness().coordinator
    sent: list[tuple[bytes, protocol.Message]] = []
    c.send = lambda identity, message: sent.append((identity, message))
    c.side_comm.next(c.registry.agents[0].store)
    for record in c.registry.alive:
        record.comm_generation = c.side_comm.generation
    return c, sent


def start_plan(c):
    """A one-layer plan (layer 0's row reversed), staged on both ranks: in its vote."""
    rows = c.placements[c.epoch][[0]][:, ::-1].copy()
    c.plans.pending_batches = [SimpleNamespace(layers=[0], phy2log=rows, bytes_moved=0)]
    c.plans.start_next_batch()
    plan = c.plans.plan
    for r in c.registry.alive:
        c._handle(
            r.identity,
            protocol.Staged(rank=r.rank, plan_id=plan.plan_id, bytes_received=0, duration_s=0.0, session=r.session),
        )
    return plan


def commit_plan(c, step: int) -> int:
    """One plan committed at ``step`` on both ranks, as their messages say; returns its id."""
    plan = start_plan(c)
    for r in c.registry.alive:
        c._handle(
            r.identity, protocol.Voted(rank=r.rank, plan_id=plan.plan_id, commit_step=step, ok=True, session=r.session)
        )
    for r in c.registry.alive:
        c._handle(
            r.identity,
            protocol.Committed(
                rank=r.rank,
                plan_id=plan.plan_id,
                commit_step=step,
                epoch=plan.base_epoch + 1,
                stall_s=0.0,
                session=r.session,
            ),
        )
    assert c.plans.plan is None and c.epoch == plan.base_epoch + 1, c.plans.outcomes
    return plan.plan_id


def hello_again(c, rank: int, step: int, **fields) -> protocol.Hello:
    """``rank``'s ``Hello`` at epoch 0 and ``step`` on the harness's model and placement (``fields``:
    other ``Hello`` fields, e.g. ``resume_session``, ``node``, ``pid``)."""
    return protocol.Hello(
        protocol_version=protocol.PROTOCOL_VERSION,
        rank=rank,
        model=c.book.model,
        phy2log=protocol.NDArray.from_numpy(c.placements[0]),
        epoch=0,
        step=step,
        transport="gloo",
        **fields,
    )


def beat(c, rank: int, step: int, epoch: int, **fields) -> None:
    """A heartbeat of ``rank`` (``fields``: other ``Heartbeat`` fields; by default it reports the
    side-communicator generation the coordinator has on record for the rank)."""
    r = c.registry.agents[rank]
    fields.setdefault("comm_generation", r.comm_generation)
    c._handle(r.identity, protocol.Heartbeat(rank=rank, step=step, epoch=epoch, session=r.session, **fields))
