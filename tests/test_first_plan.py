"""The first plan from the placement serving started with: the migration policy lays DeepSeek's
packing there instead of repairing vLLM's arbitrary layout (``plan_rebalance(fresh=True)``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from plan_harness import commit_plan, harness
from test_plan_runner_rules import plannable
from test_spend_control import plan_and_tally

from eplb_service.coordinator.plan_cli import main as plan_main
from eplb_service.coordinator.policy import plan_rebalance, rank_staging_bytes
from eplb_service.coordinator.spend_control import SpendState
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log


def skewed_load(shape: PlacementShape, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, 1.0, size=(shape.num_layers, shape.num_logical)) * 1000


@pytest.mark.parametrize("hierarchy", [{}, {"num_groups": 4, "num_nodes": 2}])
def test_a_fresh_migration_plan_is_deepseek_s_and_a_repair_moves_less(hierarchy):
    shape = PlacementShape(6, 16, 24, 8)
    current, load = initial_phy2log(shape), skewed_load(shape)
    fresh = plan_rebalance("migration", current, load, shape, fresh=True, **hierarchy)
    deepseek = plan_rebalance("deepseek", current, load, shape, **hierarchy)
    repair = plan_rebalance("migration", current, load, shape, **hierarchy)
    assert np.array_equal(fresh.target_phy2log, deepseek.target_phy2log)
    assert fresh.experts_moved == deepseek.experts_moved > repair.experts_moved
    assert fresh.balancedness_after == pytest.approx(deepseek.balancedness_after)


def test_fresh_changes_nothing_for_deepseek_and_must_be_a_bool():
    shape = PlacementShape(4, 8, 12, 4)
    current, load = initial_phy2log(shape), skewed_load(shape)
    plain = plan_rebalance("deepseek", current, load, shape)
    assert np.array_equal(
        plan_rebalance("deepseek", current, load, shape, fresh=True).target_phy2log, plain.target_phy2log
    )
    with pytest.raises(PlacementError, match="fresh must be True or False, got 'yes'"):
        plan_rebalance("migration", current, load, shape, fresh="yes")


def test_the_coordinator_plans_fresh_only_until_a_plan_commits():
    """Epoch 0 is the placement serving started with, whatever this coordinator remembers: a
    restarted coordinator learns the ranks' epoch, so it never repacks a placement plans chose."""
    c, _ = plannable()
    real_call, asked = c.plans._policy_call, []

    def recorded(current, load, persistence, seeding, fresh):
        call = real_call(current, load, persistence, seeding, fresh)
        asked.append(call.keywords["fresh"])
        return call

    c.plans._policy_call = recorded
    assert c.epoch == 0 and c.plans.starts_fresh()
    c.plans.planning = True
    asyncio.run(c.plans.run_policy())
    c.plans.plan = None  # the fresh plan is dropped here; the next one comes after a commit
    c.plans._policy_call = real_call
    commit_plan(c, step=c.registry.min_step() + 10)
    assert c.epoch == 1 and not c.plans.starts_fresh()
    c.plans._policy_call = recorded
    c.plans.last_plan_end_step = -(10**9)
    c.plans.planning = True
    asyncio.run(c.plans.run_policy())
    assert asked == [True, False]


def test_the_deepseek_policy_is_never_asked_for_a_fresh_plan():
    c, _ = harness()
    c.plans.cfg = dataclasses.replace(c.plans.cfg, policy="deepseek")
    assert c.epoch == 0 and not c.plans.starts_fresh()


def test_eplb_plan_lays_deepseek_s_packing_from_vllm_s_initial_placement_given_or_not(tmp_path, capsys):
    """As the coordinator's first plan: vLLM's initial placement, by default or as ``--current``,
    gets DeepSeek's packing; any other ``--current`` is repaired."""
    shape = PlacementShape(3, 16, 24, 8)
    load_path, initial_path, other_path = (tmp_path / name for name in ("load.json", "initial.json", "other.json"))
    load_path.write_text(json.dumps(skewed_load(shape).tolist()))
    initial_path.write_text(json.dumps(initial_phy2log(shape).tolist()))
    other = initial_phy2log(shape)[:, ::-1]
    other_path.write_text(json.dumps(other.tolist()))

    def planned(*argv: str) -> np.ndarray:
        assert plan_main(["--load", str(load_path), "--ranks", "8", "--redundant", "8", *argv]) == 0
        return np.array(json.loads(capsys.readouterr().out)["phy2log"])

    deepseek = planned("--policy", "deepseek")
    assert np.array_equal(planned(), deepseek)
    assert np.array_equal(planned("--current", str(initial_path)), deepseek)
    repaired = planned("--current", str(other_path))
    packed = planned("--current", str(other_path), "--policy", "deepseek")
    assert (repaired != other).sum() < (packed != other).sum()


def test_a_layer_whose_packing_would_not_fit_one_batch_is_repaired_instead():
    """With a staging budget below what a packing stages on some rank (68 slots per rank of a
    large model against the default 1 GiB), a fresh plan that kept the packing would skip that
    layer, leave the epoch at 0 and do the same at every interval: the layer never moved. It is
    repaired instead; the layers whose packing fits are packed."""
    shape = PlacementShape(8, 12, 16, 4)
    current, load = initial_phy2log(shape), skewed_load(shape, seed=11)
    budget = {"bytes_per_expert": 1, "staging_budget_bytes": 3, "skip_over_budget": True}
    deepseek = plan_rebalance("deepseek", current, load, shape).target_phy2log
    packing_fits = rank_staging_bytes(current, deepseek, shape, 1).max(axis=1) <= 3
    assert packing_fits.any() and not packing_fits.all(), "the load must give both kinds of layer"
    fresh = plan_rebalance("migration", current, load, shape, fresh=True, **budget)
    repair = plan_rebalance("migration", current, load, shape, **budget)
    rows = fresh.target_phy2log
    packed = (rows == deepseek).all(axis=1) & (rows != current).any(axis=1)
    assert packed[packing_fits].any() and not packed[~packing_fits].any()
    assert ((rows == current).all(axis=1) | packed)[packing_fits].all()  # packed, or kept for no gain
    assert np.array_equal(fresh.target_phy2log[~packing_fits], repair.target_phy2log[~packing_fits])
    assert fresh.experts_moved > 0 and (rank_staging_bytes(current, fresh.target_phy2log, shape, 1) <= 3).all()
    assert fresh.over_budget_layers == ()


def test_a_fresh_plan_that_did_not_commit_is_made_again_and_never_tallied():
    """Skipped, aborted or timed out, a fresh plan leaves the epoch at 0, so the next plan is fresh
    again: tallied, its whole packing would count against the slot budget and hold the spend
    controller's scale up. Like the first plan it only sets DeepSeek's shadow off."""
    c, _ = plannable()
    assert c.plans.starts_fresh()
    for _ in range(2):
        plan_and_tally(c)
        assert c.plans.plan is not None  # a plan went out (the harness's load is far from even)
        c.plans.plan, c.plans.pending_batches = None, []  # as if it aborted: nothing committed
        c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
        assert c.epoch == 0 and c.plans.starts_fresh()
    assert c.plans.spend == SpendState()


def test_only_vllm_s_initial_placement_is_planned_fresh():
    c, _ = plannable()
    assert c.plans.starts_fresh()
    c.book.placements[0] = c.book.placements[0][:, ::-1].copy()  # another placement strategy
    assert not c.plans.starts_fresh()
    c, _ = plannable()
    c.plans.cfg = dataclasses.replace(c.plans.cfg, initial_placement=c.book.placements[0].tolist())
    assert not c.plans.starts_fresh()  # the operator's choice, even if its seeding did not commit
