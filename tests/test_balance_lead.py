"""The spend controller's balance lead: a deployment ahead of DeepSeek's balance and close to the
slot budget spends its lead instead of more slots (eplb_service.coordinator.spend_control)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_plan_runner_rules import plannable
from test_spend_control import faded, past_the_fresh_first_plan, plan_and_tally

import bench.planner as planner
from bench.planner import MATRIX_SHAPES, Workload, matrix_loads
from eplb_service.coordinator import plan_runner, spend_control
from eplb_service.coordinator.load_forecast import PLAN_AS_IS_FROM, persistence
from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_deepseek import deepseek_phy2log
from eplb_service.coordinator.policy_migration import DEFAULT_FINE_MOVE_SHARE, DEFAULT_MOVE_PRICE
from eplb_service.coordinator.spend_control import (
    EXACT_LEAD_MIN,
    LASTING_PERSISTENCE,
    LEAD_GIVEN_BACK,
    LEAD_MEMORY,
    LEAD_PRICE_FLOOR,
    MAX_PRICE_SCALE,
    SPEND_CAP,
    SPEND_LOW,
    SPEND_MEMORY,
    SpendOptions,
    SpendState,
    balance_lead,
    brakes_fading_loads,
    brakes_while_level,
    exact_price_scale,
    scale_ceiling,
    shape_terms,
    spend_options,
    update_spend,
)
from eplb_service.coordinator.status_doc import status_json
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log

OVER = faded(0.3)
"""Tallies at 30% of DeepSeek's slots once faded: over SPEND_CAP."""
UNDER = faded(0.1)


def test_ahead_of_deepseek_close_to_the_budget_the_price_doubles_up_to_its_cap():
    state = SpendState(**OVER)
    prices = []
    for _ in range(5):
        state = update_spend(state, 30, 100, lead=0.01)
        prices.append(state.price_scale)
    assert prices == [2.0, 4.0, 8.0, 8.0, 8.0] and MAX_PRICE_SCALE == 8.0
    assert state.lead > 0 and state.scale > 1  # step 4's scale follows the slots as before


def test_under_the_cap_or_behind_deepseek_the_price_halves_back_to_one():
    dear = SpendState(**OVER, price_scale=8.0, lead=0.01)
    assert update_spend(dataclasses.replace(dear, **UNDER), 0, 0, lead=0.01).price_scale == 4.0
    behind = dataclasses.replace(dear, lead=LEAD_GIVEN_BACK * 2)
    assert update_spend(behind, 0, 0, lead=LEAD_GIVEN_BACK * 2).price_scale == 4.0
    assert update_spend(SpendState(**UNDER), 0, 0, lead=0.05).price_scale == 1.0  # never below 1


def test_ahead_of_deepseek_the_price_holds_until_the_tally_drops_below_the_low_line():
    """A tally that dips under the cap after a dearer plan still counts slots the whole run will
    be judged on: the price holds between SPEND_LOW and the cap, and halves only below it."""
    dear = SpendState(price_scale=8.0, lead=0.01)
    for share in (SPEND_LOW + 0.001, (SPEND_LOW + SPEND_CAP) / 2, SPEND_CAP - 0.001):
        assert update_spend(dataclasses.replace(dear, **faded(share)), 0, 0, lead=0.01).price_scale == 8.0
    assert update_spend(dataclasses.replace(dear, **faded(SPEND_LOW - 0.001)), 0, 0, lead=0.01).price_scale == 4.0
    # Behind DeepSeek within the band, the price comes down all the same.
    behind = dataclasses.replace(dear, **faded((SPEND_LOW + SPEND_CAP) / 2), lead=LEAD_GIVEN_BACK * 2)
    assert update_spend(behind, 0, 0, lead=LEAD_GIVEN_BACK * 2).price_scale == 4.0
    # Nothing of DeepSeek's tallied yet: nothing to hold the price for.
    assert update_spend(SpendState(price_scale=2.0, lead=0.01), 0, 0, lead=0.01).price_scale == 1.0


def test_a_lead_between_the_give_back_line_and_zero_holds_the_price():
    """Over the cap and about level with DeepSeek: spending the lead has brought the balance down to
    where it should stop, and more slots would only go over the budget again."""
    level = SpendState(**OVER, price_scale=4.0, lead=LEAD_GIVEN_BACK / 2)
    assert update_spend(level, 0, 0, lead=LEAD_GIVEN_BACK / 2).price_scale == 4.0


def test_under_a_fading_load_in_small_layers_the_price_rises_over_the_cap_even_while_behind():
    """Where the hottest expert keeps moving (persistence under PLAN_AS_IS_FROM) in layers where a
    dearer scale has no room to narrow (``max_scale`` 1), more slots buy little balance: over the
    cap the price doubles whatever the lead, so a deployment behind DeepSeek does not keep
    spending past the budget. Not under the cap, not where the scale can narrow, not where the
    persistence is unknown or the load lasts."""
    behind = LEAD_GIVEN_BACK * 3
    over = SpendState(**OVER, price_scale=2.0, lead=behind)

    def price(state=over, fading_brake=True, **kwargs):
        return update_spend(state, 0, 0, lead=behind, fading_brake=fading_brake, **kwargs).price_scale

    assert price(persistence=PLAN_AS_IS_FROM - 0.01) == 4.0
    assert price(persistence=0.0) == 4.0
    assert price(persistence=PLAN_AS_IS_FROM) == 1.0  # behind: back down, as before
    assert price(persistence=0.2, fading_brake=False) == 1.0  # a deployment not planned ahead
    assert price() == 1.0  # persistence unknown
    under = SpendState(spent=10.0, reference=100.0, price_scale=2.0, lead=behind)
    assert price(under, persistence=0.2) == 1.0


def test_the_brake_on_fading_loads_is_for_deployments_whose_layers_are_planned_ahead():
    assert brakes_fading_loads(8, 8, 4, 1, 1)  # Mixtral 8+0 on 4 GPUs: 2-slot ranks, 105 pairings
    assert brakes_fading_loads(6, 6, 3, 1, 1)
    assert not brakes_fading_loads(8, 8, 4, 2, 2)  # under DeepSeek's hierarchy the swap search plans
    assert not brakes_fading_loads(8, 12, 4, 1, 1)  # redundant slots
    assert not brakes_fading_loads(16, 16, 8, 1, 1)  # too many pairings to weigh
    assert not brakes_fading_loads(16, 20, 4, 1, 1)
    # The coordinator and the benchmark take all of the tally's shape terms from one place.
    assert shape_terms(8, 8, 4, 1, 1) == {"max_scale": 1.0, "fading_brake": True, "level_brake": False}
    assert shape_terms(256, 320, 64, 8, 8) == {
        "max_scale": scale_ceiling(40),
        "fading_brake": False,
        "level_brake": False,
    }


def test_the_coordinator_brakes_fading_loads_where_its_shape_is_planned_ahead(monkeypatch):
    """The runner asks :func:`brakes_fading_loads` about its own deployment and passes the answer on."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    asked, told = [], []
    monkeypatch.setattr(spend_control, "brakes_fading_loads", lambda *args: asked.append(args) or True)
    real = plan_runner.update_spend
    monkeypatch.setattr(
        plan_runner,
        "update_spend",
        lambda *a, **kw: told.append((kw["fading_brake"], kw["level_brake"])) or real(*a, **kw),
    )
    plan_and_tally(c)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    plan_and_tally(c)
    shape = c.book.shape
    # 6 experts + 2 on 2 ranks, no hierarchy, not planned ahead: the brake while level too.
    assert told and set(told) == {(True, True)}
    assert set(asked) == {(shape.num_logical, shape.num_physical, shape.num_ranks, c.cfg.num_groups, c.cfg.num_nodes)}


def test_under_a_lasting_load_in_small_layers_the_price_rises_while_the_lead_is_above_the_give_back_line():
    """Slow drift (persistence at least LASTING_PERSISTENCE) in layers where a dearer scale has no
    room to narrow (``max_scale`` 1): over the cap and about level with DeepSeek, the price
    doubles instead of holding. Not where the load's hot experts move (persistence under the
    line), not where the scale has room to narrow (``max_scale`` 2 or 4), not once the lead is
    below the give-back line, and not where the persistence is unknown."""
    level = SpendState(**OVER, price_scale=2.0, lead=LEAD_GIVEN_BACK / 2)
    lead = LEAD_GIVEN_BACK / 2

    def price(**kwargs):
        return update_spend(level, 0, 0, lead=kwargs.pop("lead", lead), **kwargs).price_scale

    assert price(max_scale=1.0, persistence=LASTING_PERSISTENCE) == 4.0
    assert price(max_scale=1.0, persistence=1.0) == 4.0
    assert price(max_scale=1.0, persistence=LASTING_PERSISTENCE - 0.01) == 2.0  # held, as before
    assert price(max_scale=2.0, persistence=1.0) == 2.0
    assert price(max_scale=1.0) == 2.0
    behind = LEAD_GIVEN_BACK * 3  # the faded lead falls below the line: the price comes down
    assert price(max_scale=1.0, persistence=1.0, lead=behind) == 1.0
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=f"persistence must be None or a number in \\[0, 1\\], got {bad!r}"):
            update_spend(level, 0, 0, lead=lead, persistence=bad)


def test_level_with_deepseek_over_the_cap_the_price_rises_where_the_shape_takes_the_level_brake():
    """Over the cap with the faded lead above the give-back line (within 0.2 points of DeepSeek's
    balance, where issue 16 allows half a point), a deployment with ``level_brake`` doubles step
    6's price instead of holding it, whatever the persistence: it spends that margin instead of
    more slots. Not once the lead is below the line, not under the cap, and not without the brake
    (a deployment under DeepSeek's hierarchy, or one whose layers are planned ahead)."""
    lead = LEAD_GIVEN_BACK / 2
    level = SpendState(**OVER, price_scale=2.0, lead=lead)

    def price(state=level, **kwargs):
        return update_spend(state, 0, 0, lead=kwargs.pop("lead", lead), **kwargs).price_scale

    for known in (None, 0.2, 0.9, 1.0):
        assert price(level_brake=True, persistence=known) == 4.0
    assert price(level_brake=False, persistence=0.9) == 2.0  # held, as without the brake
    assert price(level_brake=True, lead=LEAD_GIVEN_BACK * 3) == 1.0  # behind: back down
    under = SpendState(**faded((SPEND_LOW + SPEND_CAP) / 2), price_scale=2.0, lead=lead)
    assert price(under, level_brake=True) == 2.0  # under the cap: held
    ahead = SpendState(**OVER, price_scale=2.0, lead=0.01)
    assert update_spend(ahead, 0, 0, lead=0.01, level_brake=False).price_scale == 4.0  # the lead's own rule


def test_the_level_brake_is_for_deployments_without_the_hierarchy_whose_layers_are_not_planned_ahead():
    assert brakes_while_level(16, 24, 2, 1, 1)  # 16 experts + 8 on 2 GPUs: the swap search
    assert brakes_while_level(8, 10, 2, 1, 1)  # Mixtral 8+2: planned exactly
    assert not brakes_while_level(8, 8, 4, 1, 1)  # Mixtral 8+0 on 4: planned ahead
    assert not brakes_while_level(256, 288, 32, 8, 4)  # DeepSeek-V3 under its node hierarchy
    assert shape_terms(256, 288, 32, 1, 1)["level_brake"]  # the same without it


def test_the_lead_fades_and_an_unmeasured_round_leaves_it_and_the_price():
    state = update_spend(SpendState(lead=0.01), 0, 0, lead=-0.02)
    assert state.lead == pytest.approx(LEAD_MEMORY * 0.01 - (1 - LEAD_MEMORY) * 0.02)
    kept = SpendState(**OVER, lead=0.03, price_scale=2.0)
    after = update_spend(kept, 30, 100)
    assert (after.lead, after.price_scale) == (0.03, 2.0)
    for bad in (float("nan"), 1.5, True):
        with pytest.raises(
            ValueError, match=f"lead must be None or a balancedness difference in \\[-1, 1\\], got {bad!r}"
        ):
            update_spend(kept, 0, 0, lead=bad)


def test_the_price_scale_multiplies_step_6_s_price_only():
    """Above 1 it also floors the price's fading (LEAD_PRICE_FLOOR); the fine pass is untouched."""
    floored = LEAD_PRICE_FLOOR
    assert spend_options(1.0, 12, 4.0) == SpendOptions(DEFAULT_MOVE_PRICE * 4, DEFAULT_FINE_MOVE_SHARE, floored)
    assert spend_options(0.5, 544, 2.0) == SpendOptions(DEFAULT_MOVE_PRICE, DEFAULT_FINE_MOVE_SHARE * 2, floored)
    assert spend_options(0.5, 544, 1.0).price_floor == 0.0
    for bad in (0.5, MAX_PRICE_SCALE * 2, float("inf")):
        with pytest.raises(ValueError, match=f"price_scale must be a number in \\[1, 8\\], got {bad!r}"):
            spend_options(1.0, 12, bad)


def test_the_lead_is_how_much_better_the_served_placement_balanced_the_load():
    shape = PlacementShape(16, 8, 8, 4)
    rng = np.random.default_rng(3)
    load = rng.gamma(1.0, 100.0, size=(16, 8))
    packed = deepseek_phy2log(load, 8, 1, 1, 4)
    vllm = initial_phy2log(shape)
    assert balance_lead(packed, vllm, load, 4) > 0.05
    assert balance_lead(vllm, packed, load, 4) == pytest.approx(-balance_lead(packed, vllm, load, 4))
    assert balance_lead(vllm, vllm, load, 4) == 0.0


def test_a_dearer_price_moves_fewer_slots_where_the_imbalance_fades():
    """DeepSeek-V2-Lite on 32 ranks of 2 slots (the swap search; Mixtral 8+4 is now planned by
    policy_exact, which takes no price_scale), a hot expert trading places every window: step 6
    prices moves there, and a dearer price keeps more layers where they are."""
    matrix_shape = MATRIX_SHAPES[5]
    shape = PlacementShape(32, matrix_shape.experts, matrix_shape.slots, matrix_shape.ranks)
    loads = matrix_loads(matrix_shape, Workload("zipf-1.0", "swap", "low"), 32, 3, seed=2)
    start = plan_rebalance("migration", initial_phy2log(shape), loads[0], shape, fresh=True).target_phy2log
    kept = persistence(loads[0], loads[1])
    assert kept < 1.0  # some of the imbalance fades: a move has a price
    moved = [
        plan_rebalance("migration", start, loads[1], shape, persistence=kept, price_scale=p).experts_moved
        for p in (1.0, 2.0, MAX_PRICE_SCALE)
    ]
    assert moved[0] > moved[1] >= moved[2]
    with pytest.raises(PlacementError, match="price_scale must be a number in \\[1, 8\\], got 0.5"):
        plan_rebalance("migration", start, loads[1], shape, price_scale=0.5)


def test_the_coordinator_raises_the_price_when_its_placement_led_close_to_the_budget():
    """The runner measures, at each tally, the load just planned for on the placement that served
    it and on DeepSeek's shadow. Here the shadow piles each layer's hottest experts together and
    the tallies are close to the budget: the next plan is asked for at twice step 6's price, and
    the gauges and ``status`` show the lead and the price."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    shape = c.book.shape
    plan_and_tally(c)  # sets the shadow off
    load = c.book.window.load
    hottest_first = np.argsort(-load, axis=1)
    assert (shape.num_logical, shape.num_physical, shape.num_ranks) == (6, 8, 2)
    c.plans._shadow = hottest_first[:, [0, 1, 2, 3, 4, 5, 4, 5]]  # the 4 hottest on rank 0, the 2 coldest twice on 1
    served = c.placements[c.epoch]
    assert balance_lead(served, c.plans._shadow, load, shape.num_ranks) > 0
    sample = balance_lead(served, c.plans._shadow, load, shape.num_ranks)
    c.plans.spend = SpendState(**OVER)
    plan_and_tally(c)
    assert c.plans.spend.spent > SPEND_CAP * c.plans.spend.reference
    assert c.plans.spend.lead == pytest.approx((1 - LEAD_MEMORY) * sample)
    assert c.plans.spend.price_scale == 2.0
    call = c.plans._policy_call(c.placements[c.epoch], c.book.window.load, 1.0, False, False)
    assert call.keywords["price_scale"] == 2.0
    doc = json.loads(status_json(c.status()))["spend"]
    assert doc["price_scale"] == 2.0 and doc["balance_lead"] == pytest.approx(c.plans.spend.lead)
    gauge = c.metrics.registry.get_sample_value
    assert gauge("eplb_step_price_scale", {}) == 2.0
    assert gauge("eplb_balance_lead", {}) == pytest.approx(c.plans.spend.lead)
    c.plans.new_deployment()
    assert gauge("eplb_step_price_scale", {}) == 1.0 and gauge("eplb_balance_lead", {}) == 0.0


def test_the_coordinator_tallies_each_plan_with_the_persistence_it_was_made_with(monkeypatch):
    """The tally for a plan runs after it, and the next plan measures the persistence anew only
    once that tally is settled: the controller is fed the plan's own ``persistence``."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    asked: list[float | None] = []
    real = plan_runner.update_spend

    def spy(state, spent, reference, **kwargs):
        asked.append(kwargs["persistence"])
        return real(state, spent, reference, **kwargs)

    monkeypatch.setattr(plan_runner, "update_spend", spy)
    plan_and_tally(c)  # sets the shadow off: nothing tallied yet
    plan_and_tally(c)
    assert asked == [c.plans.last_persistence] and isinstance(asked[0], float)
    c.plans.new_deployment()
    assert c.plans.last_persistence is None


def test_layers_planned_exactly_take_the_lead_s_price_only_while_clearly_ahead():
    """``exact_price_scale``: the lead's ``price_scale`` for layers with redundant slots that
    policy_exact plans, only while the faded lead is above half a point; the coordinator asks
    each plan for it."""
    assert exact_price_scale(SpendState(price_scale=4.0, lead=EXACT_LEAD_MIN * 2)) == 4.0
    assert exact_price_scale(SpendState(price_scale=4.0, lead=EXACT_LEAD_MIN)) == 1.0
    assert exact_price_scale(SpendState(price_scale=1.0, lead=0.05)) == 1.0
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    for lead, expected in ((EXACT_LEAD_MIN * 2, 4.0), (EXACT_LEAD_MIN / 2, 1.0)):
        c.plans.spend = SpendState(**OVER, price_scale=4.0, lead=lead)
        call = c.plans._policy_call(c.placements[c.epoch], c.book.window.load, 1.0, False, False)
        assert call.keywords["price_scale"] == 4.0 and call.keywords["exact_price_scale"] == expected


def test_a_lead_that_cannot_be_measured_leaves_the_price_and_planning_goes_on(monkeypatch):
    """The next plan awaits the last tally: an error escaping it would stop planning for good. The
    slots are still tallied; the lead and the price stay where they were."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    plan_and_tally(c)  # sets the shadow off

    def broken(*args):
        raise FloatingPointError("overflow")

    monkeypatch.setattr(plan_runner, "balance_lead", broken)
    before = c.plans.spend = SpendState(**OVER, lead=0.01, price_scale=2.0)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    plan_and_tally(c)
    after = c.plans.spend
    assert (after.lead, after.price_scale) == (before.lead, before.price_scale)
    assert after.reference > before.reference * SPEND_MEMORY  # the slots were tallied
    monkeypatch.setattr(plan_runner, "update_spend", broken)
    plan_and_tally(c)  # the update itself fails: the tally still ends, the controller unchanged
    assert c.plans.spend == after and not c.plans.planning


def test_the_matrix_replays_the_coordinator_s_lead():
    """``run_sequence`` feeds tally ``i`` the lead of load ``i`` on the placement that served it
    (the migration plan of rebalance ``i - 1``) against DeepSeek's plan ``i - 1`` (its shadow
    plans from its own previous plan): not the plan just made, nor the shadow just planned."""
    matrix_shape = MATRIX_SHAPES[2]  # Mixtral 8+2 on 2 ranks
    shape = PlacementShape(16, matrix_shape.experts, matrix_shape.slots, matrix_shape.ranks)
    loads = matrix_loads(matrix_shape, Workload("lognormal", "swap", "low"), 16, 5, seed=1)
    leads: list[float | None] = []
    migration: list[np.ndarray] = []
    real_update, real_plan = planner.update_spend, planner.plan_rebalance

    def recording_update(state, spent, reference, **kwargs):
        leads.append(kwargs.get("lead"))
        return real_update(state, spent, reference, **kwargs)

    def recording_plan(policy, *args, **kwargs):
        plan = real_plan(policy, *args, **kwargs)
        if policy == "migration":
            migration.append(plan.target_phy2log)
        return plan

    planner.update_spend, planner.plan_rebalance = recording_update, recording_plan
    try:
        planner.run_sequence("migration", matrix_shape, loads)
    finally:
        planner.update_spend, planner.plan_rebalance = real_update, real_plan
    deepseek = [initial_phy2log(shape)]
    for load in loads[:-1]:
        deepseek.append(plan_rebalance("deepseek", deepseek[-1], load, shape).target_phy2log)
    assert len(leads) == len(loads) - 2 and len(migration) == len(loads) - 1
    expected = [
        balance_lead(migration[i - 1], deepseek[i], loads[i], shape.num_ranks) for i in range(1, len(leads) + 1)
    ]
    assert leads == pytest.approx(expected)
    assert any(abs(x) > 1e-4 for x in expected)  # the placements differ: the check has teeth
