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

Usage: ``python bench/planner.py [--rebalances 20] [--seed 0]``

``--held-out N`` runs N random cells off the matrix the same way (:func:`held_out_cells`).

``--matrix`` runs the workload matrix instead (see :func:`matrix_cells` and ``bench/README.md``):
every deployment shape of :data:`MATRIX_SHAPES` under every workload of :data:`WORKLOADS`, each
cell a warm-up plan from vLLM's initial placement and then ``--rebalances`` (default 10)
successive rebalances, each from the policy's previous placement; one table row per cell.
``--seeds 0,1,2`` runs every cell under each seed and pools them (:func:`pool_seeds`): which
misses are one seed's loads and which the policy's. ``--small-layers`` (:data:`SMALL_LAYER_SHAPES`),
``--sixteen-experts`` (:data:`SIXTEEN_EXPERT_SHAPES`) or ``--spare-layers``
(:data:`SPARE_LAYER_SHAPES`) run shapes the matrix does not hold under the same workloads.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import platform
import statistics
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.load_window import LoadWindow
from eplb_service.coordinator.policy import build_plan, plan_rebalance
from eplb_service.coordinator.spend_control import (
    SpendState,
    balance_lead,
    plan_factors,
    shape_terms,
    update_spend,
)
from eplb_service.coordinator.surge_model import SurgeTracker
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


def drifting_loads(
    shape: BenchShape, windows: int, seed: int, *, skew: float = 1.0, drift: float = 0.25, revert: float = 0.1
) -> list[np.ndarray]:
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
            lasting = persistence(loads[i - 1], load) if i else 1.0  # as the coordinator measures it
            plan = plan_rebalance(
                name, current, load, pshape, num_groups=shape.groups, num_nodes=shape.nodes, persistence=lasting
            )
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


# --- Workload matrix -------------------------------------------------------------------------

BALANCE_TARGET_PP = -0.5
"""Per cell: migration's next-window balancedness minus DeepSeek's, in points, at least this."""
MOVED_TARGET = 0.2
"""Per cell: slots migration moves over the sequence, as a share of DeepSeek's, at most this."""


@dataclass(frozen=True)
class MatrixShape:
    """One deployment shape of the matrix: a published MoE model on an EP size it is served on.

    Attributes:
        name: the model and deployment it stands for.
        experts: logical experts per layer; redundant: redundant slots per layer; ranks: EP ranks.
        top_k: experts per token; no expert can take more than ``1 / top_k`` of a layer's load.
        groups, nodes: DeepSeek's group/node hierarchy (1 / 1: none).
    """

    name: str
    experts: int
    redundant: int
    ranks: int
    top_k: int
    groups: int = 1
    nodes: int = 1

    @property
    def slots(self) -> int:
        return self.experts + self.redundant

    @property
    def label(self) -> str:
        hierarchy = f", {self.groups} groups / {self.nodes} nodes" if self.groups > 1 else ""
        return (
            f"{self.name}: {self.experts}+{self.redundant} on {self.ranks} ({self.slots // self.ranks}/rank{hierarchy})"
        )


MATRIX_SHAPES = (
    MatrixShape("Mixtral-8x7B EP4", 8, 0, 4, 2),
    MatrixShape("Mixtral-8x7B EP4", 8, 4, 4, 2),
    MatrixShape("Mixtral-8x7B EP2", 8, 2, 2, 2),
    MatrixShape("DeepSeek-V2-Lite EP8", 64, 16, 8, 6),
    MatrixShape("DeepSeek-V2-Lite EP16", 64, 32, 16, 6),
    MatrixShape("DeepSeek-V2-Lite EP32", 64, 0, 32, 6),
    MatrixShape("Qwen3-30B-A3B EP8", 128, 0, 8, 8),
    MatrixShape("Qwen3-235B-A22B EP16", 128, 32, 16, 8),
    MatrixShape("Qwen3-235B-A22B EP64", 128, 64, 64, 8),
    MatrixShape("DeepSeek-V3 EP16", 256, 0, 16, 8, 8, 2),
    MatrixShape("DeepSeek-V3 EP32", 256, 32, 32, 8, 8, 4),
    MatrixShape("DeepSeek-V3 EP32", 256, 32, 32, 8),
    MatrixShape("DeepSeek-V3 EP64", 256, 64, 64, 8, 8, 8),
    MatrixShape("DeepSeek-V3 EP144", 256, 32, 144, 8),
    MatrixShape("Qwen3.5-397B-A17B EP8", 512, 32, 8, 10),
    MatrixShape("Qwen3.5-397B-A17B EP16", 512, 0, 16, 10),
    MatrixShape("Qwen3.5-397B-A17B EP32", 512, 256, 32, 10),
    MatrixShape("Qwen3.5-397B-A17B EP256", 512, 0, 256, 10),
)

SMALL_LAYER_SHAPES = (
    MatrixShape("small, top-2", 8, 0, 2, 2),
    MatrixShape("small, top-2", 10, 0, 2, 2),
    MatrixShape("small, top-2", 12, 0, 2, 2),
    MatrixShape("small, top-4", 12, 0, 2, 4),
    MatrixShape("small, top-2", 6, 0, 3, 2),
    MatrixShape("small, top-1", 8, 0, 4, 1),
)
"""Layers without redundant slots on 2-4 ranks that the matrix does not hold (``--small-layers``):
the kind :mod:`~eplb_service.coordinator.policy_exact` plans where the load's imbalance fades,
beside the matrix's one such shape (Mixtral 8+0 on 4 ranks), to see whether what holds there
carries to its neighbours."""

SIXTEEN_EXPERT_SHAPES = (
    MatrixShape("Phi-3.5-MoE EP2", 16, 0, 2, 2),
    MatrixShape("Phi-3.5-MoE EP4", 16, 0, 4, 2),
    MatrixShape("Phi-3.5-MoE EP4", 16, 4, 4, 2),
    MatrixShape("Phi-3.5-MoE EP8", 16, 0, 8, 2),
    MatrixShape("DBRX EP4", 16, 0, 4, 4),
    MatrixShape("DBRX EP8", 16, 8, 8, 4),
)
"""Models of 16 experts per layer (Phi-3.5-MoE and Jamba route 2 of them, DBRX 4) on 2-8 ranks
(``--sixteen-experts``): an expert count issue 16's matrix does not hold, between Mixtral's 8
and DeepSeek-V2-Lite's 64, too many layouts to plan exactly and too few slots per layer for the
spend controller's room to narrow."""

SPARE_LAYER_SHAPES = (
    MatrixShape("spare, top-2", 8, 4, 2, 2),
    MatrixShape("spare, top-4", 8, 2, 2, 4),
    MatrixShape("spare, top-2", 6, 2, 2, 2),
    MatrixShape("spare, top-2", 7, 1, 2, 2),
    MatrixShape("spare, top-2", 6, 3, 3, 2),
    MatrixShape("spare, top-1", 6, 2, 4, 1),
    MatrixShape("spare, top-2", 8, 1, 3, 2),
    MatrixShape("spare, top-2", 8, 4, 3, 2),
    MatrixShape("spare, top-2", 8, 2, 5, 2),
    MatrixShape("spare, top-1", 8, 4, 4, 1),
)
"""Small layers *with* redundant slots that the matrix does not hold (``--spare-layers``): the kind
:mod:`~eplb_service.coordinator.policy_exact` plans (every layout, or every change of up to two
slots), beside the matrix's two (Mixtral 8+2 on 2 ranks, 8+4 on 4), to see whether its prices,
set on those two, carry to their neighbours. About 7 minutes for seeds 0-2."""

OFF_MATRIX_SETS = {
    "--small-layers": SMALL_LAYER_SHAPES,
    "--sixteen-experts": SIXTEEN_EXPERT_SHAPES,
    "--spare-layers": SPARE_LAYER_SHAPES,
}
"""``--matrix``'s flags that run a set of shapes off the matrix instead of its own (one at most)."""

POPULARITIES = ("zipf-0.6", "zipf-1.0", "zipf-1.4", "lognormal")
DRIFTS = ("slow", "swap", "abrupt")
NOISES = ("low", "high")
NOISE_TOKENS_PER_EXPERT = {"low": 16384, "high": 256}
"""Routed tokens per expert per window: relative sampling noise ~1/sqrt of it (0.8% / 6%)."""


@dataclass(frozen=True)
class Workload:
    """How expert popularity looks and moves (see :func:`matrix_loads`)."""

    popularity: str
    drift: str
    noise: str

    @property
    def label(self) -> str:
        return f"{self.popularity}, {self.drift}, {self.noise} noise"


WORKLOADS = tuple(Workload(p, d, n) for p, d, n in itertools.product(POPULARITIES, DRIFTS, NOISES))


HELD_OUT_EXPERTS = (8, 16, 32, 64, 128, 256, 512)
HELD_OUT_TOP_K = (2, 4, 6, 8, 10)
HELD_OUT_RANKS = (2, 4, 8, 16, 32, 64, 128)
HELD_OUT_REDUNDANCY = (0.0, 0.125, 0.25, 0.5)


def held_out_cells(count: int, seed: int) -> list[tuple[MatrixShape, Workload]]:
    """``count`` random cells the policy was never tuned on: shapes drawn from issue 16's scope
    (:data:`HELD_OUT_EXPERTS` experts, top-k up to half of them, :data:`HELD_OUT_RANKS` ranks,
    redundancy up to 50% rounded to whole slots per rank, 2 to 68 slots per rank), each under one
    of the matrix's :data:`WORKLOADS`. The matrix's 18 shapes are the ones the policy was tuned
    on; these say how far that tuning carries to deployments nobody benchmarked."""
    rng = np.random.default_rng([seed, 16])
    cells: list[tuple[MatrixShape, Workload]] = []
    while len(cells) < count:
        experts = int(rng.choice(HELD_OUT_EXPERTS))
        top_k = int(rng.choice(HELD_OUT_TOP_K))
        ranks = int(rng.choice(HELD_OUT_RANKS))
        share = float(rng.choice(HELD_OUT_REDUNDANCY))
        redundant = int(round(experts * share / ranks)) * ranks
        redundant += (-(experts + redundant)) % ranks
        slots = (experts + redundant) // ranks
        if 2 * top_k > experts or redundant > experts // 2 or not 2 <= slots <= 68:
            continue
        shape = MatrixShape(f"held-out {len(cells)}", experts, redundant, ranks, top_k)
        cells.append((shape, WORKLOADS[int(rng.integers(len(WORKLOADS)))]))
    return cells


def matrix_layers(shape: MatrixShape) -> int:
    """Layers simulated per cell: more for small layers, so every cell averages similar slot counts."""
    return int(np.clip(8192 // shape.slots, 8, 64))


def cap_shares(prob: np.ndarray, cap: float) -> np.ndarray:
    """``[L, N]`` shares with none above ``cap``, the excess spread over the others in proportion."""
    out = prob.copy()
    for _ in range(out.shape[1]):
        over = out > cap * (1 + 1e-12)
        if not over.any():
            break
        capped = np.where(over | (out >= cap), cap, 0.0)
        free = np.where(capped > 0, 0.0, out)
        scale = (1.0 - capped.sum(axis=1, keepdims=True)) / np.maximum(free.sum(axis=1, keepdims=True), 1e-300)
        out = np.where(capped > 0, cap, free * scale)
    return out


@dataclass(frozen=True)
class MatrixWindow:
    """One window of a cell: the routed tokens and the hidden popularity that drew them.

    Attributes:
        loads: ``[layers, experts]`` routed tokens (what a planner sees).
        logits: ``[layers, experts]`` log popularity the window was sampled from.
        base: ``[layers, experts]`` the level each expert's log popularity reverts to.
    """

    loads: np.ndarray
    logits: np.ndarray
    base: np.ndarray


REVERSION = 0.1
"""The share of the gap to its base (in log popularity) an expert's popularity closes each window."""
WALK_STEP = 0.05
"""The standard deviation of each expert's random step in log popularity, every window."""
ABRUPT_RATE = 0.25
"""``abrupt``: the chance, per layer and window, that a new hot expert appears."""


def abrupt_candidates(experts: int) -> int:
    """``abrupt``: how many of a layer's coldest experts the new hot expert is drawn from (the colder half)."""
    return max(1, experts // 2)


def drift_window(
    logits: np.ndarray, base: np.ndarray, drift: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, base)`` one window later under ``drift`` (see :func:`matrix_loads`); new arrays.

    Split out so a benchmark can draw the next windows a cell's own laws would give from any
    window's hidden state (``bench/oracle_pairs.py``), with the draws in the order the matrix makes them.
    """
    layers, num = logits.shape
    rows = np.arange(layers)
    logits = logits + REVERSION * (base - logits) + rng.normal(0.0, WALK_STEP, size=logits.shape)
    if drift == "swap":
        base = base.copy()
        hot = np.argsort(-logits, axis=1)[rows, rng.integers(0, max(1, num // 8), layers)]
        other = rng.integers(0, num, layers)
        for arr in (logits, base):
            arr[rows, hot], arr[rows, other] = arr[rows, other], arr[rows, hot]
    elif drift == "abrupt":
        cold = np.argsort(logits, axis=1)[rows, rng.integers(0, abrupt_candidates(num), layers)]
        hit = rng.random(layers) < ABRUPT_RATE
        logits[rows[hit], cold[hit]] = logits.max(axis=1)[hit] + np.log(2.0)
    return logits, base


def popularity_shares(logits: np.ndarray, top_k: int) -> np.ndarray:
    """``[layers, experts]`` each expert's expected share of its layer's load under the popularity
    ``logits``, none above ``1 / top_k``."""
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    return cap_shares(prob / prob.sum(axis=1, keepdims=True), 1.0 / top_k)


def sample_window(logits: np.ndarray, top_k: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """``[layers, experts]`` routed tokens: ``tokens`` per layer drawn from the popularity
    ``logits``, no expert above ``1 / top_k`` of its layer."""
    return rng.multinomial(tokens, popularity_shares(logits, top_k)).astype(np.float64)


def matrix_windows(
    shape: MatrixShape, workload: Workload, layers: int, windows: int, seed: int | np.random.Generator
) -> list[MatrixWindow]:
    """:func:`matrix_loads`' windows with the hidden popularity behind each (same draws, same loads).

    ``seed`` may be a generator seeded as ``default_rng(seed)`` would be, to watch the draws
    (``bench/online_bound.py`` keeps them).
    """
    rng = np.random.default_rng(seed)
    num = shape.experts
    if workload.popularity.startswith("zipf"):
        exponent = float(workload.popularity.split("-")[1])
        base = -exponent * np.log(np.argsort(rng.random((layers, num)), axis=1) + 1.0)
    else:
        base = rng.normal(0.0, 1.0, size=(layers, num))
    logits = base.copy()
    tokens = NOISE_TOKENS_PER_EXPERT[workload.noise] * num
    out = []
    for window in range(windows):
        if window:
            logits, base = drift_window(logits, base, workload.drift, rng)
        out.append(MatrixWindow(sample_window(logits, shape.top_k, tokens, rng), logits.copy(), base.copy()))
    return out


def matrix_loads(shape: MatrixShape, workload: Workload, layers: int, windows: int, seed: int) -> list[np.ndarray]:
    """``windows`` successive ``[layers, experts]`` load windows, in routed tokens.

    - Popularity (per layer, experts in random order): Zipf ``p_i ~ 1 / i**s`` or log-normal
      (sigma 1); no expert above ``1 / top_k`` (a token's ``top_k`` experts are distinct).
    - Drift, between windows, in log popularity: always a mean-reverting random walk (step
      sigma 0.05, reversion 0.1 toward the layer's base); ``swap`` also swaps, in every layer,
      one expert of the hottest eighth with a random expert (base included: the change lasts);
      ``abrupt`` also makes, in a quarter of the layers, an expert of the colder half twice as
      popular as the hottest (a hot expert from nowhere, fading back at the reversion rate).
    - Noise: each window is a multinomial sample of :data:`NOISE_TOKENS_PER_EXPERT` tokens
      per expert.
    """
    return [window.loads for window in matrix_windows(shape, workload, layers, windows, seed)]


@dataclass(frozen=True)
class SequenceResult:
    """One policy over one cell's sequence (means over the measured rebalances).

    Attributes:
        planned: balancedness under the load planned for; next_window: under the next window's.
        moved, bytes: slots changed and bytes across ranks, summed over the measured rebalances.
        warmup_moved: slots changed by the warm-up plan from vLLM's initial placement.
        plan_ms: median wall time of one ``plan_rebalance``.
        plan_moves: slots changed by each plan, the warm-up first (what the coordinator's spend
            controller is fed plan by plan); empty where a caller does not record them.
    """

    planned: float
    next_window: float
    moved: int
    bytes: int
    warmup_moved: int
    plan_ms: float
    plan_moves: tuple[int, ...] = ()


def run_sequence(
    policy: str,
    shape: MatrixShape,
    loads: list[np.ndarray],
    *,
    decayed: bool = False,
    warmup: int = 1,
    forecast: bool = True,
    spend_control: bool = True,
    fresh_start: bool = True,
    surge_law: bool = True,
) -> SequenceResult:
    """Plan every window but the last, each from the previous plan; score on the next window.

    ``decayed``: plan on the coordinator's decayed load window (:class:`LoadWindow`, half-life
    one rebalance interval, its default) instead of the last window alone. ``forecast``: pass
    the persistence of the last two windows (as the coordinator does; DeepSeek ignores it).
    ``spend_control`` (``"migration"``): carry the coordinator's spend controller
    (:mod:`~eplb_service.coordinator.spend_control`) from plan to plan, with DeepSeek's shadow
    placement planned on the same loads (the warm-up plans set it off and are not tallied), and
    each tally's balance lead: the load just planned for on the placement that served it and on
    the shadow, as the coordinator measures it, and the load's persistence the plan was made with
    (none where ``forecast`` withholds it).
    ``fresh_start`` (``"migration"``): the first plan, from vLLM's initial placement, is
    DeepSeek's packing (``plan_rebalance(fresh=True)``, as the coordinator plans at epoch 0);
    ``False`` repairs that placement like any other.
    ``surge_law`` (``"migration"``): fold every window into a
    :class:`~eplb_service.coordinator.surge_model.SurgeTracker` and pass its law to each plan, as
    the coordinator does (:mod:`~eplb_service.coordinator.policy_lookahead`).
    """
    layers = loads[0].shape[0]
    pshape = PlacementShape(layers, shape.experts, shape.slots, shape.ranks)
    current = initial_phy2log(pshape)
    interval = 200
    window = LoadWindow(layers, shape.experts, half_life_steps=interval)
    planned, realized, times, plan_moves = [], [], [], []
    moved = sent = warm = 0
    controlled = spend_control and policy == "migration"
    spend, shadow = SpendState(), current
    tracker = SurgeTracker()
    for i in range(len(loads) - 1):
        window.add(loads[i], i * interval, (i + 1) * interval)
        tracker.add(loads[i])
        load = window.load.copy() if decayed else loads[i]
        start = time.perf_counter()
        lasting = persistence(loads[i - 1] if i else None, loads[i]) if forecast else 1.0
        plan = plan_rebalance(
            policy,
            current,
            load,
            pshape,
            num_groups=shape.groups,
            num_nodes=shape.nodes,
            persistence=lasting,
            fresh=fresh_start and i == 0,
            surges=tracker.model() if surge_law and policy == "migration" else None,
            **plan_factors(spend),
        )
        times.append((time.perf_counter() - start) * 1e3)
        plan_moves.append(plan.experts_moved)
        served, current = current, plan.target_phy2log
        if controlled:
            reference = plan_rebalance("deepseek", shadow, load, pshape, num_groups=shape.groups, num_nodes=shape.nodes)
            if i >= warmup:  # as the coordinator's tally: this load on what served it and on the shadow
                spend = update_spend(
                    spend,
                    plan.experts_moved,
                    reference.experts_moved,
                    lead=balance_lead(served, shadow, load, shape.ranks),
                    persistence=lasting if forecast else None,
                    **shape_terms(shape.experts, shape.slots, shape.ranks, shape.groups, shape.nodes),
                )
            shadow = reference.target_phy2log
        if i < warmup:
            warm += plan.experts_moved
            continue
        planned.append(plan.balancedness_after)
        realized.append(model_balancedness(rank_loads(current, loads[i + 1], shape.ranks)))
        moved += plan.experts_moved
        sent += plan.bytes_moved
    return SequenceResult(
        float(np.mean(planned)),
        float(np.mean(realized)),
        moved,
        sent,
        warm,
        statistics.median(times),
        tuple(plan_moves),
    )


def within_targets(balance_pp: float, moved_share: float) -> bool:
    """Issue 16's targets for one cell: next-window balance against DeepSeek's, slots moved against its."""
    return balance_pp >= BALANCE_TARGET_PP and moved_share <= MOVED_TARGET


@dataclass(frozen=True)
class CellResult:
    """DeepSeek and migration (both on the last window) and migration on the decayed window."""

    shape: MatrixShape
    workload: Workload
    layers: int
    rebalances: int
    deepseek: SequenceResult
    migration: SequenceResult
    migration_decayed: SequenceResult

    @property
    def balance_pp(self) -> float:
        return 100 * (self.migration.next_window - self.deepseek.next_window)

    @property
    def decayed_pp(self) -> float:
        return 100 * (self.migration_decayed.next_window - self.deepseek.next_window)

    @property
    def moved_share(self) -> float:
        return self.migration.moved / max(self.deepseek.moved, 1)

    @property
    def deepseek_moved_per_rebalance(self) -> float:
        """DeepSeek's slots changed per measured rebalance, as a share of all slots."""
        return self.deepseek.moved / (self.rebalances * self.layers * self.shape.slots)

    @property
    def bytes_share(self) -> float:
        return self.migration.bytes / max(self.deepseek.bytes, 1)

    @property
    def meets_targets(self) -> bool:
        return within_targets(self.balance_pp, self.moved_share)


@dataclass(frozen=True)
class PooledCell:
    """One cell over several seeds (other loads, same shape and workload): whether a miss is the
    policy's or one seed's draw. A cell on the line swings by half a point between seeds (one
    layer-window where a swap lands next to a hot expert is 0.07 pp of a 64-layer cell).

    Pooled: next-window Δ is the mean over the seeds; slots moved are summed over the seeds
    before they are compared, as one longer sequence would be.
    """

    results: tuple[CellResult, ...]

    @property
    def shape(self) -> MatrixShape:
        return self.results[0].shape

    @property
    def workload(self) -> Workload:
        return self.results[0].workload

    @property
    def balance_pp(self) -> float:
        return float(np.mean([r.balance_pp for r in self.results]))

    @property
    def moved_share(self) -> float:
        moved = sum(r.migration.moved for r in self.results)
        return moved / max(sum(r.deepseek.moved for r in self.results), 1)

    @property
    def meets_targets(self) -> bool:
        return within_targets(self.balance_pp, self.moved_share)


def pool_seeds(by_seed: list[list[CellResult]]) -> list[PooledCell]:
    """Each cell's results under every seed, one list per seed in the same cell order.

    Raises ``ValueError`` naming the first cell where the lists disagree (a different cell, or a
    list of another length): pooling unlike cells would average other workloads' numbers.
    """
    if not by_seed:
        raise ValueError("no seeds to pool: expected one list of cell results per seed")
    first = by_seed[0]
    for k, results in enumerate(by_seed[1:], start=1):
        if len(results) != len(first):
            raise ValueError(f"seed list {k} has {len(results)} cells, the first has {len(first)}")
        for a, b in zip(first, results):
            if (a.shape, a.workload) != (b.shape, b.workload):
                raise ValueError(
                    f"seed list {k} holds {b.shape.label} | {b.workload.label} where the first holds "
                    f"{a.shape.label} | {a.workload.label}"
                )
    return [PooledCell(tuple(cell)) for cell in zip(*by_seed)]


def pooled_report(pooled: list[PooledCell], seeds: list[int]) -> str:
    """Cells meeting both targets per seed and pooled; a row for every cell that misses under
    any seed, with each seed's numbers, so a reader tells a seed's draw from the policy's miss."""
    per_seed = [sum(p.results[k].meets_targets for p in pooled) for k in range(len(seeds))]
    worst = min(pooled, key=lambda p: p.balance_pp)
    lines = [
        f"Seeds {', '.join(map(str, seeds))}: cells meeting both targets "
        + ", ".join(f"{n} (seed {s})" for s, n in zip(seeds, per_seed))
        + f" of {len(pooled)}; on the seeds' pooled numbers {sum(p.meets_targets for p in pooled)}; "
        f"under every seed {sum(all(r.meets_targets for r in p.results) for p in pooled)}.",
        f"Worst pooled balance: {worst.shape.label}, {worst.workload.label}: {worst.balance_pp:+.2f} pp "
        f"at {100 * worst.moved_share:.1f}% of DeepSeek's slots.",
        "",
        "| shape | workload | Δ pp per seed | slots vs DeepSeek per seed | Δ pp pooled | slots pooled | pooled |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for p in pooled:
        if all(r.meets_targets for r in p.results):
            continue
        lines.append(
            f"| {p.shape.label} | {p.workload.label} | "
            + " ".join(f"{r.balance_pp:+.2f}" for r in p.results)
            + " | "
            + " ".join(f"{100 * r.moved_share:.1f}%" for r in p.results)
            + f" | {p.balance_pp:+.2f} | {100 * p.moved_share:.1f}% | {'ok' if p.meets_targets else 'MISS'} |"
        )
    return "\n".join(lines)


def matrix_cells(shapes=MATRIX_SHAPES, workloads=WORKLOADS) -> list[tuple[MatrixShape, Workload]]:
    """Every (shape, workload) pair, shapes outermost."""
    return [(s, w) for s in shapes for w in workloads]


def cell_seed(shape: MatrixShape, workload: Workload, seed: int) -> np.random.SeedSequence:
    """The seed of one cell's random draws: ``seed``, the shape's and the workload's labels."""
    return np.random.SeedSequence([seed, zlib.crc32(f"{shape.label}|{workload.label}".encode())])


def cell_windows(
    shape: MatrixShape, workload: Workload, windows: int, seed: int, layers: int | None = None
) -> list[MatrixWindow]:
    """One cell's ``windows`` windows with their hidden popularity (:func:`cell_loads` has the loads alone)."""
    first = int(cell_seed(shape, workload, seed).generate_state(1)[0])
    return matrix_windows(shape, workload, layers or matrix_layers(shape), windows, first)


def cell_loads(
    shape: MatrixShape, workload: Workload, windows: int, seed: int, layers: int | None = None
) -> list[np.ndarray]:
    """One cell's ``windows`` load windows, ``[layers, experts]`` each (default: :func:`matrix_layers`).

    They depend only on ``seed``, the shape and the workload, so a cell gives the same numbers
    alone or in the full matrix, and every benchmark that replays a cell sees the matrix's loads.
    """
    return [window.loads for window in cell_windows(shape, workload, windows, seed, layers)]


def run_cell(
    shape: MatrixShape,
    workload: Workload,
    *,
    rebalances: int = 10,
    seed: int = 0,
    layers: int | None = None,
    decayed: bool = True,
    forecast: bool = True,
    spend_control: bool = True,
    fresh_start: bool = True,
) -> CellResult:
    """One cell: a warm-up plan, then ``rebalances`` measured ones, for each policy on the same loads.

    The cell's loads are :func:`cell_loads`. ``forecast=False`` withholds the load's persistence from
    the migration policy (it then plans for the last window as it is); ``spend_control=False``
    runs it without the coordinator's spend controller (its default settings throughout);
    ``fresh_start=False`` has its first plan repair vLLM's initial placement instead of laying
    DeepSeek's packing.
    """
    layers = layers or matrix_layers(shape)
    loads = cell_loads(shape, workload, rebalances + 2, seed, layers)
    deepseek = run_sequence("deepseek", shape, loads)
    options = {"forecast": forecast, "spend_control": spend_control, "fresh_start": fresh_start}
    migration = run_sequence("migration", shape, loads, **options)
    smoothed = run_sequence("migration", shape, loads, decayed=True, **options) if decayed else migration
    return CellResult(shape, workload, layers, rebalances, deepseek, migration, smoothed)


def matrix_table(results: list[CellResult]) -> str:
    """The matrix as a markdown table, the worst cell of each target in bold, misses marked."""
    worst_balance = min(results, key=lambda r: r.balance_pp)
    worst_moved = max(results, key=lambda r: r.moved_share)
    lines = [
        "| shape | workload | next window: DeepSeek | migration | Δ pp | on decayed window Δ pp "
        "| planned: DeepSeek | migration | DeepSeek's slots moved / rebalance | slots moved vs DeepSeek "
        "| bytes vs DeepSeek | warm-up slots vs DeepSeek | plan ms DeepSeek / migration | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        bal = f"{r.balance_pp:+.2f}"
        mov = f"{100 * r.moved_share:.1f}%"
        if r is worst_balance:
            bal = f"**{bal}**"
        if r is worst_moved:
            mov = f"**{mov}**"
        misses = [
            name
            for name, ok in (("balance", r.balance_pp >= BALANCE_TARGET_PP), ("moved", r.moved_share <= MOVED_TARGET))
            if not ok
        ]
        lines.append(
            f"| {r.shape.label} | {r.workload.label} | {r.deepseek.next_window:.4f} | {r.migration.next_window:.4f} "
            f"| {bal} | {r.decayed_pp:+.2f} | {r.deepseek.planned:.4f} | {r.migration.planned:.4f} "
            f"| {100 * r.deepseek_moved_per_rebalance:.0f}% | {mov} "
            f"| {100 * r.bytes_share:.1f}% | {100 * r.migration.warmup_moved / max(r.deepseek.warmup_moved, 1):.0f}% "
            f"| {r.deepseek.plan_ms:.1f} / {r.migration.plan_ms:.1f} "
            f"| {'ok' if not misses else 'MISS ' + ', '.join(misses)} |"
        )
    return "\n".join(lines)


def matrix_shape_table(results: list[CellResult]) -> str:
    """Per shape: cells meeting the targets, the misses, the worst numbers."""
    lines = [
        "| shape | layers | cells meeting both | balance misses | slots misses | worst Δ pp | worst slots vs DeepSeek "
        "| DeepSeek's slots moved / rebalance | plan ms DeepSeek / migration (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in dict.fromkeys(r.shape for r in results):
        rows = [r for r in results if r.shape == shape]
        balance_misses = sum(r.balance_pp < BALANCE_TARGET_PP for r in rows)
        moved_misses = sum(r.moved_share > MOVED_TARGET for r in rows)
        lines.append(
            f"| {shape.label} | {rows[0].layers} | {sum(r.meets_targets for r in rows)} of {len(rows)} "
            f"| {balance_misses} | {moved_misses} "
            f"| {min(r.balance_pp for r in rows):+.2f} | {100 * max(r.moved_share for r in rows):.1f}% "
            f"| {100 * np.mean([r.deepseek_moved_per_rebalance for r in rows]):.0f}% "
            f"| {statistics.median(r.deepseek.plan_ms for r in rows):.1f} / "
            f"{statistics.median(r.migration.plan_ms for r in rows):.1f} |"
        )
    return "\n".join(lines)


def decayed_table(results: list[CellResult]) -> str:
    """Per drift and noise: migration on the last window vs on the decayed window, against DeepSeek."""
    lines = [
        "| drift | noise | Δ pp, last window (mean) | Δ pp, decayed window (mean) | decayed better in |",
        "|---|---|---:|---:|---:|",
    ]
    for drift, noise in itertools.product(DRIFTS, NOISES):
        rows = [r for r in results if r.workload.drift == drift and r.workload.noise == noise]
        if rows:
            lines.append(
                f"| {drift} | {noise} | {np.mean([r.balance_pp for r in rows]):+.2f} "
                f"| {np.mean([r.decayed_pp for r in rows]):+.2f} "
                f"| {sum(r.decayed_pp > r.balance_pp for r in rows)} of {len(rows)} |"
            )
    return "\n".join(lines)


def matrix_summary(results: list[CellResult]) -> str:
    worst_balance = min(results, key=lambda r: r.balance_pp)
    worst_moved = max(results, key=lambda r: r.moved_share)
    met = sum(r.meets_targets for r in results)
    decayed_better = sum(r.decayed_pp > r.balance_pp for r in results)
    return "\n".join(
        [
            f"Cells meeting both targets: {met} of {len(results)}.",
            f"Worst next-window balance: {worst_balance.shape.label}, {worst_balance.workload.label}: "
            f"{worst_balance.migration.next_window:.4f} vs DeepSeek {worst_balance.deepseek.next_window:.4f} "
            f"({worst_balance.balance_pp:+.2f} pp) at {100 * worst_balance.moved_share:.1f}% of its slots.",
            f"Most slots moved: {worst_moved.shape.label}, {worst_moved.workload.label}: "
            f"{100 * worst_moved.moved_share:.1f}% of DeepSeek's, next window {worst_moved.balance_pp:+.2f} pp.",
            f"Planning on the decayed window beats the last window in {decayed_better} of {len(results)} cells "
            f"(mean {np.mean([r.decayed_pp - r.balance_pp for r in results]):+.2f} pp).",
        ]
    )


def _cell_job(job: tuple[MatrixShape, Workload, int, int, bool]) -> CellResult:
    """One cell under one seed (module level, so a worker process can be handed it)."""
    shape, workload, rebalances, seed, decayed = job
    return run_cell(shape, workload, rebalances=rebalances, seed=seed, decayed=decayed)


def run_cells(
    cells: list[tuple[MatrixShape, Workload]],
    seeds: list[int],
    *,
    rebalances: int,
    decayed: bool,
    jobs: int = 1,
    progress: bool = False,
) -> list[list[CellResult]]:
    """Every cell under each seed: one list per seed, in the cells' order (what the tables and
    :func:`pool_seeds` read).

    ``jobs`` above 1 runs the cells in that many worker processes. Each cell draws its loads from
    its own seed (:func:`cell_seed`), so every number is the one a single process gives, except the
    plan times, which are then measured beside other cells. ``progress`` prints each cell to stderr
    as it ends (in the order they end).
    """
    work = [(shape, workload, rebalances, seed, decayed) for seed in seeds for shape, workload in cells]

    def report(job: tuple[MatrixShape, Workload, int, int, bool], result: CellResult) -> None:
        if progress:
            shape, workload, _, seed, _ = job
            print(
                f"{shape.label} | {workload.label} (seed {seed}): {result.balance_pp:+.2f} pp, "
                f"{100 * result.moved_share:.1f}% moved",
                file=sys.stderr,
                flush=True,
            )

    if jobs <= 1:
        flat = []
        for job in work:
            flat.append(_cell_job(job))
            report(job, flat[-1])
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_cell_job, job): job for job in work}
            for done in concurrent.futures.as_completed(futures):
                report(futures[done], done.result())
            flat = [future.result() for future in futures]
    return [flat[k * len(cells) : (k + 1) * len(cells)] for k in range(len(seeds))]


def run_pooled_matrix(args: argparse.Namespace, cells: list[tuple[MatrixShape, Workload]]) -> None:
    """``--seeds``: the cells under each seed, then :func:`pooled_report`."""
    start = time.perf_counter()
    by_seed = run_cells(
        cells, args.seeds, rebalances=args.rebalances, decayed=False, jobs=args.jobs, progress=args.progress
    )
    print(
        f"Machine: {machine()}; seeds {', '.join(map(str, args.seeds))}; warm-up + {args.rebalances} "
        f"rebalances per cell; {args.jobs} process(es); {time.perf_counter() - start:.0f} s\n"
    )
    print(pooled_report(pool_seeds(by_seed), args.seeds))


def parse_seeds(text: str) -> list[int]:
    """``--seeds``'s value: comma-separated distinct integers, e.g. ``0,1,2``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds names a seed twice: {text!r}")
    return seeds


def given_flag(args: argparse.Namespace, flag: str) -> bool:
    """Whether the store-true option ``flag`` (e.g. ``--small-layers``) was given."""
    return bool(getattr(args, flag.lstrip("-").replace("-", "_")))


def run_matrix(args: argparse.Namespace) -> None:
    pool = next((shapes for flag, shapes in OFF_MATRIX_SETS.items() if given_flag(args, flag)), MATRIX_SHAPES)
    shapes = [s for s in pool if not args.shapes or any(k in s.label for k in args.shapes.split(","))]
    workloads = [w for w in WORKLOADS if not args.workloads or any(k in w.label for k in args.workloads.split(","))]
    cells = held_out_cells(args.held_out, args.seed) if args.held_out else matrix_cells(shapes, workloads)
    if args.seeds:
        run_pooled_matrix(args, cells)
        return
    start = time.perf_counter()
    (results,) = run_cells(
        cells, [args.seed], rebalances=args.rebalances, decayed=True, jobs=args.jobs, progress=args.progress
    )
    print(
        f"Machine: {machine()}; seed {args.seed}; warm-up + {args.rebalances} rebalances per cell; "
        f"{args.jobs} process(es); {time.perf_counter() - start:.0f} s\n"
    )
    print(matrix_summary(results) + "\n")
    print(matrix_shape_table(results) + "\n")
    print(decayed_table(results) + "\n")
    print(matrix_table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebalances", type=int, default=None, help="rebalances per sequence (20; --matrix: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's policy even where importable")
    parser.add_argument("--matrix", action="store_true", help="run the workload matrix (see bench/README.md)")
    parser.add_argument(
        "--workloads",
        default=None,
        help="--matrix: only workloads whose label contains one of these comma-separated parts, e.g. 'swap,abrupt'",
    )
    parser.add_argument("--progress", action="store_true", help="--matrix: print each cell to stderr as it ends")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="--matrix / --held-out: run the cells in N processes (the same numbers as one process, but "
        "the plan-time columns are then measured beside other cells: keep 1 for timings)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        metavar="S,S,...",
        help="--matrix / --held-out: run every cell under each of these seeds (other loads) and report per "
        "seed and pooled (mean next-window delta, slots summed): which misses are one seed's draw "
        "(held-out cells are still picked by --seed)",
    )
    parser.add_argument(
        "--held-out",
        type=int,
        default=0,
        metavar="N",
        help="N random cells off the matrix (shapes from issue 16's scope, one matrix workload each; "
        "--seed picks them), run and tabled as the matrix's",
    )
    parser.add_argument(
        "--small-layers",
        action="store_true",
        help="--matrix: run SMALL_LAYER_SHAPES (layers without redundant slots on 2-4 ranks) instead of the "
        "matrix's shapes",
    )
    parser.add_argument(
        "--sixteen-experts",
        action="store_true",
        help="--matrix: run SIXTEEN_EXPERT_SHAPES (Phi-3.5-MoE and DBRX on 2-8 ranks) instead of the matrix's shapes",
    )
    parser.add_argument(
        "--spare-layers",
        action="store_true",
        help="--matrix: run SPARE_LAYER_SHAPES (small layers with redundant slots on 2-5 ranks) instead of the "
        "matrix's shapes",
    )
    args = parser.parse_args()
    sets_given = [flag for flag in OFF_MATRIX_SETS if given_flag(args, flag)]
    for flag in sets_given:
        if not args.matrix or args.held_out:
            parser.error(f"{flag} applies to --matrix only (not with --held-out, whose cells it would not change)")
    if len(sets_given) > 1:
        parser.error(f"{' and '.join(sets_given)} each name the shapes to run: give one of them")
    if args.held_out < 0:
        parser.error(f"--held-out takes a number of cells >= 0, got {args.held_out}")
    if args.seeds and not (args.matrix or args.held_out):
        parser.error("--seeds applies to --matrix or --held-out only")
    if args.jobs < 1:
        parser.error(f"--jobs takes a number of processes >= 1, got {args.jobs}")
    if args.jobs > 1 and not (args.matrix or args.held_out):
        parser.error("--jobs applies to --matrix or --held-out only")
    if args.matrix or args.held_out:
        args.rebalances = args.rebalances or 10
        run_matrix(args)
        return
    args.rebalances = args.rebalances or 20
    with_vllm = not args.no_vllm and vllm_policy() is not None
    policies = ["deepseek"] + (["vllm"] if with_vllm else []) + ["migration"]
    print(
        f"Machine: {machine()}; {args.rebalances} drifting rebalances, seed {args.seed}; "
        f"vLLM policy: {'yes' if with_vllm else 'not importable'}\n"
    )
    print(
        "| shape | policy | plan ms (median) | balancedness (planned) | balancedness (next window) "
        "| experts moved / rebalance | bytes moved / rebalance (x bytes_per_expert) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        if args.shapes and shape.name not in args.shapes.split(","):
            continue
        loads = drifting_loads(shape, args.rebalances + 1, args.seed)
        names = list(policies)
        if shape.groups > 1 or shape.nodes > 1:  # the hierarchy constrains DeepSeek; show it without
            names.insert(names.index("migration"), "deepseek-global")
        rows = [run_policy(p, shape, loads) for p in names]
        label = {
            "deepseek": f"deepseek-parity (ours), {shape.groups} groups / {shape.nodes} nodes",
            "deepseek-global": "deepseek-parity (ours), global (1 group / 1 node)",
            "vllm": f"vLLM DefaultEplbPolicy, {shape.groups} groups / {shape.nodes} nodes",
            "migration": "migration-aware (default)",
        }
        for r in rows:
            print(
                f"| {shape.name} | {label[r['policy']]} | {r['ms']:.1f} | {r['planned']:.4f} | {r['realized']:.4f} "
                f"| {r['moved']:.0f} | {r['bytes']:.0f} |"
            )
        ds, mig = rows[0], rows[-1]
        print(
            f"|  | migration vs deepseek | | {100 * (mig['planned'] - ds['planned']):+.2f} pp "
            f"| {100 * (mig['realized'] - ds['realized']):+.2f} pp | "
            f"{100 * mig['moved'] / max(ds['moved'], 1):.1f}% | {100 * mig['bytes'] / max(ds['bytes'], 1):.1f}% |"
        )


if __name__ == "__main__":
    main()
