"""The staging pipeline and the vote's arithmetic as units of their own (no agent, no coordinator).

Two ranks run ``StagingPipeline.stage`` at once, in two threads over a real gloo side group,
for a plan that moves experts between them: every staging row must hold the expert the plan
puts in its slot, the live rows must be untouched, and the digests each rank collected must
agree sender-to-receiver once reduced the way the vote reduces them. The vote's pure parts
(``vote_vector``, ``corrupt_ops``, ``proposal_from``) are checked on their own too.
"""

from __future__ import annotations

import collections
import datetime
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import commit_through_serving, expert_row_value, free_port, make_model, rows_match_maps

from eplb_service import protocol
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.worker_agent.commit_vote import corrupt_ops, proposal_from, vote_vector
from eplb_service.worker_agent.expert_model import map_tensors
from eplb_service.worker_agent.schedule import build_schedule
from eplb_service.worker_agent.staging_pipeline import NO_DIGEST, StagingPipeline
from eplb_service.worker_agent.transport_gloo import GlooTransport

SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


def new_rows() -> np.ndarray:
    """Layer 1: swap two experts between the ranks and move a replica (rank 0 holds 0-3, rank 1 4,5,0,1)."""
    rows = initial_phy2log(SHAPE)[[1]].copy()
    rows[0, 0], rows[0, 4] = 4, 0  # expert 4 to rank 0, expert 0 to rank 1 (it already has a replica)
    rows[0, 7] = 2  # rank 1's slot 7 takes expert 2 from rank 0
    return rows


def stage_both(rows: np.ndarray, config: protocol.AgentConfig, layers: tuple[int, ...] = (1,)) -> tuple[list, list]:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    plan = protocol.Plan(plan_id=7, base_epoch=0, layers=list(layers), phy2log=protocol.NDArray.from_numpy(rows))
    models = [make_model(r, SHAPE) for r in range(2)]
    staged: list = [None, None]
    errors: list = []

    def run(rank: int) -> None:
        try:
            transport = GlooTransport()
            transport.connect(
                protocol.CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=2), rank, 20
            )
            pipeline = StagingPipeline(models[rank], transport, rank, None, collections.Counter())
            staged[rank] = pipeline.stage(plan, rows, initial_phy2log(SHAPE), config, pump=lambda: None)
            transport.abort()
        except Exception as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    del store
    assert not errors, errors
    return models, staged


def test_two_ranks_stage_every_incoming_expert_and_leave_live_rows_alone():
    rows = new_rows()
    models, staged = stage_both(rows, protocol.AgentConfig(max_ops_per_group=1))  # one op per chunk: several chunks
    spr = SHAPE.slots_per_rank
    for rank, (model, result) in enumerate(zip(models, staged)):
        assert rows_match_maps(model), "staging touched a live row"
        area = result.area
        assert area.work.staging, f"rank {rank} has nothing to stage"
        for row in area.work.staging:  # each staging row will replace live row dst_row with expert
            assert int(rows[0, rank * spr + row.dst_row]) == row.expert
            assert torch.all(area.rows[0][row.index] == expert_row_value(1, row.expert)), (rank, row)
            assert torch.all(area.rows[1][row.index] == 2 * expert_row_value(1, row.expert)), (rank, row)
    assert staged[1].received_bytes > 0 and staged[0].received_bytes > 0


def test_a_two_layer_plan_with_local_duplicate_and_remote_rows_commits_to_exactly_the_plan():
    """Stage on both ranks, then commit: every live row and every map must be the plan's.

    The plan mixes every kind of staging row over two layers. Rank 0 receives expert 4 of layer 1
    from rank 1 and copies it again to a second slot (a duplicate), and fills layer 0's slot 3
    from its own slot 0 (local); rank 1 receives expert 3 of layer 0 and copies expert 0 of
    layer 1 locally. Renumbered for block transfers, rank 0's staging is layers 1, 0, 1: the
    commit must not take it as sorted by layer. Layer 1's replica counts change (expert 4 gets
    two, expert 1 one), so stale counts show too.
    """
    layers = (0, 1)
    rows = np.array([[0, 1, 2, 0, 4, 5, 3, 1], [4, 4, 2, 3, 0, 5, 0, 1]])
    models, staged = stage_both(rows, protocol.AgentConfig(), layers)
    assert [len(s.area.work.duplicates) for s in staged] == [1, 0]
    assert [row.layer for row in staged[0].area.work.staging] == [1, 0, 1]
    # Every remote row has a digest on both ends, or the vote compares the sender's with itself.
    schedule = build_schedule(initial_phy2log(SHAPE)[list(layers)], rows, SHAPE.num_ranks)
    for k, op in enumerate(schedule.remote):
        assert staged[op.src_rank].digests[k] != NO_DIGEST and staged[op.dst_rank].digests[k] != NO_DIGEST, k
    for rank, (model, result) in enumerate(zip(models, staged)):
        outcome = commit_through_serving(model, 7, list(layers), rows, result.area)
        assert outcome == "committed", (rank, outcome)
        full = initial_phy2log(SHAPE)
        full[list(layers)] = rows
        phy2log, log2phy, logcnt = map_tensors(full, SHAPE.num_logical, SHAPE.num_redundant + 1)
        assert torch.equal(model.phy2log, phy2log), rank
        assert torch.equal(model.log2phy, log2phy), rank
        assert torch.equal(model.logcnt, logcnt), rank
        assert rows_match_maps(model), f"rank {rank}: a live row holds another expert than its map says"


def test_the_ranks_digests_agree_once_reduced_and_a_corrupt_one_is_named():
    rows = new_rows()
    _, staged = stage_both(rows, protocol.AgentConfig())
    vectors = [vote_vector(100 + r, 0, 7, staged[r].digests) for r in range(2)]
    reduced = np.maximum(vectors[0], vectors[1])  # what the MAX all-reduce returns on every rank
    assert corrupt_ops(reduced) == []
    decision = proposal_from(reduced, plan_id=7, rank=0)
    assert decision.commit and decision.commit_step == 101
    # every remote op has a digest on both sides; one flipped byte on the receiver is named
    assert all((staged[0].digests != NO_DIGEST) | (staged[1].digests != NO_DIGEST))
    tampered = staged[1].digests.copy()
    k = int(np.flatnonzero(tampered != NO_DIGEST)[0])
    tampered[k] ^= 1
    reduced = np.maximum(vectors[0], vote_vector(101, 0, 7, tampered))
    assert corrupt_ops(reduced) == [k]
    decision = proposal_from(reduced, plan_id=7, rank=0)
    assert not decision.commit and decision.code == "integrity" and f"[{k}]" in decision.reason


def test_a_rank_that_was_not_ready_or_voted_another_plan_makes_everyone_abort():
    ready = vote_vector(5, 0, 7, np.empty(0, dtype=np.int64))
    assert proposal_from(ready, 7, 0).commit
    not_ready = np.maximum(ready, vote_vector(6, 1, 7, np.empty(0, dtype=np.int64)))
    assert proposal_from(not_ready, 7, 0).code == "vote_failed"
    other_plan = np.maximum(ready, vote_vector(6, 0, 8, np.empty(0, dtype=np.int64)))
    assert proposal_from(other_plan, 7, 0).code == "vote_failed"


def test_a_rank_voting_an_older_plan_makes_everyone_abort_though_the_max_hides_its_id():
    """Under MAX, a peer voting plan 6 leaves 7 in the plan-id slot: only ``-plan_id`` (``-6``
    beats ``-7``) shows it. Checked on the id alone, plan 7's ranks would commit without it."""
    ready = vote_vector(5, 0, 7, np.empty(0, dtype=np.int64))
    older_plan = np.maximum(ready, vote_vector(6, 0, 6, np.empty(0, dtype=np.int64)))
    assert int(older_plan[2]) == 7
    decision = proposal_from(older_plan, 7, 0)
    assert not decision.commit and decision.code == "vote_failed"


class _RecordingTransport:
    """Counts collectives; any all-reduce from a rank without the plan would be a defect."""

    name = "fake"
    generation = 3

    def __init__(self) -> None:
        self.reduces = 0

    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        self.reduces += 1
        return values


def test_a_rank_without_the_staged_plan_answers_not_staged_and_never_joins_the_all_reduce():
    """Its vote vector would be shorter than its peers' (no digests), and a size mismatch in a
    gloo all-reduce ends the process: seen when a VoteNow held back past an abort arrived while
    the others voted on the next plan."""
    import logging
    from types import SimpleNamespace

    from eplb_service.worker_agent.commit_vote import CommitVoter

    sent: list[protocol.Message] = []
    transport = _RecordingTransport()
    host = SimpleNamespace(
        rank=2,
        hooks=SimpleNamespace(steps_done=40),
        transport=transport,
        decider=None,
        stats=collections.Counter(),
        log=logging.LoggerAdapter(logging.getLogger("test"), {}),
        send=sent.append,
        keep_alive=lambda: None,
        session=11,
        side_ready=True,
    )
    voter = CommitVoter(host, model=None)
    voter.vote(protocol.VoteNow(plan_id=9), plan=None, rows=None, staged=None, record=None)
    assert transport.reduces == 0 and voter.ticket is None
    assert [(type(m).__name__, m.plan_id, m.code) for m in sent] == [("Aborted", 9, "not_staged")]
    host.side_ready = False
    voter.vote(protocol.VoteNow(plan_id=10), plan=None, rows=None, staged=None, record=None)
    assert transport.reduces == 0 and (sent[-1].plan_id, sent[-1].code) == (10, "not_connected")


def test_a_rank_waiting_for_a_late_peer_keeps_polling_and_an_abandoned_wait_keeps_it_busy():
    """A peer that got its ``Plan`` late (lost, sent again): the rank already in the exchange must
    keep its agent alive meanwhile. Before, gloo's ``wait`` blocked it without a poll for as long
    as the peer was late, up to the transport timeout: no heartbeat, no message read, and past
    its silence limit the agent reopened its socket, losing what was in flight."""
    from eplb_service.worker_agent.transport import P2POp

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    comm = protocol.CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=2)
    transports = [GlooTransport(), GlooTransport()]
    threads = [threading.Thread(target=transports[r].connect, args=(comm, r, 10)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    polls: list[float] = []
    transports[0].poll_hook = lambda: polls.append(time.monotonic())
    received = torch.zeros(4, dtype=torch.int64)

    def late_receiver() -> None:
        time.sleep(0.5)
        transports[1].exchange([P2POp(False, received, 0, 0)])

    peer = threading.Thread(target=late_receiver)
    peer.start()
    t0 = time.monotonic()
    transports[0].exchange([P2POp(True, torch.arange(4, dtype=torch.int64), 1, 0)])
    peer.join(10)
    assert time.monotonic() - t0 >= 0.45 and received.tolist() == [0, 1, 2, 3]
    assert len(polls) > 20 and max(b - a for a, b in zip(polls, polls[1:])) < 0.1, f"{len(polls)} polls"
    assert not transports[0].busy

    class Abort(Exception):
        pass

    def abort_hook() -> None:
        raise Abort()

    transports[0].poll_hook = abort_hook  # the coordinator aborted the plan; the peer never comes
    with pytest.raises(Abort):
        transports[0].exchange([P2POp(True, torch.arange(4, dtype=torch.int64), 1, 1)])
    assert transports[0].busy, "a wait left behind must make the agent tear the group down"
    for t in transports:
        t.abort()
    assert not transports[0].busy
    del store
