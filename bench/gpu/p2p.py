"""The side communicator on real GPUs: correctness, abort and rebuild, peer-to-peer peak.

    python -m bench.gpu.p2p --world 4 --out p2p.json [--size-mib 256] [--iters 8] [--quick]

One process per GPU, each with a :class:`CupyNcclTransport` bootstrapped exactly as the
agents do (a TCPStore hosted here plays the coordinator's rendezvous). Checks:

- ``exchange``: every rank sends every other rank random bytes of several sizes in one
  group; every received byte is compared with the expected pattern;
- ``fence``: a copy on the side stream issued after the serving stream queued a slow write
  sees the write (the session fence), with no host synchronisation;
- ``vote``: the MAX all-reduce;
- ``abort``: rank 0 posts a receive nobody matches; the bounded wait must fail with
  ``TransportError``, ``ncclCommAbort`` must free the stream, and the communicator of the
  next generation must move bytes correctly again.

Then the peak: one pair (0 -> 1), a ring (every rank sends to the next and receives from
the previous at once), all-pairs, and the ring cut into chunks of several sizes (one NCCL
group per chunk, as the agent streams). Rates are GB/s per GPU in one direction.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.protocol import CommInit
from eplb_service.sim.processes import RankProcesses, RankProcessesDied, free_port
from eplb_service.worker_agent.transport import P2POp, RecordLayout, TransportError


def _pattern(src: int, dst: int, nbytes: int, salt: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed((src * 1009 + dst) * 100_003 + nbytes * 7 + salt)
    return torch.randint(0, 256, (nbytes,), generator=gen, device=device, dtype=torch.uint8)


def check_exchange(t, rank: int, world: int, salt: int, sizes=(1, 4097, (3 << 20) + 5)) -> dict:
    device = t.device
    bad = 0
    for nbytes in sizes:
        sends = {p: _pattern(rank, p, nbytes, salt, device) for p in range(world) if p != rank}
        recvs = {p: torch.zeros(nbytes, dtype=torch.uint8, device=device) for p in range(world) if p != rank}
        ops = []
        for peer in sorted(sends):
            ops.append(P2POp(True, sends[peer], peer, 0))
            ops.append(P2POp(False, recvs[peer], peer, 0))
        t.exchange(ops)
        t.synchronize()
        for peer, got in recvs.items():
            if not torch.equal(got, _pattern(peer, rank, nbytes, salt, device)):
                bad += 1
    # expert-shaped bf16 rows, the agent's case: row views of a contiguous [rows, 2I, H] tensor
    rows = torch.arange(6 * 64 * 32, device=device, dtype=torch.float32).reshape(6, 64, 32).to(torch.bfloat16) + rank
    got = torch.zeros_like(rows)
    ops = []
    for i in range(6):
        ops.append(P2POp(True, rows[i], (rank + 1) % world, i))
        ops.append(P2POp(False, got[i], (rank - 1) % world, i))
    t.exchange(ops)
    t.synchronize()
    expected = (
        torch.arange(6 * 64 * 32, device=device, dtype=torch.float32).reshape(6, 64, 32).to(torch.bfloat16)
        + (rank - 1) % world
    )
    if not torch.equal(got, expected):
        bad += 1
    return {"ok": bad == 0, "bad_buffers": bad}


def check_fence(t) -> dict:
    """The side stream must see a write the serving stream queued behind a slow kernel."""
    device = t.device
    src = torch.ones(1 << 20, dtype=torch.int32, device=device)
    dst = torch.zeros_like(src)
    unfenced = torch.zeros_like(src)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on the serving (current) stream
    src.fill_(7)
    with torch.cuda.stream(t.stream):  # control: the side stream alone does not wait
        unfenced.copy_(src)
    t.copy_local(dst, src)
    t.synchronize()
    return {"ok": bool((dst == 7).all().item()), "unfenced_copy_saw_old_value": bool((unfenced == 1).all().item())}


def check_vote(t, rank: int, world: int) -> dict:
    got = t.max_reduce(np.array([rank, -rank, 5, 3 * rank], dtype=np.int64))
    return {"ok": got.tolist() == [world - 1, 0, 5, 3 * (world - 1)], "got": got.tolist()}


def _barrier(t) -> None:
    t.max_reduce(np.zeros(1, dtype=np.int64))


def _timed(t, issue, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        issue()
    t.synchronize()
    _barrier(t)
    t0 = time.perf_counter()
    for _ in range(iters):
        issue()
    t.synchronize()
    return time.perf_counter() - t0


def bench(t, rank: int, world: int, size: int, iters: int, chunks_mib: list[int]) -> dict:
    device = t.device
    send = torch.empty(size, dtype=torch.uint8, device=device).fill_(rank)
    recv = torch.empty(size, dtype=torch.uint8, device=device)
    out: dict = {}
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    # one pair, one direction
    if rank == 0:
        pair_ops = [P2POp(True, send, 1, 0)]
    elif rank == 1:
        pair_ops = [P2POp(False, recv, 0, 0)]
    else:
        pair_ops = []
    elapsed = _timed(t, lambda: t.exchange(pair_ops), iters)
    out["pair_gbps"] = size * iters / elapsed / 1e9 if rank in (0, 1) else None
    _barrier(t)
    ring = [P2POp(True, send, nxt, 0), P2POp(False, recv, prv, 0)]
    out["ring_gbps"] = size * iters / _timed(t, lambda: t.exchange(ring), iters) / 1e9
    _barrier(t)
    if world > 2:
        part = size // (world - 1)
        peers = [p for p in range(world) if p != rank]
        a2a = [P2POp(True, send[i * part : (i + 1) * part], peer, 0) for i, peer in enumerate(peers)]
        a2a += [P2POp(False, recv[i * part : (i + 1) * part], peer, 0) for i, peer in enumerate(peers)]
        out["all_pairs_gbps"] = part * (world - 1) * iters / _timed(t, lambda: t.exchange(a2a), iters) / 1e9
        _barrier(t)
    out["agent_pattern_gbps"] = agent_pattern(t, rank, world, iters)
    _barrier(t)
    out["paced_ring"] = paced_ring(t, rank, world)
    _barrier(t)
    out["chunked_ring_gbps"] = {}
    for chunk_mib in chunks_mib:
        chunk = chunk_mib << 20
        count = max(1, size // chunk)

        def issue(count=count, chunk=chunk):
            for i in range(count):
                t.exchange(
                    [
                        P2POp(True, send[i * chunk : (i + 1) * chunk], nxt, 0),
                        P2POp(False, recv[i * chunk : (i + 1) * chunk], prv, 0),
                    ]
                )

        out["chunked_ring_gbps"][str(chunk_mib)] = chunk * count * iters / _timed(t, issue, iters) / 1e9
        _barrier(t)
    return out


def agent_pattern(t, rank: int, world: int, iters: int, experts: int = 8) -> dict:
    """Groups shaped like the agent's: ``experts`` Qwen-sized rows (16 MiB w13 + 8 MiB w2) from
    scattered live slots to the next rank, into staging rows; as separate ops, packed per
    peer, and as one pre-packed op per direction (the bound). GB/s per GPU, one direction."""
    device = t.device
    w13 = torch.empty((3 * experts, 16 << 20), dtype=torch.uint8, device=device).fill_(rank)
    w2 = torch.empty((3 * experts, 8 << 20), dtype=torch.uint8, device=device).fill_(rank)
    s13 = torch.empty((experts, 16 << 20), dtype=torch.uint8, device=device)
    s2 = torch.empty((experts, 8 << 20), dtype=torch.uint8, device=device)
    flat_send = torch.empty(experts * (24 << 20), dtype=torch.uint8, device=device)
    flat_recv = torch.empty_like(flat_send)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    rows = [3 * i + 1 for i in range(experts)]
    ops = []
    for i, row in enumerate(rows):
        ops += [P2POp(True, w13[row], nxt, 2 * i), P2POp(True, w2[row], nxt, 2 * i + 1)]
    for i in range(experts):
        ops += [P2POp(False, s13[i], prv, 2 * i), P2POp(False, s2[i], prv, 2 * i + 1)]
    nbytes = experts * (24 << 20) * iters
    out = {}
    saved = t.pack_per_peer
    try:
        t.pack_per_peer = False
        out["separate_ops"] = nbytes / _timed(t, lambda: t.exchange(ops), iters) / 1e9
        _barrier(t)
        s13.zero_()
        s2.zero_()
        t.pack_per_peer = True
        out["packed_per_peer"] = nbytes / _timed(t, lambda: t.exchange(ops), iters) / 1e9
        ok = bool((s13 == prv).all().item()) and bool((s2 == prv).all().item())
        out["packed_per_peer_correct"] = ok
        _barrier(t)
        t.pack_per_peer = False
        one = [P2POp(True, flat_send, nxt, 0), P2POp(False, flat_recv, prv, 0)]
        out["one_op_bound"] = nbytes / _timed(t, lambda: t.exchange(one), iters) / 1e9
        _barrier(t)
        # the agent's path: senders gather their experts' records (w13 row | w2 row) on the
        # pack stream, overlapping the group in flight; receivers write straight into staging
        layout = RecordLayout.of([w13, w2])
        staging = torch.zeros((experts, layout.record_bytes), dtype=torch.uint8, device=device)

        def blocks():
            packed = t.gather([[w13[row], w2[row]] for row in rows], layout)
            t.exchange([P2POp(True, packed, nxt, 0), P2POp(False, staging, prv, 0)])

        out["blocks"] = nbytes / _timed(t, blocks, iters) / 1e9
        out["blocks_correct"] = bool((staging == prv).all().item())
    finally:
        t.pack_per_peer = saved
    return out


def paced_ring(t, rank: int, world: int, chunk_mib: int = 48, chunks: int = 8, gap_s: float = 0.002) -> dict:
    """The throttle's device gaps: ``chunks`` ring groups of ``chunk_mib`` with ``gap_s`` after each.

    The elapsed time should be ``chunks * (gap_s + chunk / ring rate)``: the rate the
    throttle holds. Returns the measured GB/s and that expected figure (``expected_gbps``
    uses the unpaced rate measured just before)."""
    device = t.device
    chunk = chunk_mib << 20
    send = torch.empty(chunk * chunks, dtype=torch.uint8, device=device).fill_(rank)
    recv = torch.empty_like(send)
    nxt, prv = (rank + 1) % world, (rank - 1) % world

    def issue(gap):
        for i in range(chunks):
            t.exchange(
                [
                    P2POp(True, send[i * chunk : (i + 1) * chunk], nxt, 0),
                    P2POp(False, recv[i * chunk : (i + 1) * chunk], prv, 0),
                ],
                pace_s=gap,
            )

    unpaced = _timed(t, lambda: issue(0.0), 1)
    _barrier(t)
    paced = _timed(t, lambda: issue(gap_s), 1)
    return {
        "gap_s": gap_s,
        "chunk_mib": chunk_mib,
        "chunks": chunks,
        "unpaced_s": unpaced,
        "paced_s": paced,
        "gbps": chunk * chunks / paced / 1e9,
        "expected_gbps": chunk * chunks / (unpaced + chunks * gap_s) / 1e9,
    }


def side_kernel_ctas(t, ops) -> dict[str, list[int]]:
    """CTAs (grid size) of the NCCL kernels one ``exchange`` of ``ops`` launches, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu.trace_summary import export_trace, kernels_of, short_name

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t.exchange(ops)
        t.synchronize()
    kernels = kernels_of(export_trace(prof))
    out: dict[str, set[int]] = {}
    for k in kernels:
        if "nccl" in k.name.lower():
            out.setdefault(short_name(k.name), set()).add(k.ctas)
    return {name: sorted(v) for name, v in out.items()}


def cta_sweep(
    rank: int, world: int, port: int, device: torch.device, limits: list[int], size: int, iters: int, in_flight: int
) -> list[dict]:
    """Per CTA limit of the side communicator (0 = NCCL's choice): ring and agent-block rates and
    the CTAs its send/recv kernel really got. Each limit is a fresh communicator (generation)."""
    from bench.gpu.packed_transport import PackedPerPeerTransport

    send = torch.empty(size, dtype=torch.uint8, device=device).fill_(rank)
    recv = torch.empty(size, dtype=torch.uint8, device=device)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    ring = [P2POp(True, send, nxt, 0), P2POp(False, recv, prv, 0)]
    rows = []
    for i, limit in enumerate(limits):
        t = PackedPerPeerTransport(device, pack_per_peer=False, max_groups_in_flight=in_flight, max_ctas=limit or None)
        t.connect(CommInit(generation=100 + i, store_host="127.0.0.1", store_port=port, world_size=world), rank, 60)
        try:
            row = {"max_ctas": limit or None}
            row["ctas"] = side_kernel_ctas(t, ring)
            row["ring_gbps"] = size * iters / _timed(t, functools.partial(t.exchange, ring), iters) / 1e9
            _barrier(t)
            row["blocks_gbps"] = agent_pattern(t, rank, world, max(2, iters // 2))["blocks"]
            _barrier(t)
            rows.append(row)
        finally:
            t.abort()
    return rows


def abort_and_rebuild(t, rank: int, world: int, host: str, port: int, timeout_s: float) -> dict:
    """Rank 0 waits on a receive nobody matches; abort must free it; generation 2 must work."""
    out: dict = {}
    store = dist.TCPStore(host, port, world, False, timeout=datetime.timedelta(seconds=60))
    t.wait_timeout_s = timeout_s
    if rank == 0:
        stuck = torch.zeros(1 << 20, dtype=torch.uint8, device=t.device)
        t.exchange([P2POp(False, stuck, 1, 0)])
        t0 = time.perf_counter()
        try:
            t.synchronize()
            out["wait_failed"] = False
        except TransportError as exc:
            out["wait_failed"] = True
            out["error"] = str(exc)[:200]
        out["wait_s"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        t.abort()
        out["abort_s"] = round(time.perf_counter() - t1, 3)
        out["drained"] = t.last_abort_drained
    store.add("abort_test/done", 1)
    while store.add("abort_test/done", 0) < world:
        time.sleep(0.01)
    t.abort()
    t.connect(CommInit(generation=2, store_host=host, store_port=port, world_size=world), rank, 60)
    out["rebuilt_generation"] = t.generation
    out["exchange_after_rebuild"] = check_exchange(t, rank, world, salt=2)
    return out


def _rank(rank: int, world: int, port: int, opts: dict, results) -> None:
    out: dict = {"rank": rank}
    try:
        from bench.gpu.packed_transport import PackedPerPeerTransport

        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        # the product's transport, with packing per peer off but switchable for agent_pattern
        t = PackedPerPeerTransport(
            device, pack_per_peer=False, max_groups_in_flight=opts["in_flight"], max_ctas=opts["max_ctas"]
        )
        t0 = time.perf_counter()
        t.connect(CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=world), rank, 60)
        out["connect_s"] = round(time.perf_counter() - t0, 3)
        out["exchange"] = check_exchange(t, rank, world, salt=1)
        out["fence"] = check_fence(t)
        out["vote"] = check_vote(t, rank, world)
        probe = torch.empty(64 << 20, dtype=torch.uint8, device=device)
        out["side_kernel_ctas"] = side_kernel_ctas(
            t,
            [
                P2POp(True, probe[: 32 << 20], (rank + 1) % world, 0),
                P2POp(False, probe[32 << 20 :], (rank - 1) % world, 0),
            ],
        )
        if not opts["quick"]:
            out["bench"] = bench(t, rank, world, opts["size_mib"] << 20, opts["iters"], opts["chunks_mib"])
        out["abort"] = abort_and_rebuild(t, rank, world, "127.0.0.1", port, opts["abort_timeout_s"])
        t.abort()
        if opts["cta_sweep"] and not opts["quick"]:
            out["cta_sweep"] = cta_sweep(
                rank, world, port, device, opts["cta_sweep"], opts["size_mib"] << 20, opts["iters"], opts["in_flight"]
            )
    except Exception as exc:
        import traceback

        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-2000:]
    results.put(out)


def run_p2p(
    world: int,
    *,
    size_mib: int = 256,
    iters: int = 8,
    chunks_mib=(16, 64, 256),
    quick: bool = False,
    in_flight: int = 2,
    abort_timeout_s: float = 3.0,
    timeout_s: float = 300.0,
    max_ctas: int | None = None,
    cta_sweep_limits: list[int] | None = None,
) -> dict:
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, world, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
    )
    opts = {
        "size_mib": size_mib,
        "iters": iters,
        "chunks_mib": list(chunks_mib),
        "quick": quick,
        "in_flight": in_flight,
        "abort_timeout_s": abort_timeout_s,
        "max_ctas": max_ctas,
        "cta_sweep": list(cta_sweep_limits or []),
    }
    procs = RankProcesses(world, "p2p-rank")
    try:
        procs.start(_rank, lambda r: (r, world, port, opts, procs.results))
        procs.wait_blocking(0.2, timeout_s=timeout_s)
    except (RankProcessesDied, TimeoutError):
        pass  # the ranks that did not report are counted in the summary's errors
    finally:
        procs.stop(join_timeout_s=10)
        del store
    ranks = sorted(procs.collected, key=lambda r: r["rank"])
    return summarize(world, ranks, opts)


def summarize(world: int, ranks: list[dict], opts: dict) -> dict:
    import cupy
    from cupy.cuda import nccl

    ok = lambda key: len(ranks) == world and all(r.get(key, {}).get("ok") for r in ranks)  # noqa: E731
    summary = {
        "world_size": world,
        "device_name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "nccl": nccl.get_version(),
        "options": opts,
        "errors": [f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r]
        + ([] if len(ranks) == world else [f"{world - len(ranks)} ranks did not report"]),
        "exchange_ok": ok("exchange"),
        "fence_ok": ok("fence"),
        "vote_ok": ok("vote"),
        "connect_s": max((r.get("connect_s", 0) for r in ranks), default=None),
        "side_kernel_ctas": sorted({c for r in ranks for v in r.get("side_kernel_ctas", {}).values() for c in v}),
        "ranks": ranks,
    }
    aborts = [r.get("abort", {}) for r in ranks]
    summary["abort_ok"] = bool(
        aborts
        and aborts[0].get("wait_failed")
        and aborts[0].get("drained")
        and all(a.get("exchange_after_rebuild", {}).get("ok") for a in aborts)
    )
    benches = [r["bench"] for r in ranks if "bench" in r]
    if len(benches) == world:
        summary["pair_gbps"] = min(b["pair_gbps"] for b in benches[:2])
        summary["ring_gbps_min"] = min(b["ring_gbps"] for b in benches)
        summary["ring_gbps_mean"] = float(np.mean([b["ring_gbps"] for b in benches]))
        if world > 2:
            summary["all_pairs_gbps_mean"] = float(np.mean([b["all_pairs_gbps"] for b in benches]))
        summary["chunked_ring_gbps_mean"] = {
            c: float(np.mean([b["chunked_ring_gbps"][c] for b in benches])) for c in benches[0]["chunked_ring_gbps"]
        }
        summary["agent_pattern_gbps_mean"] = {
            k: float(np.mean([b["agent_pattern_gbps"][k] for b in benches]))
            for k in ("separate_ops", "packed_per_peer", "one_op_bound", "blocks")
        }
        summary["agent_pattern_packed_correct"] = all(
            b["agent_pattern_gbps"]["packed_per_peer_correct"] for b in benches
        )
        summary["agent_pattern_blocks_correct"] = all(b["agent_pattern_gbps"]["blocks_correct"] for b in benches)
        summary["paced_ring"] = {
            k: float(np.mean([b["paced_ring"][k] for b in benches])) for k in benches[0]["paced_ring"]
        }
        summary["peak_both_ways_gbps"] = summary["ring_gbps_mean"]
        ap = summary["agent_pattern_gbps_mean"]
        summary["recommend_pack_per_peer"] = bool(
            summary["agent_pattern_packed_correct"] and ap["packed_per_peer"] > 1.1 * ap["separate_ops"]
        )
        summary["peak_gbps"] = max(
            [summary["pair_gbps"], summary["ring_gbps_mean"], *summary["chunked_ring_gbps_mean"].values()]
        )
    sweeps = [r.get("cta_sweep") for r in ranks]
    if sweeps and all(sweeps):
        summary["cta_sweep"] = [
            {
                "max_ctas": row["max_ctas"],
                "ctas": row["ctas"],
                "ring_gbps_mean": float(np.mean([s[i]["ring_gbps"] for s in sweeps])),
                "blocks_gbps_mean": float(np.mean([s[i]["blocks_gbps"] for s in sweeps])),
            }
            for i, row in enumerate(sweeps[0])
        ]
    summary["ok"] = (
        not summary["errors"]
        and summary.get("agent_pattern_blocks_correct", True)
        and summary["exchange_ok"]
        and summary["fence_ok"]
        and summary["vote_ok"]
        and summary["abort_ok"]
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.p2p", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 2)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--chunks-mib", default="16,64,256")
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="correctness and abort only")
    p.add_argument("--max-ctas", type=int, default=None, help="CTA limit of the side communicator (default: NCCL's)")
    p.add_argument(
        "--cta-sweep", default="", help="comma-separated CTA limits to measure after the main run (0 = NCCL's choice)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    summary = run_p2p(
        args.world,
        size_mib=args.size_mib,
        iters=args.iters,
        chunks_mib=[int(c) for c in args.chunks_mib.split(",") if c],
        quick=args.quick,
        in_flight=args.in_flight,
        max_ctas=args.max_ctas,
        cta_sweep_limits=[int(c) for c in args.cta_sweep.split(",") if c.strip()],
    )
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    brief = {k: v for k, v in summary.items() if k != "ranks"}
    print(json.dumps(brief, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
