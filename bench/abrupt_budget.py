"""Where the migration policy's slots go in the matrix's Mixtral *abrupt* cells.

Why: those 24 cells miss the slots target (at most 20% of DeepSeek's slots over the 10
rebalances) at about DeepSeek's balance. In them a quarter of the layers per window gains a hot
expert from nowhere that lasts (``bench/planner.py``'s ``matrix_loads``). This splits the slots
each policy moves between the layers hit by such an expert (an expert's share of its layer's
load up by more than 8 points since the last window) and the others, and sets the migration
policy's slots in hit layers against the whole budget. Where that ratio is above 1, answering
every new hot expert as cheaply as this policy does already costs more than the budget; with
two slots per rank no answer is cheaper than one exchange (2 slots).

Usage: ``PYTHONPATH=. python bench/abrupt_budget.py [--seed N]``; prints a markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.planner import MATRIX_SHAPES, NOISES, POPULARITIES, MatrixShape, Workload, matrix_layers, matrix_loads
from eplb_service.coordinator.load_forecast import persistence as window_persistence
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.placement import PlacementShape, initial_phy2log

HIT_SHARE = 0.08
"""A layer is *hit* when one expert's share of its load rose by more than this since the last window."""
REBALANCES = 10


def slots_by_layer_kind(policy: str, shape: MatrixShape, loads: list[np.ndarray]) -> tuple[int, int, int]:
    """``(slots moved in hit layers, in the other layers, hit layers)`` over the measured rebalances
    (the warm-up plan, from vLLM's initial placement, is left out as in the matrix)."""
    layers = loads[0].shape[0]
    pshape = PlacementShape(layers, shape.experts, shape.slots, shape.ranks)
    current = initial_phy2log(pshape)
    in_hit = in_other = hits = 0
    for i in range(REBALANCES):
        lasting = window_persistence(loads[i - 1] if i else None, loads[i])
        plan = plan_rebalance(policy, current, loads[i], pshape, persistence=lasting)
        moved = (plan.target_phy2log != current).sum(axis=1)
        current = plan.target_phy2log
        if i == 0:
            continue
        before = loads[i - 1] / loads[i - 1].sum(axis=1, keepdims=True)
        now = loads[i] / loads[i].sum(axis=1, keepdims=True)
        hit = (now - before).max(axis=1) > HIT_SHARE
        in_hit += int(moved[hit].sum())
        in_other += int(moved[~hit].sum())
        hits += int(hit.sum())
    return in_hit, in_other, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        "| shape | popularity | noise | DeepSeek's slots | budget (20%) | migration: slots in hit layers "
        "| in the others | hit layers | slots per hit layer | hit-layer slots / budget |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in (s for s in MATRIX_SHAPES if s.experts == 8):
        for popularity in POPULARITIES:
            for noise in NOISES:
                loads = matrix_loads(
                    shape, Workload(popularity, "abrupt", noise), matrix_layers(shape), REBALANCES + 1, args.seed
                )
                deepseek = sum(slots_by_layer_kind("deepseek", shape, loads)[:2])
                in_hit, in_other, hits = slots_by_layer_kind("migration", shape, loads)
                budget = 0.2 * deepseek
                print(
                    f"| {shape.label} | {popularity} | {noise} | {deepseek} | {budget:.0f} | {in_hit} | {in_other} "
                    f"| {hits} | {in_hit / max(hits, 1):.1f} | {in_hit / budget:.2f} |"
                )


if __name__ == "__main__":
    main()
