"""The copy-engine transport on CPU: its pure logic, then its whole protocol between real processes.

The processes use the CPU stand-in mover (outboxes in shared-memory files, plain copies)
and a real rendezvous store and gloo vote group: everything the CUDA path runs except
the CUDA calls themselves (``tests/gpu/test_copy_engine.py`` runs those).
"""

from __future__ import annotations

import collections
import datetime
import glob
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from child_results import gather_results, put_result_and_exit
from conftest import expert_row_value, free_port, make_model, rows_match_maps

from eplb_service import protocol
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.worker_agent import copy_engine as ce
from eplb_service.worker_agent.commit_vote import corrupt_ops, proposal_from, vote_vector
from eplb_service.worker_agent.memory_mover import HostMemoryMover, shared_dir
from eplb_service.worker_agent.staging_pipeline import NO_DIGEST, StagingPipeline
from eplb_service.worker_agent.transport import P2POp, TransportError
from eplb_service.worker_agent.transport_copy_engine import CopyEngineTransport, SelectingTransport
from eplb_service.worker_agent.transport_gloo import GlooTransport

CTX = mp.get_context("spawn")
SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


# -- selection -------------------------------------------------------------------------------------


def test_modes_parse_and_a_bad_one_is_named_with_the_choices():
    assert ce.parse_mode(" Copy-Engine ") == "copy-engine"
    assert ce.parse_mode("auto") == "auto" and ce.parse_mode("nccl") == "nccl"
    with pytest.raises(ValueError, match=r"EPLB_SERVICE_TRANSPORT='ipc': expected one of auto, nccl, copy-engine"):
        ce.parse_mode("ipc")


def _info(rank: int, host: str, device: str = "gpu-a", mode: str = "auto") -> ce.RankInfo:
    return ce.RankInfo(rank, host, device, mode, f"/c{rank}", f"w{rank}", 4096)


def test_candidates_are_peers_on_this_host_with_a_reachable_device():
    infos = [_info(0, "h1"), _info(1, "h1", "gpu-b"), _info(2, "h2"), _info(3, "h1", "gpu-hidden")]
    assert ce.candidate_peers(infos[0], infos, lambda dev: dev != "gpu-hidden") == [1]
    no_window = ce.RankInfo(4, "h1", "gpu-a", "auto", "", "", 4096)  # could not set its outbox up
    assert ce.candidate_peers(infos[0], [*infos, no_window], lambda dev: True) == [1, 3]
    assert ce.RankInfo.from_dict(infos[1].as_dict()) == infos[1]


def test_a_pair_uses_copy_engines_only_when_both_ends_opened_each_other():
    opened = {0: [1, 2], 1: [0], 2: [], 3: [0]}
    assert ce.copy_engine_pairs(opened) == {(0, 1)}
    assert ce.missing_pairs(3, {(0, 1)}) == [(0, 2), (1, 2)]


def test_decide_all_or_nothing_and_forced_modes():
    full = {(0, 1), (0, 2), (1, 2)}
    assert ce.decide(["auto"] * 3, 3, full) == "copy-engine"
    assert ce.decide(["copy-engine"] * 3, 3, full) == "copy-engine"
    assert ce.decide(["auto"] * 3, 3, {(0, 1)}) == "nccl"  # one node short: NCCL for every pair (for now)
    assert ce.decide(["nccl"] * 3, 3, full) == "nccl"
    assert ce.decide(["auto"], 1, set()) == "copy-engine"  # one rank: nothing to move anyway
    with pytest.raises(ce.CopyEngineError, match=r"copy-engine, but 2 pair\(s\).*0-2, 1-2"):
        ce.decide(["copy-engine"] * 3, 3, {(0, 1)})
    with pytest.raises(ce.CopyEngineError, match=r"disagree on EPLB_SERVICE_TRANSPORT: \{'auto': \[0\], 'nccl'"):
        ce.decide(["auto", "nccl", "nccl"], 3, full)


# -- addressing --------------------------------------------------------------------------------------


def test_split_span_maps_a_stream_range_onto_ops():
    sizes = [10, 0, 5, 20]
    assert ce.split_span(sizes, 0, 35) == [(0, 0, 0, 10), (2, 0, 10, 5), (3, 0, 15, 20)]
    assert ce.split_span(sizes, 8, 10) == [(0, 8, 0, 2), (2, 0, 2, 5), (3, 0, 7, 3)]
    assert ce.split_span(sizes, 34, 1) == [(3, 19, 0, 1)]
    assert ce.split_span(sizes, 35, 0) == []
    with pytest.raises(ce.CopyEngineError, match=r"\[30, 40\) outside a stream of 35 bytes"):
        ce.split_span(sizes, 30, 10)


def test_every_byte_of_every_stream_is_covered_exactly_once_by_the_rounds():
    rng = np.random.default_rng(3)
    for _ in range(50):
        totals = {
            int(p): int(rng.integers(0, 5000)) for p in rng.choice(8, size=int(rng.integers(1, 6)), replace=False)
        }
        capacity = int(rng.integers(1, 8)) * 1024
        sent = dict.fromkeys(totals, 0)
        rounds = 0
        while any(sent[p] < totals[p] for p in totals):
            layout = ce.plan_round({p: totals[p] - sent[p] for p in totals}, capacity)
            spans = sorted((off, off + n) for off, n in layout.values())
            assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:])), "pieces overlap in the outbox"
            assert all(off % ce.ALIGN == 0 and end <= capacity for off, end in spans)
            for p, (_, n) in layout.items():
                assert n > 0
                sent[p] += n
            rounds += 1
            assert rounds < 1000
        assert sent == totals
    with pytest.raises(ce.CopyEngineError, match="cannot hold a piece for each of 3 peers"):
        ce.plan_round({1: 10, 2: 10, 3: 10}, 512)


# -- completion ---------------------------------------------------------------------------------------


def test_control_block_descriptors_acks_and_state():
    words = np.zeros(ce.control_words(3), dtype=np.int64)
    block = ce.ControlBlock(words, 3)
    block.init(rank=1, generation=4)
    block.check(1, 4)
    with pytest.raises(ce.CopyEngineError, match="control block of rank 2 generation 4: .* rank 1"):
        block.check(2, 4)
    assert block.descriptor(2).seq == 0 and block.acked(0) == 0
    d = ce.Descriptor(seq=1, offset=256, nbytes=100, stream_offset=0, stream_total=300, stream_no=1)
    block.publish(2, d)
    assert block.descriptor(2) == d and block.descriptor(0).seq == 0
    block.ack(0, 7)
    assert block.acked(0) == 7 and block.acked(2) == 0
    assert block.state == ce.STATE_LIVE
    block.mark_aborted()
    assert block.state == ce.STATE_ABORTED


def test_a_descriptor_is_published_fields_first_and_its_sequence_number_last():
    """A receiver polls the sequence number and then reads the fields: at the barrier between
    the writer's two stores, the fields must be there and the sequence number not yet (else a
    receiver on another core can take a new number with the previous piece's offset and size)."""
    words = np.zeros(ce.control_words(3), dtype=np.int64)
    at_fence: list[np.ndarray] = []
    block = ce.ControlBlock(words, 3, fence=lambda: at_fence.append(words.copy()))
    block.init(rank=1, generation=4)
    at_fence.clear()
    d = ce.Descriptor(seq=1, offset=256, nbytes=100, stream_offset=0, stream_total=300, stream_no=1)
    block.publish(2, d)
    assert len(at_fence) == 1
    assert ce.ControlBlock(at_fence[0], 3).descriptor(2) == ce.Descriptor(0, 256, 100, 0, 300, 1)
    assert block.descriptor(2) == d


def test_a_receiver_takes_the_next_piece_and_refuses_anything_else():
    stream = ce.ReceiveStream(peer=0, sizes=[100, 200], stream_no=2, next_seq=5)
    piece = ce.Descriptor(seq=5, offset=0, nbytes=120, stream_offset=0, stream_total=300, stream_no=2)
    assert not stream.accept(ce.Descriptor(4, 0, 50, 250, 300, 1), me=1)  # the previous piece: not yet published
    assert stream.accept(piece, me=1)
    with pytest.raises(ce.CopyEngineError, match="piece 6 published, expected 5"):
        stream.accept(ce.Descriptor(6, 0, 10, 0, 300, 2), me=1)
    with pytest.raises(ce.CopyEngineError, match="stream 2 has 299 bytes, this rank expects stream 2 of 300"):
        stream.accept(ce.Descriptor(5, 0, 10, 0, 299, 2), me=1)
    with pytest.raises(ce.CopyEngineError, match=r"bytes \[10, 20\), expected one starting at 0"):
        stream.accept(ce.Descriptor(5, 0, 10, 10, 300, 2), me=1)


# -- two real processes -----------------------------------------------------------------------------


def plan_rows() -> np.ndarray:
    """Layer 1: experts swap between the ranks, and a replica moves (as in test_staging_pipeline)."""
    rows = initial_phy2log(SHAPE)[[1]].copy()
    rows[0, 0], rows[0, 4] = 4, 0
    rows[0, 7] = 2
    return rows


def pattern(src: int, dst: int, index: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(src * 1000 + dst * 100 + index)
    return torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)


RAW_SIZES = [1000, 0, 7000, 33, 5000]  # more than the 4 KiB outbox: several rounds, pieces across ops


def _comm(port: int, generation: int) -> protocol.CommInit:
    return protocol.CommInit(generation=generation, store_host="127.0.0.1", store_port=port, world_size=2)


def _stage_and_exchange(rank: int, port: int) -> dict:
    transport = CopyEngineTransport(HostMemoryMover(), window_bytes=4096, host="one-host")
    transport.connect(_comm(port, 1), rank, 20)
    leftovers = glob.glob(os.path.join(shared_dir(), f"eplb-ce-{os.getpid()}-*"))
    peer = 1 - rank
    # Raw ops of odd sizes, in both directions at once.
    incoming = [torch.zeros(n, dtype=torch.uint8) for n in RAW_SIZES]
    ops = [P2POp(True, pattern(rank, peer, i, n), peer, 0) for i, n in enumerate(RAW_SIZES)]
    ops += [P2POp(False, t, peer, 0) for t in incoming]
    transport.start_batch()
    transport.exchange(ops)
    transport.synchronize()
    raw_pieces = transport.pieces_total
    raw_ok = all(torch.equal(t, pattern(peer, rank, i, n)) for i, (t, n) in enumerate(zip(incoming, RAW_SIZES)))
    # A real plan through the staging pipeline, one op per chunk.
    rows = plan_rows()
    model = make_model(rank, SHAPE)
    plan = protocol.Plan(plan_id=7, base_epoch=0, layers=[1], phy2log=protocol.NDArray.from_numpy(rows))
    pipeline = StagingPipeline(model, transport, rank, None, collections.Counter())
    staged = pipeline.stage(plan, rows, initial_phy2log(SHAPE), protocol.AgentConfig(max_ops_per_group=1), lambda: None)
    spr = SHAPE.slots_per_rank
    bad_rows = [
        row.index
        for row in staged.area.work.staging
        if int(rows[0, rank * spr + row.dst_row]) != row.expert
        or not torch.all(staged.area.rows[0][row.index] == expert_row_value(1, row.expert))
        or not torch.all(staged.area.rows[1][row.index] == 2 * expert_row_value(1, row.expert))
    ]
    vector = vote_vector(100 + rank, 0, 7, staged.digests)
    reduced = transport.max_reduce(vector)
    result = {
        "leftovers": leftovers,
        "raw_ok": raw_ok,
        "staging_rows": len(staged.area.work.staging),
        "bad_rows": bad_rows,
        "live_untouched": rows_match_maps(model),
        "received_bytes": staged.received_bytes,
        "digests": staged.digests,
        "reduced": reduced,
        "raw_pieces": raw_pieces,
    }
    transport.abort()
    # Rebuilt with a new generation: sequence numbers start over, the old outbox is freed.
    transport.connect(_comm(port, 2), rank, 20)
    back = torch.zeros(300, dtype=torch.uint8)
    transport.exchange([P2POp(True, pattern(rank, peer, 9, 300), peer, 0), P2POp(False, back, peer, 0)])
    result["rebuilt_ok"] = torch.equal(back, pattern(peer, rank, 9, 300))
    transport.close()
    result["after_close"] = glob.glob(os.path.join(shared_dir(), f"eplb-ce-{os.getpid()}-*"))
    return result


def _wait_for_bytes_from_rank_1(transport: CopyEngineTransport) -> dict:
    """Rank 0's side of the peer-failure scenarios: receive 100 bytes rank 1 never sends."""
    t0 = time.monotonic()
    try:
        transport.exchange([P2POp(False, torch.zeros(100, dtype=torch.uint8), 1, 0)])
    except TransportError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t0}
    return {"error": None}


def _peer_aborts(rank: int, port: int) -> dict:
    transport = CopyEngineTransport(HostMemoryMover(), window_bytes=4096, host="one-host")
    transport.connect(_comm(port, 1), rank, 10)
    if rank == 1:
        transport.abort()  # mid-plan: rank 0 is waiting for bytes that will never come
        time.sleep(3)
        return {}
    return _wait_for_bytes_from_rank_1(transport)


def _peer_vanishes(rank: int, port: int) -> dict:
    transport = CopyEngineTransport(HostMemoryMover(), window_bytes=4096, host="one-host")
    transport.connect(_comm(port, 1), rank, 10)
    if rank == 1:
        os._exit(0)  # no abort, no goodbye
    return _wait_for_bytes_from_rank_1(transport)


def _peer_silent(rank: int, port: int) -> dict:
    transport = CopyEngineTransport(HostMemoryMover(), window_bytes=4096, host="one-host")
    transport.connect(_comm(port, 1), rank, 2)
    if rank == 1:
        time.sleep(4)  # alive, connected, never sends
        return {}
    return _wait_for_bytes_from_rank_1(transport)


def _selection(rank: int, port: int) -> dict:
    # Different hosts: auto falls back to the other transport for the whole generation.
    auto = SelectingTransport(
        CopyEngineTransport(HostMemoryMover(), window_bytes=4096, mode="auto", host=f"host-{rank}"), GlooTransport()
    )
    auto.connect(_comm(port, 1), rank, 10)
    peer = 1 - rank
    back = torch.zeros(64, dtype=torch.uint8)
    auto.exchange([P2POp(True, pattern(rank, peer, 0, 64), peer, 0), P2POp(False, back, peer, 0)])
    out = {"auto_name": auto.name, "auto_ok": torch.equal(back, pattern(peer, rank, 0, 64))}
    auto.abort()
    forced = CopyEngineTransport(HostMemoryMover(), window_bytes=4096, host=f"host-{rank}")
    try:
        forced.connect(_comm(port, 2), rank, 10)
        out["forced_error"] = None
    except TransportError as exc:
        out["forced_error"] = str(exc)
    one_host = SelectingTransport(
        CopyEngineTransport(HostMemoryMover(), window_bytes=4096, mode="auto", host="same"), GlooTransport()
    )
    one_host.connect(_comm(port, 3), rank, 10)
    out["one_host_name"] = one_host.name
    one_host.abort()
    # One rank cannot set its outbox up (no shared memory here): auto falls back on every rank.
    mover = HostMemoryMover() if rank == 0 else _NoWindowMover()
    degraded = SelectingTransport(
        CopyEngineTransport(mover, window_bytes=4096, mode="auto", host="same"), GlooTransport()
    )
    degraded.connect(_comm(port, 4), rank, 10)
    out["degraded_name"] = degraded.name
    degraded.abort()
    return out


class _NoWindowMover(HostMemoryMover):
    def create_window(self, nbytes: int):
        raise OSError("no space left on /dev/shm")


SCENARIOS = {
    "stage": _stage_and_exchange,
    "abort": _peer_aborts,
    "vanish": _peer_vanishes,
    "silent": _peer_silent,
    "select": _selection,
}


def _child(scenario: str, rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    put_result_and_exit(queue, rank, lambda: SCENARIOS[scenario](rank, port))


def run_pair(scenario: str, timeout_s: float = 90) -> dict[int, dict]:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    queue = CTX.Queue()
    procs = [CTX.Process(target=_child, args=(scenario, r, port, queue), name=f"ce-{scenario}-{r}") for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = gather_results(
            queue,
            procs,
            timeout_s,
            join_s=10,
            # Rank 1 of "vanish" exits without a result: rank 0's is all there is to wait for.
            done_early=lambda got: scenario == "vanish" and len(got) == 1 and procs[1].exitcode is not None,
        )
    finally:
        del store
    for rank, result in results.items():
        assert "exception" not in result, f"rank {rank}:\n{result['exception']}"
    return results


def test_two_processes_stage_a_plan_through_copy_engines():
    results = run_pair("stage")
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert r["leftovers"] == [], f"rank {rank}: shared-memory names left after the rendezvous"
        assert r["raw_ok"], f"rank {rank}: raw ops arrived wrong"
        assert r["staging_rows"] > 0 and r["bad_rows"] == [], (rank, r["bad_rows"])
        assert r["live_untouched"], f"rank {rank}: staging touched a live row"
        assert r["received_bytes"] > 0
        assert r["raw_pieces"] == -(-sum(RAW_SIZES) // 4096), "the raw ops fill the 4 KiB outbox round after round"
        assert r["rebuilt_ok"] and r["after_close"] == []
    # Every remote op has a digest on both sides, and they agree once reduced as the vote reduces them.
    d0, d1 = results[0]["digests"], results[1]["digests"]
    assert np.all((d0 != NO_DIGEST) & (d1 != NO_DIGEST))
    assert np.array_equal(d0, d1)
    reduced = results[0]["reduced"]
    assert np.array_equal(reduced, results[1]["reduced"])
    assert corrupt_ops(reduced) == []
    assert proposal_from(reduced, plan_id=7, rank=0).commit


def test_a_peer_that_aborts_fails_the_exchange_at_once():
    results = run_pair("abort")
    error = results[0]["error"]
    assert error and "rank 1 tore its copy-engine side communicator down" in error
    assert results[0]["seconds"] < 5, "an aborted peer must be seen before the timeout"


def test_a_peer_that_exits_without_aborting_fails_the_exchange_at_once():
    results = run_pair("vanish")
    error = results[0]["error"]
    assert error and "rank 1 (pid" in error and "exited during a copy-engine exchange" in error
    assert results[0]["seconds"] < 5, "a dead peer must be seen before the timeout"


def test_a_silent_peer_fails_the_exchange_at_the_timeout():
    results = run_pair("silent")
    error = results[0]["error"]
    assert error and "stalled for 2" in error and "from rank 1: 0/100 bytes" in error


def test_process_liveness_sees_an_exited_unreaped_child():
    assert ce.process_alive(os.getpid())
    assert ce.pid_namespace() == ce.pid_namespace()
    child = CTX.Process(target=time.sleep, args=(0,))
    child.start()
    deadline = time.monotonic() + 30
    while ce.process_alive(child.pid) and time.monotonic() < deadline:  # exits, stays a zombie until joined
        time.sleep(0.05)
    assert not ce.process_alive(child.pid)
    child.join()
    assert not ce.process_alive(child.pid)


def test_auto_falls_back_per_deployment_and_a_forced_copy_engine_names_the_pair():
    results = run_pair("select")
    for rank, r in results.items():
        assert r["auto_name"] == "auto:gloo" and r["auto_ok"], (rank, r)
        assert r["forced_error"] and "cannot use peer copies" in r["forced_error"] and "0-1" in r["forced_error"]
        assert r["one_host_name"] == "auto:copy-engine"
        assert r["degraded_name"] == "auto:gloo"


# -- completion order, with copies that land late -----------------------------------------------------


class _LateCopies(HostMemoryMover):
    """The host mover with a device's timing: a copy is only queued on this rank's stream, and
    lands when :class:`_Device` runs it, in stream order; ``mark``/``done`` see what has landed.
    A rank that publishes, acknowledges or refills its outbox before its own copy landed then
    races its peers' copies, as on a GPU (on the plain host mover every copy lands at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.landed = 0

    def fill(self, window, offset, src, src_offset, nbytes) -> None:
        self._enqueue(lambda: HostMemoryMover.fill(self, window, offset, src, src_offset, nbytes))

    def pull(self, dst, dst_offset, window, offset, nbytes) -> None:
        self._enqueue(lambda: HostMemoryMover.pull(self, dst, dst_offset, window, offset, nbytes))

    def _enqueue(self, copy) -> None:
        self.queue.append(copy)
        self.queued += 1

    def mark(self) -> object:
        return self.queued

    def done(self, marker: object) -> bool:
        return marker is None or self.landed >= int(marker)  # type: ignore[call-overload]


class _Device(threading.Thread):
    """Runs the ranks' queued copies, each rank's in order, the ranks in a seeded random order."""

    def __init__(self, movers: list[_LateCopies], seed: int) -> None:
        super().__init__(daemon=True)
        self.movers, self.rng, self.stop = movers, np.random.default_rng(seed), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            busy = [m for m in self.movers if m.queue]
            if not busy:
                time.sleep(0.0002)
                continue
            mover = busy[int(self.rng.integers(len(busy)))]
            mover.queue.popleft()()
            mover.landed += 1
            time.sleep(float(self.rng.random()) * 0.0005)


def test_every_byte_lands_when_copies_complete_late_and_out_of_step_across_ranks():
    """Three ranks in one process each send the two others streams larger than the outbox
    (several rounds), while every copy lands late and the ranks' copies interleave at random.

    The exchange must publish a piece only once its fill into the outbox has landed, acknowledge
    it only once the pull out of it has landed, and refill the outbox only once every receiver of
    the round has acknowledged: otherwise a receiver reads bytes not yet written, or overwritten
    by the next round, and the streams arrive corrupted.
    """
    world, sizes = 3, [3000, 0, 5000, 700]
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, world, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False
    )
    movers = [_LateCopies() for _ in range(world)]
    transports = [CopyEngineTransport(m, window_bytes=4096, host="one-host") for m in movers]
    device = _Device(movers, seed=11)
    device.start()
    comm = protocol.CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=world)
    received: dict[tuple[int, int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            transports[rank].connect(comm, rank, 20)
            for exchange in range(2):
                ops = []
                for peer in range(world):
                    if peer == rank:
                        continue
                    for i, n in enumerate(sizes):
                        ops.append(P2POp(True, pattern(rank, peer, 10 * exchange + i, n), peer, 0))
                        into = received[(peer, rank, 10 * exchange + i)] = torch.zeros(n, dtype=torch.uint8)
                        ops.append(P2POp(False, into, peer, 0))
                transports[rank].exchange(ops)
            transports[rank].synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        device.stop.set()
        for t in transports:
            t.close()
        del store
    assert not errors, errors
    assert len(received) == world * (world - 1) * 2 * len(sizes)
    wrong = [key for key, got in received.items() if not torch.equal(got, pattern(*key, got.numel()))]
    assert not wrong, f"corrupted streams (sender, receiver, op): {wrong}"
    assert sum(m.landed for m in movers) > 40, "the streams must move in many pieces"
