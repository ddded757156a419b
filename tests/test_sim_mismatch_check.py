"""The simulation's output check can fail: a broken commit shows up as mismatches on every rank.

Every end-to-end test that asserts "0 output mismatches" trusts this check. Those tests run only
correct code, so a check loosened into comparing the live path with itself (or with a tolerance,
or on one layer, or on one rank) would pass them all. Here two real rank processes serve a few
steps with their live state broken the way faulty commits break it, and each must count.
"""

from __future__ import annotations

import numpy as np
import pytest
import sim_check_ranks
from serving_group import run_serving_ranks

from eplb_service.placement import PlacementShape, initial_phy2log, logical_replica_count
from eplb_service.sim.workload import SimModelConfig

WORLD = 2
STEPS = 4


@pytest.fixture(scope="module")
def served() -> list[dict]:
    """Each rank's report (sorted by rank) after serving every scenario of :mod:`sim_check_ranks`."""
    return run_serving_ranks(sim_check_ranks.serve_broken, WORLD, (STEPS, 0), "sim-check")


def test_intact_serving_counts_no_mismatch_on_any_rank(served):
    assert [r["mismatches"]["intact"] for r in served] == [0] * WORLD


@pytest.mark.parametrize("scenario", [s for s in sim_check_ranks.SCENARIOS if s != "intact"])
def test_a_broken_commit_is_counted_as_mismatches_on_every_rank(served, scenario):
    """Only the last layer is broken, identically on both ranks; tokens of every rank use the broken
    experts, so every rank's own count must be positive (a check of rank 0 only, of layer 0 only,
    through the live maps, or within a tolerance, reads 0 on some rank)."""
    counts = [r["mismatches"][scenario] for r in served]
    assert all(c > 0 for c in counts), f"{scenario}: mismatches per rank {counts}, expected > 0 on every rank"


def test_replicas_share_their_expert_load(served):
    """The live path picks the replica by token index modulo the replica count: under the initial
    maps both replicas of a replicated expert carry its load, or redundant slots would be dead weight
    and the measured balancedness would not be vLLM's."""
    cfg = SimModelConfig()
    shape = PlacementShape(cfg.num_layers, cfg.num_logical, cfg.num_logical + cfg.num_redundant, WORLD)
    phy2log = initial_phy2log(shape)
    load = np.sum([np.array(r["load"]) for r in served], axis=0)  # [L, P]
    replicated = logical_replica_count(phy2log, cfg.num_logical) > 1
    checked = 0
    for layer, expert in zip(*np.nonzero(replicated)):
        per_replica = load[layer, phy2log[layer] == expert]
        if per_replica.sum() >= 8:
            checked += 1
            assert per_replica.min() > 0, f"layer {layer} expert {expert}: replica loads {per_replica.tolist()}"
    assert checked >= cfg.num_layers, f"only {checked} replicated experts carried 8+ tokens"
