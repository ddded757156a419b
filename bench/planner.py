"""Planner benchmark: time, balance and bytes moved of each placement policy.

Shapes (from the issue):
- Qwen3.5-397B-A17B: 60 layers, 512 experts, +32 redundant, 8 ranks, 1 node.
- DeepSeek-V3: 58 layers, 256 experts in 8 groups, +32 redundant, 32 ranks, 4 nodes.

Load: per layer, expert popularity is log-normal (skewed: a few hot experts) and drifts
between rebalances as a mean-reverting random walk in log space; every window's load is a
multinomial sample of ``tokens * top_k`` routed tokens from it. Each policy runs the same
sequence of rebalances, each starting from that policy's previous placement (the first from
vLLM's initial placement, slot ``p`` -> expert ``p % N``).

Columns:
- ``plan ms (median)``: wall time of one full plan (``plan_rebalance``: policy, gain filter,
  batching) for all layers.
- ``balancedness (planned)``: model balancedness of the new placement under the load it was
  planned for, averaged over rebalances; ``(next window)``: under the following window's load,
  which is what serving actually sees until the next rebalance.
- ``experts moved`` / ``bytes moved``: per rebalance, mean; bytes count only copies that cross
  ranks (``bytes_per_expert`` = 1 here, so bytes = remote copies).

Usage: ``python bench/planner.py [--rebalances 20] [--seed 0] [--markdown-only]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from eplb_service.coordinator.policy import build_plan, plan_rebalance
from eplb_service.placement import (
    PlacementShape,
    initial_phy2log,
    keep_slots_within_ranks,
    model_balancedness,
    rank_loads,
)


@dataclass(frozen=True)
class BenchShape:
    name: str
    layers: int
    experts: int
    redundant: int
    ranks: int
    groups: int
    nodes: int
    top_k: int
    tokens: int


SHAPES = (
    BenchShape("Qwen3.5-397B-A17B", 60, 512, 32, 8, 1, 1, 10, 32768),
    BenchShape("DeepSeek-V3", 58, 256, 32, 32, 8, 4, 8, 32768),
)


def drifting_loads(shape: BenchShape, windows: int, seed: int, *, skew: float = 1.0,
                   drift: float = 0.25, revert: float = 0.1) -> list[np.ndarray]:
    """``windows`` successive ``[L, N]`` load windows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, skew, size=(shape.layers, shape.experts))
    logits = base.copy()
    out = []
    for _ in range(windows):
        logits = logits + revert * (base - logits) + rng.normal(0.0, drift, size=logits.shape)
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        out.append(np.stack([rng.multinomial(shape.tokens * shape.top_k, p) for p in prob]).astype(np.float64))
    return out


def vllm_policy():
    """vLLM's DefaultEplbPolicy as ``f(load, P, groups, nodes, ranks) -> phy2log``, or None."""
    try:
        import torch
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None

    def run(load, num_physical, groups, nodes, ranks):
        out = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(load).float(), num_physical, groups, nodes, ranks)
        phy2log = out[0] if isinstance(out, tuple) else out
        return phy2log.cpu().numpy().astype(np.int64)

    return run


def run_policy(name: str, shape: BenchShape, loads: list[np.ndarray]) -> dict:
    pshape = PlacementShape(shape.layers, shape.experts, shape.experts + shape.redundant, shape.ranks)
    current = initial_phy2log(pshape)
    vllm = vllm_policy() if name == "vllm" else None
    times, planned, realized, moved, sent = [], [], [], [], []
    for i in range(len(loads) - 1):
        load = loads[i]
        start = time.perf_counter()
        if name == "vllm":
            proposed = vllm(load, pshape.num_physical, shape.groups, shape.nodes, shape.ranks)
            proposed = keep_slots_within_ranks(proposed, current, shape.ranks)
            plan = build_plan(current, proposed, load, pshape)
        elif name == "deepseek-global":
            plan = plan_rebalance("deepseek", current, load, pshape)
        else:
            plan = plan_rebalance(name, current, load, pshape, num_groups=shape.groups, num_nodes=shape.nodes)
        times.append((time.perf_counter() - start) * 1e3)
        current = plan.target_phy2log
        planned.append(plan.balancedness_after)
        realized.append(model_balancedness(rank_loads(current, loads[i + 1], shape.ranks)))
        moved.append(plan.experts_moved)
        sent.append(plan.bytes_moved)
    return {
        "policy": name,
        "ms": statistics.median(times),
        "planned": float(np.mean(planned)),
        "realized": float(np.mean(realized)),
        "moved": float(np.mean(moved)),
        "bytes": float(np.mean(sent)),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebalances", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or 'all'")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's policy even where importable")
    args = parser.parse_args()
    with_vllm = not args.no_vllm and vllm_policy() is not None
    policies = ["deepseek"] + (["vllm"] if with_vllm else []) + ["migration"]
    print(f"Machine: {machine()}; {args.rebalances} drifting rebalances, seed {args.seed}; "
          f"vLLM policy: {'yes' if with_vllm else 'not importable'}\n")
    print("| shape | policy | plan ms (median) | balancedness (planned) | balancedness (next window) "
          "| experts moved / rebalance | bytes moved / rebalance (x bytes_per_expert) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        if args.shapes != "all" and shape.name not in args.shapes.split(","):
            continue
        loads = drifting_loads(shape, args.rebalances + 1, args.seed)
        names = list(policies)
        if shape.groups > 1 or shape.nodes > 1:  # the hierarchy constrains DeepSeek; show it without
            names.insert(names.index("migration"), "deepseek-global")
        rows = [run_policy(p, shape, loads) for p in names]
        label = {"deepseek": f"deepseek-parity (ours), {shape.groups} groups / {shape.nodes} nodes",
                 "deepseek-global": "deepseek-parity (ours), global (1 group / 1 node)",
                 "vllm": f"vLLM DefaultEplbPolicy, {shape.groups} groups / {shape.nodes} nodes",
                 "migration": "migration-aware (default)"}
        for r in rows:
            print(f"| {shape.name} | {label[r['policy']]} | {r['ms']:.1f} | {r['planned']:.4f} | {r['realized']:.4f} "
                  f"| {r['moved']:.0f} | {r['bytes']:.0f} |")
        ds, mig = rows[0], rows[-1]
        print(f"|  | migration vs deepseek | | {100 * (mig['planned'] - ds['planned']):+.2f} pp "
              f"| {100 * (mig['realized'] - ds['realized']):+.2f} pp | "
              f"{100 * mig['moved'] / max(ds['moved'], 1):.1f}% | {100 * mig['bytes'] / max(ds['bytes'], 1):.1f}% |")


if __name__ == "__main__":
    main()
