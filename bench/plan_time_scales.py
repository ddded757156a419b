"""Plan time of the Qwen3.5 shape at the spend controller's scales, with and without step 4's spread.

    PYTHONPATH=. python bench/plan_time_scales.py [--plans 11] [--skip 6]

The migration policy's plan-time target (20 ms on 2 cores) is for the Qwen3.5 shape at the
defaults. Where the coordinator's spend controller makes moves cheaper (``spend_scale`` below 1)
step 4 runs in its 544-slot layers too, so this times both there. Each scale runs one sequence of
``--plans`` plans from vLLM's initial placement on the planner benchmark's drifting load, with the
spread on and off alternating plan by plan (each from its own previous plan), and prints the
median of the plans from ``--skip`` on (the first plans from vLLM's layout move far more).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from bench.planner import SHAPES, drifting_loads, machine
from eplb_service.coordinator import policy_migration
from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.placement import PlacementShape, initial_phy2log

SCALES = (1.0, 0.5, 0.25, 1 / 16)


def _no_spread(phy2log: np.ndarray, load: np.ndarray, counts: np.ndarray, num_ranks: int, *, room, **_):
    return phy2log.copy(), room


def time_scale(scale: float, plans: int, skip: int, seed: int) -> dict[str, float]:
    """Median plan ms with the spread on and off, at one controller scale."""
    shape = SHAPES[0]
    loads = drifting_loads(shape, plans + 1, seed)
    pshape = PlacementShape(shape.layers, shape.experts, shape.experts + shape.redundant, shape.ranks)
    searches: dict[str, Callable] = {"on": policy_migration.spread_search, "off": _no_spread}
    current = {name: initial_phy2log(pshape) for name in searches}
    times: dict[str, list[float]] = {name: [] for name in searches}
    try:
        for i in range(plans):
            lasting = persistence(loads[i - 1] if i else None, loads[i])
            for name in ("on", "off") if i % 2 else ("off", "on"):
                policy_migration.spread_search = searches[name]
                start = time.perf_counter()
                plan = plan_rebalance(
                    "migration", current[name], loads[i], pshape, persistence=lasting, spend_scale=scale
                )
                if i >= skip:
                    times[name].append((time.perf_counter() - start) * 1e3)
                current[name] = plan.target_phy2log
    finally:
        policy_migration.spread_search = searches["on"]
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=11, help="plans per scale (11)")
    parser.add_argument("--skip", type=int, default=6, help="plans not timed at the start (6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.skip < args.plans:
        parser.error(f"--skip must be in [0, --plans), got {args.skip} with --plans {args.plans}")
    print(f"Machine: {machine()}; Qwen3.5-397B-A17B shape (60 layers, 512+32 on 8); seed {args.seed}")
    print()
    print("| spend scale | plan ms, spread on (median) | spread off |")
    print("|---:|---:|---:|")
    for scale in SCALES:
        result = time_scale(scale, args.plans, args.skip, args.seed)
        print(f"| {scale:g} | {result['on']:.1f} | {result['off']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
