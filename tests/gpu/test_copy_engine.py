"""The copy-engine side transport on real GPUs: CUDA IPC windows, ``cudaMemcpyAsync`` pulls.

Two processes share one GPU (CUDA IPC works between processes on one device), and, when
two GPUs with peer access are present, each process gets its own. Each pair:

- pushes ops of odd sizes, larger than the outbox (several rounds, pieces that cross
  op boundaries), both directions at once, the first send tensor written by the serving
  stream behind a long sleep just before (the session fence must order the copy after it);
- stages a real plan through the staging pipeline (several chunks, records larger than
  the outbox), checks every incoming expert row on the device, and the digests the vote
  compares (sender's against receiver's, through the vote's own MAX all-reduce);
- tears the generation down and rebuilds the next one (IPC handles closed and reopened),
  and moves bytes again.

Skipped without CuPy or CUDA. On the device: ``python -m pytest -q tests/gpu/test_copy_engine.py``.
"""

from __future__ import annotations

import collections
import datetime
import multiprocessing as mp
import socket
import time

import numpy as np
import pytest
from child_results import gather_results, put_result_and_exit

pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

pytestmark = pytest.mark.gpu

CTX = mp.get_context("spawn")
WINDOW = 1 << 20
RAW_SIZES = [3 << 20, 0, 12345, 1 << 20, 77]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pattern(src: int, dst: int, index: int, nbytes: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(src * 1000 + dst * 100 + index)
    return torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).to(device)


def _value(layer: int, expert: int) -> float:
    return float(layer * 1000 + expert)


def _small(value: float, device) -> torch.Tensor:
    """``value`` as the small tensor stores it (bfloat16 rounds 2 * 1005 to 2016)."""
    return torch.tensor(value, dtype=torch.bfloat16, device=device)


def _model(rank: int, device):
    """Two layers, 6 logical / 8 physical experts on 2 ranks; rows of ~1 MiB + 4 KiB."""
    from eplb_service.placement import PlacementShape, initial_phy2log
    from eplb_service.worker_agent.expert_model import ExpertModel, map_tensors

    shape = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)
    phy2log = initial_phy2log(shape)
    spr = shape.slots_per_rank
    weights = []
    for layer in range(shape.num_layers):
        values = torch.tensor([_value(layer, int(e)) for e in phy2log[layer, rank * spr : (rank + 1) * spr]])
        big = values[:, None].repeat(1, 1 << 18).contiguous().to(device)  # 1 MiB of float32 per row
        small = torch.stack([_small(2 * float(v), "cpu").repeat(1024) for v in values]).to(device)
        weights.append([big, small])
    p2l, l2p, cnt = map_tensors(phy2log, shape.num_logical, shape.num_redundant + 1, device)
    model = ExpertModel(expert_weights=weights, phy2log=p2l, log2phy=l2p, logcnt=cnt, rank=rank, num_ranks=2)
    return model, shape, phy2log


def _run(rank: int, devices: list[int], port: int) -> dict:
    from eplb_service import protocol
    from eplb_service.worker_agent.commit_vote import vote_vector
    from eplb_service.worker_agent.memory_mover import CudaIpcMover
    from eplb_service.worker_agent.staging_pipeline import StagingPipeline
    from eplb_service.worker_agent.transport import P2POp
    from eplb_service.worker_agent.transport_copy_engine import CopyEngineTransport

    device = torch.device("cuda", devices[rank])
    torch.cuda.set_device(device)
    peer = 1 - rank
    out: dict = {}

    def comm(generation: int) -> protocol.CommInit:
        return protocol.CommInit(generation=generation, store_host="127.0.0.1", store_port=port, world_size=2)

    # The serving stream is this thread's current stream when the mover is built.
    transport = CopyEngineTransport(CudaIpcMover(device), window_bytes=WINDOW)
    transport.connect(comm(1), rank, 30)

    # 1. Raw ops, both directions, the first one written by the serving stream just before.
    sends = [_pattern(rank, peer, i, n, device) for i, n in enumerate(RAW_SIZES)]
    late = sends[0].clone()
    sends[0].zero_()
    incoming = [torch.zeros(n, dtype=torch.uint8, device=device) for n in RAW_SIZES]
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms on the serving stream, then the write the copy must see
    sends[0].copy_(late)
    transport.start_batch()
    ops = [P2POp(True, t, peer, 0) for t in sends] + [P2POp(False, t, peer, 0) for t in incoming]
    t0 = time.monotonic()
    transport.exchange(ops)
    transport.synchronize()
    out["raw_s"] = time.monotonic() - t0
    out["raw_ok"] = [
        bool(torch.equal(t, _pattern(peer, rank, i, n, device))) for i, (t, n) in enumerate(zip(incoming, RAW_SIZES))
    ]
    out["raw_pieces"] = transport.pieces_total

    # 2. A real plan through the staging pipeline.
    model, shape, phy2log = _model(rank, device)
    rows = phy2log[[1]].copy()
    rows[0, 0], rows[0, 4] = 4, 0  # expert 4 to rank 0, expert 0 to rank 1
    rows[0, 7] = 2  # rank 1's slot 7 takes expert 2 from rank 0
    rows[0, 1], rows[0, 5] = 5, 1  # and another swap, so each direction has two records
    plan = protocol.Plan(plan_id=7, base_epoch=0, layers=[1], phy2log=protocol.NDArray.from_numpy(rows))
    config = protocol.AgentConfig(max_ops_per_group=2, chunk_bytes=2 << 20)
    pipeline = StagingPipeline(model, transport, rank, None, collections.Counter())
    staged = pipeline.stage(plan, rows, phy2log, config, lambda: None)
    spr = shape.slots_per_rank
    bad = []
    for row in staged.area.work.staging:
        expert = int(rows[0, rank * spr + row.dst_row])
        if expert != row.expert:
            bad.append(("schedule", row.index))
        elif not bool((staged.area.rows[0][row.index] == _value(1, expert)).all()):
            bad.append(("big", row.index))
        elif not bool((staged.area.rows[1][row.index] == _small(2 * _value(1, expert), device)).all()):
            bad.append(("small", row.index))
    out["staging_rows"] = len(staged.area.work.staging)
    out["bad_rows"] = bad
    out["received_bytes"] = staged.received_bytes
    out["digests"] = staged.digests
    out["reduced"] = transport.max_reduce(vote_vector(100 + rank, 0, 7, staged.digests))

    # 3. Teardown and the next generation: handles closed, opened again, bytes move again.
    transport.abort()
    transport.connect(comm(2), rank, 30)
    back = torch.zeros(5 << 20, dtype=torch.uint8, device=device)
    transport.exchange([P2POp(True, _pattern(rank, peer, 9, 5 << 20, device), peer, 0), P2POp(False, back, peer, 0)])
    transport.synchronize()
    out["rebuilt_ok"] = bool(torch.equal(back, _pattern(peer, rank, 9, 5 << 20, device)))
    out["reported_keys"] = transport.store_keys(comm(1)) + transport.store_keys(comm(2))
    transport.close()
    return out


def _child(rank: int, devices: list[int], port: int, queue) -> None:
    put_result_and_exit(queue, rank, lambda: _run(rank, devices, port))


def _run_pair(devices: list[int], timeout_s: float = 120) -> dict[int, dict]:
    import torch.distributed as dist

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    queue = CTX.Queue()
    procs = [CTX.Process(target=_child, args=(r, devices, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = gather_results(queue, procs, timeout_s, join_s=20)
        # What rank 0's janitor deletes (store_keys) against what the rendezvous wrote to the store.
        for result in results.values():
            reported = result.get("reported_keys", [])
            result["missing_keys"] = [k for k in reported if not store.check([k])]
            if hasattr(store, "list_keys"):
                prefixes = ("eplb/gen1/", "eplb/gen2/")  # the two generations' CommInit.key_prefix
                result["unreported_keys"] = sorted(
                    k for k in store.list_keys() if k.startswith(prefixes) and k not in set(reported)
                )
    finally:
        del store
    for rank, result in results.items():
        assert "exception" not in result, f"rank {rank}:\n{result['exception']}"
    assert sorted(results) == [0, 1], f"only ranks {sorted(results)} reported within {timeout_s}s"
    return results


def _check(results: dict[int, dict]) -> None:
    from eplb_service.worker_agent.commit_vote import corrupt_ops, proposal_from
    from eplb_service.worker_agent.staging_pipeline import NO_DIGEST

    for rank, r in results.items():
        assert all(r["raw_ok"]), f"rank {rank}: raw ops arrived wrong: {r['raw_ok']} (first one: the fence)"
        assert r["raw_pieces"] >= -(-sum(RAW_SIZES) // WINDOW), "the raw ops should have taken several rounds"
        assert r["staging_rows"] > 0 and r["bad_rows"] == [], (rank, r["bad_rows"])
        assert r["received_bytes"] > 0
        assert r["rebuilt_ok"], f"rank {rank}: the rebuilt generation moved wrong bytes"
        assert r["reported_keys"] and r["missing_keys"] == [], f"rank {rank}: store_keys names unwritten keys"
        assert r.get("unreported_keys", []) == [], f"rank {rank}: keys the janitor would leave: {r['unreported_keys']}"
    d0, d1 = results[0]["digests"], results[1]["digests"]
    assert np.all((d0 != NO_DIGEST) & (d1 != NO_DIGEST)) and np.array_equal(d0, d1)
    reduced = results[0]["reduced"]
    assert np.array_equal(reduced, results[1]["reduced"]) and corrupt_ops(reduced) == []
    assert proposal_from(reduced, plan_id=7, rank=0).commit


def test_two_processes_on_one_gpu():
    _check(_run_pair([0, 0]))


def test_two_processes_on_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPUs 0 and 1 have no peer access")
    _check(_run_pair([0, 1]))
