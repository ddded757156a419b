"""The simulated workload: what every rank computes alike, so that one seed is one run's load.

The end-to-end simulation only checks that rebalancing improved *some* skewed load; a workload
that stopped drifting after its first period, ignored the seed or gave every layer the same
popularity would pass it. These pin what the workload promises, in microseconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from eplb_service.sim.workload import SimModelConfig, expert_weights, popularity, spread_redundant

CFG = SimModelConfig(drift_interval_steps=10)


def test_the_popularity_drifts_at_every_interval_and_stays_put_within_one():
    """Each period has its own popularity (a drift applied once, or only at the first interval,
    gives later periods the same one), and every step of one period shares it and its cache key."""
    for layer in range(CFG.num_layers):
        periods = [popularity(CFG, 0, layer, k * CFG.drift_interval_steps) for k in range(6)]
        for (i, a), (j, b) in itertools.combinations(enumerate(periods), 2):
            assert not np.array_equal(a, b), f"layer {layer}: periods {i} and {j} have the same popularity"
        for k, p in enumerate(periods):
            last = (k + 1) * CFG.drift_interval_steps - 1
            assert np.array_equal(popularity(CFG, 0, layer, last), p), f"layer {layer}: step {last} left period {k}"
            assert np.isclose(p.sum(), 1.0) and (p > 0).all()
    keys = [CFG.popularity_key(step) for step in range(0, 60)]
    assert keys == [step // CFG.drift_interval_steps for step in range(0, 60)]


def test_the_popularity_is_a_function_of_the_seed_the_layer_and_the_step_only():
    """Every rank computes the popularity alone: equal calls agree, another seed or layer differs."""
    for step in (0, 35):
        assert np.array_equal(popularity(CFG, 7, 2, step), popularity(CFG, 7, 2, step))
        assert not np.array_equal(popularity(CFG, 7, 2, step), popularity(CFG, 8, 2, step)), "the seed is ignored"
        by_layer = [popularity(CFG, 7, layer, step) for layer in range(CFG.num_layers)]
        for (i, a), (j, b) in itertools.combinations(enumerate(by_layer), 2):
            assert not np.array_equal(a, b), f"step {step}: layers {i} and {j} share one popularity"


def test_expert_weights_are_small_integers_fixed_by_seed_layer_and_expert():
    """Integers keep the output check exact; the seed, the layer and the expert each change them."""
    w, b = expert_weights(CFG, 3, 1, 5)
    assert w.shape == (CFG.hidden, CFG.hidden) and b.shape == (CFG.hidden,) and w.dtype == torch.float32
    assert torch.equal(w, w.round()) and torch.equal(b, b.round())
    again = expert_weights(CFG, 3, 1, 5)
    assert torch.equal(w, again[0]) and torch.equal(b, again[1])
    for other in ((4, 1, 5), (3, 2, 5), (3, 1, 6)):
        assert not torch.equal(w, expert_weights(CFG, *other)[0]), f"(seed, layer, expert)={other} gave the same W"


@pytest.mark.parametrize("world", range(1, 65))
def test_redundant_slots_are_the_fewest_that_spread_over_the_ranks(world):
    redundant = spread_redundant(32, 8, world)
    assert (32 + redundant) % world == 0 and 8 <= redundant < 8 + world, redundant
    assert all((32 + r) % world for r in range(8, redundant)), f"{redundant} is not the fewest"
