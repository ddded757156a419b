"""Skewed, drifting expert popularity and the fixed expert weights of the simulation.

Every rank computes the same popularity for the same step (it depends only on the
seed, the layer and the step), so the deployment sees one global distribution while
each rank samples its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SimModelConfig:
    """Shape of the simulated MoE stack; defaults fit 8 ranks on a 2-core machine."""

    num_layers: int = 4
    num_logical: int = 32
    num_redundant: int = 8
    hidden: int = 16
    tokens_per_rank: int = 32
    top_k: int = 2
    zipf_exponent: float = 1.2
    drift_interval_steps: int = 250
    drift_swaps: int = 6
    """Pairs of experts whose popularity swaps at every drift point, per layer."""
    trace_path: str | None = None
    """Replay a recorded load trace (``eplb_service.trace``) instead of the Zipf drift."""

    def popularity_key(self, step: int) -> int:
        """Steps with the same key share one popularity (cache key)."""
        if self.trace_path:
            return _trace(self.trace_path).window_at(step)
        return step // self.drift_interval_steps


_TRACES: dict = {}


def _trace(path: str):
    from eplb_service.trace import load_trace

    if path not in _TRACES:
        _TRACES[path] = load_trace(path)
    return _TRACES[path]


def spread_redundant(num_logical: int, at_least: int, world_size: int) -> int:
    """The fewest redundant slots, ``at_least`` or more, that make ``num_logical`` + them a
    multiple of ``world_size``: every rank holds the same number of slots (``PlacementShape``)."""
    return at_least + (-(num_logical + at_least)) % world_size


def shape_for_ranks(cfg: SimModelConfig, world_size: int) -> SimModelConfig:
    """``cfg`` with its redundant slots raised so that its slots spread over ``world_size`` ranks.

    The default 32 experts + 8 redundant fit 1, 2, 4, 5, 8, 10, 20 or 40 ranks; any other
    count (``--dp 3``) made every simulated rank die building its placement."""
    import dataclasses

    return dataclasses.replace(cfg, num_redundant=spread_redundant(cfg.num_logical, cfg.num_redundant, world_size))


def shape_for_trace(cfg: SimModelConfig, world_size: int) -> SimModelConfig:
    """The model config that replays ``cfg.trace_path``: its layers and experts, enough redundant slots.

    ``ValueError`` names a trace the simulation cannot route (fewer experts than ``top_k``)."""
    import dataclasses

    layers, experts = _trace(cfg.trace_path).loads.shape[1:]
    if experts < cfg.top_k:  # sampling top_k distinct experts per token would fail on every rank
        raise ValueError(
            f"trace {cfg.trace_path!r} has {experts} expert(s) per layer; the simulation routes each token to "
            f"top_k={cfg.top_k} distinct experts, so it needs at least {cfg.top_k}"
        )
    redundant = spread_redundant(int(experts), max(1, experts // 8), world_size)
    return dataclasses.replace(cfg, num_layers=int(layers), num_logical=int(experts), num_redundant=redundant)


def popularity(cfg: SimModelConfig, seed: int, layer: int, step: int) -> np.ndarray:
    """``[N_log]`` probabilities: the trace's window, or Zipf over a permutation that drifts."""
    if cfg.trace_path:
        trace = _trace(cfg.trace_path)
        load = trace.loads[trace.window_at(step), layer]
        total = load.sum()
        return load / total if total > 0 else np.full(cfg.num_logical, 1.0 / cfg.num_logical)
    rng = np.random.default_rng([seed, layer, 0])
    order = rng.permutation(cfg.num_logical)
    for drift in range(1, step // cfg.drift_interval_steps + 1):
        drift_rng = np.random.default_rng([seed, layer, drift])
        for _ in range(cfg.drift_swaps):
            a, b = drift_rng.integers(0, cfg.num_logical, size=2)
            order[[a, b]] = order[[b, a]]
    weights = np.empty(cfg.num_logical)
    weights[order] = 1.0 / np.arange(1, cfg.num_logical + 1) ** cfg.zipf_exponent
    return weights / weights.sum()


def expert_weights(cfg: SimModelConfig, seed: int, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``(W [H, H], b [H])`` of logical expert ``expert``: small integers as float32.

    Integer values keep every product and sum exact in float32, so the serving path and
    the reference agree bit for bit exactly when the right expert was used.
    """
    gen = torch.Generator().manual_seed(((seed * 1009 + layer) * 100003 + expert) & 0x7FFFFFFF)
    w = torch.randint(-2, 3, (cfg.hidden, cfg.hidden), generator=gen).to(torch.float32)
    b = torch.randint(-4, 5, (cfg.hidden,), generator=gen).to(torch.float32)
    return w, b
