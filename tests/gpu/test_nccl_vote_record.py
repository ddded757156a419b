"""The NCCL vote with a delayed rank: the decision record, not the all-reduce, decides.

Two processes, one GPU each, build the CuPy NCCL side communicator from a rendezvous store
hosted by rank 0 (as the agents do), arm a vote, and propose to the plan's decision record.
On time, both read ``commit``. When rank 1 joins the all-reduce after rank 0 gave up at its
fence (rank 0 proposes ``abort`` and tears its communicator down), whatever rank 1's
all-reduce does (complete, fail, time out), both read ``abort``.

Skipped without CuPy, CUDA or two GPUs. On the device: ``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs CUDA and at least two GPUs", allow_module_level=True)

pytestmark = pytest.mark.gpu

FENCE_S = 1.0


def vote(rank: int, port_q, out, delay_s: float) -> None:
    import torch

    from eplb_service.protocol import CommInit
    from eplb_service.worker_agent.decision import Decision, StoreDecisionRecord
    from eplb_service.worker_agent.rendezvous import RendezvousHost
    from eplb_service.worker_agent.transport import TransportError
    from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport

    torch.cuda.set_device(rank)
    if rank == 0:
        host = RendezvousHost.start("ipc:///unused", 2, environ={})
        port_q.put(host.port)
        port = host.port
    else:
        port = port_q.get(timeout=60)
    transport = CupyNcclTransport(torch.device("cuda", rank))
    # the connect timeout also bounds the vote's wait
    transport.connect(
        CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=2, nonce="gpu"), rank, 10
    )
    record = StoreDecisionRecord("127.0.0.1", port)
    plan_id = 77
    entry = 100 + rank
    t0 = time.monotonic()
    time.sleep(delay_s)
    gave_up = {"flag": False}

    def fence() -> None:  # rank 0's serving thread gives up after FENCE_S
        if rank == 0 and time.monotonic() - t0 > FENCE_S:
            gave_up["flag"] = True
            raise TransportError("fence_timeout")

    transport.poll_hook = fence
    try:
        result = transport.max_reduce(np.array([entry, 0, plan_id, -plan_id], dtype=np.int64))
        proposal = (
            Decision.commit_at(int(result[0]) + 8, rank) if int(result[1]) == 0 else Decision.abort(rank, "not ok")
        )
        how = "completed"
    except TransportError as exc:
        transport.abort()
        proposal = Decision.abort(rank, f"vote: {exc}")
        how = f"failed: {exc}"
    decision = record.propose(plan_id, proposal)
    out.put(
        {
            "rank": rank,
            "how": how,
            "gave_up": gave_up["flag"],
            "commit": decision.commit,
            "commit_step": decision.commit_step,
            "first": decision.rank,
        }
    )
    time.sleep(1.0 if rank == 0 else 0.0)  # rank 0 hosts the store: outlive the other's last read


def run(delays: tuple[float, float]) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=vote, args=(r, port_q, out, delays[r])) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        r = out.get(timeout=120)
        results[r["rank"]] = r
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return results


def test_on_time_both_ranks_read_commit():
    results = run((0.0, 0.0))
    assert all(r["commit"] for r in results.values()), results
    assert results[0]["commit_step"] == results[1]["commit_step"] == 101 + 8


def test_a_rank_joining_after_the_others_gave_up_reads_abort_like_them():
    results = run((0.0, FENCE_S + 1.5))
    assert results[0]["gave_up"], results
    assert not results[0]["commit"] and not results[1]["commit"], results
    assert results[0]["first"] == results[1]["first"] == 0, results
