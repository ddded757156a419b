"""The registry's own rules (``coordinator.registry``): which connection speaks for a rank, when the
deployment is complete and its side communicator ready, and which heartbeat is taken."""

from __future__ import annotations

import numpy as np

from eplb_service import protocol
from eplb_service.coordinator.registry import AgentRecord, Registry


def record(rank: int, identity: bytes | None = None, comm_generation: int = -1) -> AgentRecord:
    return AgentRecord(
        rank=rank,
        identity=identity or f"rank-{rank}".encode(),
        node="n",
        pid=100 + rank,
        epoch=0,
        step=0,
        phy2log=np.zeros((2, 8), dtype=np.int64),
        comm_generation=comm_generation,
        last_seen=0.0,
    )


def test_a_rank_s_replaced_connection_no_longer_speaks_for_it():
    """A rank registered again on a new socket: frames still on its old connection are an unknown
    agent's (``router.newest_epoch`` relies on it), not the new record's under a carried-over session."""
    registry = Registry(2)
    registry.register(record(1, b"rank-1-old"))
    new = record(1, b"rank-1-new")
    registry.register(new)
    assert registry.by_identity(b"rank-1-new") is new
    assert registry.by_identity(b"rank-1-old") is None
    registry.remove(1)
    assert registry.by_identity(b"rank-1-new") is None


def test_a_rank_declared_dead_leaves_the_deployment_incomplete_and_not_ready():
    """``complete`` counts live ranks only, whether or not the dead one's record was removed yet."""
    registry = Registry(2)
    for rank in (0, 1):
        registry.register(record(rank, comm_generation=3))
    assert registry.complete and registry.comm_ready(3)
    registry.agents[0].last_seen = 100.0
    assert [r.rank for r in registry.expire(now=105.0, timeout_s=10.0)] == [1]
    assert not registry.complete and not registry.comm_ready(3)


def test_the_side_communicator_is_ready_only_once_every_rank_built_the_generation():
    registry = Registry(2)
    registry.register(record(0, comm_generation=4))
    registry.register(record(1, comm_generation=3))
    assert registry.complete and not registry.comm_ready(4) and not registry.comm_ready(3)
    registry.agents[1].comm_generation = 4
    assert registry.comm_ready(4)


def test_a_heartbeat_at_the_step_already_taken_is_taken():
    """An idle engine's heartbeats all carry one step: the one that says a new side communicator
    generation is built must be taken, or an idle deployment never reads as ready. Only a lower
    step is a late copy."""
    r = record(1)
    assert r.take_heartbeat(protocol.Heartbeat(rank=1, step=10, epoch=0, comm_generation=1))
    assert r.take_heartbeat(protocol.Heartbeat(rank=1, step=10, epoch=0, comm_generation=2))
    assert r.comm_generation == 2 and r.heartbeat_step == 10
    assert not r.take_heartbeat(protocol.Heartbeat(rank=1, step=9, epoch=0, comm_generation=1))
    assert r.comm_generation == 2 and r.step == 10
