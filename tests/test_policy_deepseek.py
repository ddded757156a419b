"""DeepSeek-parity policy: the published worked example, vLLM agreement, invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.coordinator.policy_deepseek import (
    balanced_packing,
    deepseek_phy2log,
    replicate_experts,
)
from eplb_service.placement import PlacementError, PlacementShape, logical_replica_count, validate_phy2log

# The worked example of DeepSeek's EPLB README (deepseek-ai/EPLB): 2 layers, 12 experts in
# 4 groups, 16 replicas, 2 nodes, 8 GPUs.
README_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
README_PHY2LOG = np.array(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)


def test_reproduces_the_readme_example_exactly():
    assert deepseek_phy2log(README_WEIGHT, 16, 4, 2, 8).tolist() == README_PHY2LOG.tolist()


def test_global_policy_when_groups_do_not_split_over_nodes():
    # 3 groups over 2 nodes: falls back to one group on one node.
    out = deepseek_phy2log(README_WEIGHT, 16, 3, 2, 8)
    assert out.tolist() == deepseek_phy2log(README_WEIGHT, 16, 1, 1, 8).tolist()
    validate_phy2log(out, PlacementShape(2, 12, 16, 8))
    # With ties too: the fallback keeping the 3 groups on its one node reorders the experts, and
    # equal loads then break otherwise than vLLM's global policy does (README's example has none).
    ties = np.random.default_rng(0).integers(0, 6, size=(8, 12)).astype(np.float64)
    assert deepseek_phy2log(ties, 16, 3, 2, 4).tolist() == deepseek_phy2log(ties, 16, 1, 1, 4).tolist()


@pytest.mark.parametrize("scale", [2.0**120, 1e300, 2.0**-200, 1e-300])
def test_loads_beyond_float32_plan_as_their_scaled_down_copy(scale):
    """Loads near 1e38 summed their groups to inf in float32 and the packing overfilled a rank
    (the README example became a placement with experts missing); loads below 1e-45 became zeros."""
    out = deepseek_phy2log(README_WEIGHT * scale, 16, 4, 2, 8)
    assert out.tolist() == README_PHY2LOG.tolist()
    validate_phy2log(deepseek_phy2log(np.arange(16.0)[None, :] * 1e38, 16, 1, 1, 4), PlacementShape(1, 16, 16, 4))


def test_balanced_packing_never_overfills_a_pack_of_infinite_weight():
    packing = balanced_packing(np.array([[np.inf, np.inf, 1.0, 1.0, 1.0, 1.0]]), 2)
    assert sorted(packing.pack_index[0].tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(packing.rank_in_pack[0].tolist()) == [0, 0, 1, 1, 2, 2]


def test_balanced_packing_is_greedy_lpt_with_equal_cardinality():
    packing = balanced_packing(np.array([[5.0, 4.0, 3.0, 3.0]]), 2)
    assert packing.pack_index.tolist() == [[0, 1, 1, 0]]
    assert packing.rank_in_pack.tolist() == [[0, 0, 1, 1]]


def test_replicate_experts_minimises_the_largest_replica_load():
    rep = replicate_experts(np.array([[10.0, 3.0, 1.0]]), 5)
    assert rep.logcnt.tolist() == [[3, 1, 1]]
    assert rep.phy2log.tolist() == [[0, 1, 2, 0, 0]]
    assert rep.replica_rank.tolist() == [[0, 0, 0, 1, 2]]


def test_bad_hierarchy_names_the_value():
    with pytest.raises(PlacementError, match="num_groups=5"):
        deepseek_phy2log(np.ones((1, 12)), 16, 5, 5, 8)
    with pytest.raises(PlacementError, match="num_nodes=3 must divide num_ranks"):
        deepseek_phy2log(np.ones((1, 12)), 18, 6, 3, 2)


def _vllm_rebalance():
    try:
        import torch
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except ImportError:
        try:
            import torch
            from vllm.distributed.eplb.rebalance_algo import rebalance_experts
        except ImportError:
            return None
        return lambda w, *a: rebalance_experts(torch.from_numpy(w), *a)
    return lambda w, *a: DefaultEplbPolicy.rebalance_experts(torch.from_numpy(w), *a)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "layers,experts,replicas,groups,nodes,ranks",
    [(4, 16, 24, 4, 2, 8), (3, 64, 80, 8, 4, 16), (2, 12, 16, 3, 2, 4), (5, 32, 40, 1, 1, 8)],
)
def test_agrees_with_vllm_default_policy(seed, layers, experts, replicas, groups, nodes, ranks):
    vllm_rebalance = _vllm_rebalance()
    if vllm_rebalance is None:
        pytest.skip("vLLM is not importable here")
    rng = np.random.default_rng(seed)
    if seed % 2:  # small integer loads: many ties, which must break the same way
        weight = rng.integers(0, 6, size=(layers, experts)).astype(np.float32)
    else:
        weight = rng.gamma(0.7, 100.0, size=(layers, experts)).astype(np.float32)
    out = vllm_rebalance(weight, replicas, groups, nodes, ranks)
    theirs = (out[0] if isinstance(out, tuple) else out).cpu().numpy()
    assert deepseek_phy2log(weight, replicas, groups, nodes, ranks).tolist() == theirs.tolist()


@st.composite
def hierarchies(draw):
    nodes = draw(st.sampled_from([1, 2, 4]))
    groups = nodes * draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 4))
    experts = groups * group_size
    ranks = nodes * draw(st.integers(1, 3))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    layers = draw(st.integers(1, 3))
    loads = draw(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=layers * experts, max_size=layers * experts))
    return np.array(loads).reshape(layers, experts), ranks * per_rank, groups, nodes, ranks


@settings(max_examples=80, deadline=None)
@given(hierarchies())
def test_invariants(case):
    weight, replicas, groups, nodes, ranks = case
    layers, experts = weight.shape
    phy2log = deepseek_phy2log(weight, replicas, groups, nodes, ranks)
    validate_phy2log(phy2log, PlacementShape(layers, experts, replicas, ranks))
    # Hierarchical: every group's replicas sit on exactly one node.
    group_of_slot = phy2log // (experts // groups)
    node_of_slot = np.arange(replicas) // (replicas // nodes)
    for layer in range(layers):
        for group in range(groups):
            assert len(set(node_of_slot[group_of_slot[layer] == group].tolist())) == 1
    # Each node holds exactly groups/nodes groups, each expert at least once.
    assert (logical_replica_count(phy2log, experts) >= 1).all()
