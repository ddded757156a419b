"""Inter-node traffic of each policy's placements under DeepSeek's node-limited routing.

A proxy for expert-parallel all-to-all traffic between nodes, cheap enough to run beside the
matrix: on the matrix's hierarchical DeepSeek-V3 shapes, each policy runs the matrix's sequence
(warm-up, then ``--rebalances``), and after every rebalance tokens are routed on the next
window's load as DeepSeek-V3 routes them: a token picks its top 4 of the 8 groups, then its top
8 experts inside them (both sampled in proportion to the load, a Gumbel top-k), and each expert
sends it to one of its replicas at random. Per token:

- ``nodes``: distinct nodes its 8 experts' replicas sit on: with one copy of the token per
  destination node (DeepEP's dispatch sends a token once per node over the network and fans out
  inside the node), the copies that cross nodes are the ones not on the token's own node;
- ``remote copies``: those copies, with the token's own node uniform over the nodes;
- ``remote experts``: the share of its 8 expert sends that leave its node (1 - 1/N for any
  placement when a token's node is uniform and replicas are picked at random, so it only checks
  the sampler; a dispatch without per-node copies pays this).

Usage: ``PYTHONPATH=. python bench/node_traffic.py [--rebalances 10] [--tokens 256]``
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.planner import MATRIX_SHAPES, WORKLOADS, MatrixShape, Workload, cell_loads, matrix_layers
from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.placement import PlacementShape, initial_phy2log

TOP_GROUPS = 4
"""DeepSeek-V3's ``topk_group``: groups a token's experts are drawn from."""

DEFAULT_WORKLOADS = (Workload("lognormal", "slow", "low"), Workload("zipf-1.0", "swap", "high"))

POLICIES = {
    "deepseek (hierarchical)": ("deepseek", True),
    "migration, hierarchy": ("migration", True),
    "migration, any node (before)": ("migration", False),
}


def route(load: np.ndarray, phy2log: np.ndarray, shape: MatrixShape, tokens: int, rng: np.random.Generator):
    """``(nodes, remote_copies, remote_experts)`` per token, means over tokens and layers."""
    layers, experts = load.shape
    group_size = experts // shape.groups
    slots_per_node = shape.slots // shape.nodes
    log_load = np.log(np.maximum(load, 1e-12))[:, None, :]  # [L, 1, E]
    group_logit = np.log(np.maximum(load.reshape(layers, shape.groups, group_size).sum(axis=2), 1e-12))
    gumbel = rng.gumbel(size=(layers, tokens, shape.groups))
    groups = np.argsort(-(group_logit[:, None, :] + gumbel), axis=2)[:, :, :TOP_GROUPS]
    allowed = np.zeros((layers, tokens, shape.groups), dtype=bool)
    np.put_along_axis(allowed, groups, True, axis=2)
    score = np.where(
        np.repeat(allowed, group_size, axis=2), log_load + rng.gumbel(size=(layers, tokens, experts)), -np.inf
    )
    chosen = np.argsort(-score, axis=2)[:, :, : shape.top_k]  # [L, T, k]
    # A replica of each chosen expert, uniformly: its slots' nodes, one picked at random.
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.stack([np.searchsorted(row, np.arange(experts)) for row in sorted_experts])  # [L, E]
    count = np.stack([np.bincount(row, minlength=experts) for row in phy2log])
    lay = np.arange(layers)[:, None, None]
    pick = first[lay, chosen] + (rng.random(chosen.shape) * count[lay, chosen]).astype(np.int64)
    node = order[lay, pick] // slots_per_node  # [L, T, k]
    seen = np.zeros((layers, tokens, shape.nodes), dtype=bool)
    np.put_along_axis(seen, node, True, axis=2)
    home = rng.integers(0, shape.nodes, (layers, tokens, 1))
    nodes = seen.sum(axis=2)
    remote_copies = nodes - np.take_along_axis(seen, home, axis=2)[..., 0]
    remote_experts = (node != home).mean(axis=2)
    return float(nodes.mean()), float(remote_copies.mean()), float(remote_experts.mean())


def run(shape: MatrixShape, workload: Workload, rebalances: int, tokens: int, seed: int) -> dict[str, tuple]:
    layers = matrix_layers(shape)
    loads = cell_loads(shape, workload, rebalances + 2, seed, layers)
    pshape = PlacementShape(layers, shape.experts, shape.slots, shape.ranks)
    out = {}
    for name, (policy, hierarchy) in POLICIES.items():
        rng = np.random.default_rng(seed)
        groups, nodes = (shape.groups, shape.nodes) if hierarchy else (1, 1)
        current = initial_phy2log(pshape)
        figures = []
        for i in range(len(loads) - 1):
            lasting = persistence(loads[i - 1] if i else None, loads[i])
            plan = plan_rebalance(
                policy, current, loads[i], pshape, num_groups=groups, num_nodes=nodes, persistence=lasting
            )
            current = plan.target_phy2log
            if i:
                figures.append(route(loads[i + 1], current, shape, tokens, rng))
        out[name] = tuple(np.mean(figures, axis=0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebalances", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256, help="tokens routed per layer and rebalance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workloads",
        default=None,
        help="workloads whose label contains one of these comma-separated parts (default: two, see DEFAULT_WORKLOADS)",
    )
    args = parser.parse_args()
    parts = args.workloads.split(",") if args.workloads else None
    wanted = [w for w in WORKLOADS if any(k in w.label for k in parts)] if parts else list(DEFAULT_WORKLOADS)
    print("| shape | workload | policy | nodes per token | remote copies per token | remote expert sends |")
    print("|---|---|---|---:|---:|---:|")
    for shape in (s for s in MATRIX_SHAPES if s.nodes > 1):
        for workload in wanted:
            for name, (nodes, remote, share) in run(shape, workload, args.rebalances, args.tokens, args.seed).items():
                print(
                    f"| {shape.label} | {workload.label} | {name} | {nodes:.2f} | {remote:.2f} | {100 * share:.1f}% |"
                )


if __name__ == "__main__":
    main()
