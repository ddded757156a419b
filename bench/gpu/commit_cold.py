"""The first commit of a process: host time on the serving thread, with and without the agent's
kernel warm-up (``staging.warm_commit_kernels``).

    python -m bench.gpu.commit_cold [--reps 5] [--device cuda]

Each sample is a fresh process (a fresh CUDA context: nothing loaded yet), alternating the two
modes so the machine's drift hits both alike. In a process: rank 0's model of
``bench/serving_hooks.py`` (60 layers, 544 slots on 8 ranks, bf16 rows), a 1-layer commit
prepared as the agent prepares it, then, in mode ``warm``, the warm-up the agent runs when it
arms a commit; then the first commit and 200 more, each timed on the host from the step
boundary until ``before_step`` returns (the device idle before and after). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def child(mode: str, device_name: str) -> dict:
    from bench.serving_hooks import build_model, commit_now, one_layer_commit
    from eplb_service.worker_agent.staging import warm_commit_kernels

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, hooks, phy2log, spr = build_model(60, 512, 544, 8, 4096, device)
    for _ in range(20):  # the serving loop's own steps: fold-in and snapshots are warm, as in serving
        hooks.after_step(torch.ones((60, 544), dtype=torch.int64, device=device))
        while hooks.snapshots:
            hooks.free_buffers.append(hooks.snapshots.popleft().buffer_index)
    action = one_layer_commit(model, phy2log, spr, 8)
    sync()
    t0 = time.perf_counter()
    launched = warm_commit_kernels(action) if mode == "warm" else 0
    sync()
    warm_s = time.perf_counter() - t0
    first = commit_now(hooks, action, sync)
    later = sorted(commit_now(hooks, action, sync) for _ in range(200))
    return {
        "mode": mode,
        "first_us": first * 1e6,
        "later_p50_us": statistics.median(later) * 1e6,
        "later_p99_us": later[int(0.99 * (len(later) - 1))] * 1e6,
        "warmup_us": warm_s * 1e6,
        "kinds_warmed": launched,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="fresh processes per mode")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", choices=["cold", "warm"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device)))
        return
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for rep in range(args.reps):
        for mode in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.gpu.commit_cold", "--child", mode, "--device", args.device],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"rep {rep + 1}/{args.reps} {mode}: first commit {results[mode][-1]['first_us']:.0f} µs",
                file=sys.stderr,
            )
    print(f"first commit of a process on {args.device} ({torch.__version__}), {args.reps} processes per mode\n")
    print(
        "| mode | first commit µs (median) | first commit µs (max) | later commits p50 µs | later p99 µs |"
        " warm-up on the agent thread µs (median) | copy kinds warmed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, runs in results.items():
        firsts = [r["first_us"] for r in runs]
        print(
            f"| {mode} | {statistics.median(firsts):.0f} | {max(firsts):.0f} "
            f"| {statistics.median(r['later_p50_us'] for r in runs):.1f} "
            f"| {statistics.median(r['later_p99_us'] for r in runs):.1f} "
            f"| {statistics.median(r['warmup_us'] for r in runs):.0f} | {runs[0]['kinds_warmed']} |"
        )
    cold = statistics.median(r["first_us"] for r in results["cold"])
    warm = statistics.median(r["first_us"] for r in results["warm"])
    print(f"\nfirst commit, warm / cold: {warm / cold:.3f}")


if __name__ == "__main__":
    main()
