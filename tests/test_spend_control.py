"""The migration policy's online spend controller (eplb_service.coordinator.spend_control)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from plan_harness import commit_plan
from test_plan_runner_rules import names, plannable

from bench.planner import MATRIX_SHAPES, SIXTEEN_EXPERT_SHAPES, MatrixShape, Workload, matrix_loads
from eplb_service.coordinator import spend_control
from eplb_service.coordinator.policy import build_plan, plan_rebalance
from eplb_service.coordinator.policy_migration import (
    DEFAULT_FINE_MOVE_SHARE,
    DEFAULT_MOVE_PRICE,
    SMALL_LAYER_PRICE_FLOOR,
    price_fading,
)
from eplb_service.coordinator.spend_control import (
    LEAD_PRICE_FLOOR,
    MAX_FINE_MOVE_SHARE,
    MAX_PRICE_SCALE,
    MAX_SCALE,
    MIN_SCALE,
    ROOM_MIN_SLOTS,
    SPEND_CAP,
    SPEND_HIGH,
    SPEND_MEMORY,
    SpendOptions,
    SpendState,
    room_slots,
    scale_ceiling,
    spend_options,
    update_spend,
)
from eplb_service.coordinator.status_doc import status_json
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log


def test_under_spending_halves_the_scale_down_to_its_floor_and_over_spending_doubles_it():
    state = update_spend(SpendState(), 0, 100)
    assert state == SpendState(0.0, 100.0, 0.5)
    for _ in range(10):
        state = update_spend(state, 0, 100)
    assert state.scale == MIN_SCALE
    over = update_spend(SpendState(spent=10, reference=50, scale=0.25), 10, 10)  # 19 of 55: above 16%
    assert over.scale == 0.5


def faded(share: float) -> dict[str, float]:
    """Tallies that read ``share`` of DeepSeek's slots once faded by the next update."""
    return {"spent": share * 100 / SPEND_MEMORY, "reference": 100 / SPEND_MEMORY}


def test_between_the_band_and_the_cap_the_scale_goes_back_to_the_defaults_and_no_further():
    near = faded((SPEND_HIGH + SPEND_CAP) / 2)
    assert update_spend(SpendState(**near, scale=0.25), 0, 0).scale == 0.5
    assert update_spend(SpendState(**near, scale=0.75), 0, 0).scale == 1.0  # not 1.5
    assert update_spend(SpendState(**near, scale=1.0), 0, 0).scale == 1.0
    assert update_spend(SpendState(**near, scale=2.0), 0, 0).scale == 2.0  # dearer moves hold there


def test_close_to_a_fifth_of_deepseek_s_slots_moves_get_dearer_than_the_defaults_up_to_the_cap():
    state = SpendState()
    scales = []
    for _ in range(4):
        state = update_spend(state, 19, 100)  # 19%: above SPEND_CAP
        scales.append(state.scale)
    assert SPEND_CAP < 0.19 and scales == [2.0, MAX_SCALE, MAX_SCALE, MAX_SCALE]
    for _ in range(30):  # then far below: back down through the defaults to the floor
        state = update_spend(state, 0, 100)
    assert state.scale == MIN_SCALE


def test_within_the_band_or_with_nothing_to_compare_the_scale_stays():
    within = SpendState(spent=14 / SPEND_MEMORY, reference=100 / SPEND_MEMORY, scale=0.25)  # 14% after fading
    assert update_spend(within, 0, 0).scale == 0.25
    assert update_spend(SpendState(scale=0.5), 0, 0).scale == 0.5
    with pytest.raises(ValueError, match="spent=-1"):
        update_spend(SpendState(), -1, 5)


def test_the_tallies_fade_so_a_long_run_follows_the_workload():
    state = update_spend(SpendState(spent=100, reference=200), 3, 7)
    assert (state.spent, state.reference) == (100 * SPEND_MEMORY + 3, 200 * SPEND_MEMORY + 7)


def test_moves_get_dearer_than_the_defaults_only_in_layers_where_that_narrows_something():
    """In Mixtral's 8-12 slots step 4's room holds no exchange at any scale, so above 1 nothing
    would change there; the scale stops at 1 and falls to cheaper moves as soon as the tally
    drops, instead of first coming back down from 4."""
    assert scale_ceiling(12) == 1.0 and scale_ceiling(80) == MAX_SCALE
    over = SpendState(**faded(0.5), scale=1.0)
    assert update_spend(over, 0, 0, max_scale=scale_ceiling(12)).scale == 1.0
    assert update_spend(over, 0, 0, max_scale=scale_ceiling(80)).scale == 2.0
    for bad in (0.5, MAX_SCALE * 2):
        with pytest.raises(ValueError, match=f"max_scale must be in \\[1, 4\\], got {bad!r}"):
            update_spend(over, 0, 0, max_scale=bad)


def test_the_ceiling_is_the_first_scale_at_which_the_fine_pass_holds_no_exchange():
    """Step 4's room is a share of the slots: 25-49 slots hold one exchange at the default and none
    at scale 2, so scale 4 would change nothing there and only take one more rebalance to come
    back down from; 50 slots and more still hold one at 2, so the ceiling is 4."""
    for slots, ceiling in ((24, 1.0), (25, 2.0), (40, 2.0), (49, 2.0), (50, MAX_SCALE), (72, MAX_SCALE)):
        assert scale_ceiling(slots) == ceiling, slots
        if ceiling > 1:
            assert spend_options(ceiling / 2, slots).fine_move_share * slots >= 2
            assert spend_options(ceiling, slots).fine_move_share * slots < 2 or ceiling == MAX_SCALE


def test_under_the_hierarchy_the_room_is_a_share_of_a_nodes_slots():
    """The migration policy runs its steps per node under DeepSeek's group/node hierarchy, so
    DeepSeek-V3's 320 slots on 8 nodes give the fine pass 40 slots' share: ceiling 2, not 4."""
    assert room_slots(320) == 320 and room_slots(320, 8, 1) == 320
    assert room_slots(320, 8, 8) == 40
    assert scale_ceiling(room_slots(320, 8, 8)) == 2.0 and scale_ceiling(room_slots(320)) == MAX_SCALE
    # Cheaper moves widen the room only where a node's share is ROOM_MIN_SLOTS or more: 12 is not.
    assert spend_options(0.5, room_slots(320, 8, 8)).fine_move_share == 2 * DEFAULT_FINE_MOVE_SHARE
    assert spend_options(0.5, room_slots(192, 16, 16)).fine_move_share == DEFAULT_FINE_MOVE_SHARE


def test_a_cheaper_scale_lowers_the_price_and_widens_the_fine_pass_only_where_it_runs():
    assert spend_options(1.0, 544) == SpendOptions(DEFAULT_MOVE_PRICE, DEFAULT_FINE_MOVE_SHARE)
    assert spend_options(0.5, 544) == SpendOptions(DEFAULT_MOVE_PRICE / 2, DEFAULT_FINE_MOVE_SHARE * 2)
    assert spend_options(MIN_SCALE, 544).fine_move_share == MAX_FINE_MOVE_SHARE
    assert spend_options(0.5, 12).fine_move_share == DEFAULT_FINE_MOVE_SHARE  # 12 x 8%: no exchange fits anyway
    for bad in (0.0, MAX_SCALE * 1.5, float("nan")):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            spend_options(bad, 8)


def test_in_layers_of_16_to_24_slots_only_a_cheaper_scale_opens_the_fine_pass():
    """The default room (8%) holds no exchange under 25 slots. From ROOM_MIN_SLOTS on (16-expert
    models) a scale below 1 opens it to one or two exchanges; a dearer one has nothing to narrow,
    so the ceiling stays 1. Mixtral's 8-12 slots keep the default either way."""
    assert ROOM_MIN_SLOTS == 16
    for slots in (16, 20, 24):
        assert scale_ceiling(slots) == 1.0
        assert DEFAULT_FINE_MOVE_SHARE * slots < 2  # closed at the defaults
        assert spend_options(0.5, slots).fine_move_share == 2 * DEFAULT_FINE_MOVE_SHARE
        assert int(spend_options(MIN_SCALE, slots).fine_move_share * slots) >= 2
    assert int(spend_options(MIN_SCALE, 24).fine_move_share * 24) == 5  # two exchanges
    for slots in (8, 12, 15):
        assert spend_options(MIN_SCALE, slots).fine_move_share == DEFAULT_FINE_MOVE_SHARE


def test_a_cheaper_scale_buys_balance_in_a_slowly_drifting_dbrx_layer():
    """DBRX on 8 ranks (16 experts + 8 redundant, 3 slots per rank), slowly drifting: from a plan
    at the defaults, the next plan at a cheap scale spends its fine pass (more slots) on a
    flatter layer; at the defaults it has no room for one."""
    (cell,) = [s for s in SIXTEEN_EXPERT_SHAPES if s.label.startswith("DBRX EP8")]
    assert (cell.experts, cell.redundant, cell.ranks, cell.top_k) == (16, 8, 8, 4)
    dbrx = PlacementShape(16, 16, 24, 8)
    loads = matrix_loads(cell, Workload("zipf-0.6", "slow", "low"), 16, 3, seed=0)
    current = plan_rebalance("migration", initial_phy2log(dbrx), loads[0], dbrx, fresh=True).target_phy2log
    current = plan_rebalance("migration", current, loads[1], dbrx).target_phy2log
    default, cheap = (plan_rebalance("migration", current, loads[2], dbrx, spend_scale=s) for s in (1.0, MIN_SCALE))
    assert cheap.experts_moved > default.experts_moved
    assert cheap.balancedness_after > default.balancedness_after + 0.01  # 0.953 -> 0.975 (before: 0.954)


def test_while_the_balance_leads_step_6_s_price_no_longer_fades_to_nothing_where_the_load_lasts():
    """``price_scale`` above 1 floors the persistence factor at LEAD_PRICE_FLOOR: at persistence
    0.9 the square is 0.01, so a price times 8 was still a twelfth of the default's at 0.72, and
    a deployment ahead of DeepSeek's balance kept moving as much as at 1."""
    assert spend_options(1.0, 64).price_floor == 0.0
    assert spend_options(1.0, 64, price_scale=2.0).price_floor == LEAD_PRICE_FLOOR == SMALL_LAYER_PRICE_FLOOR
    assert price_fading(0.9, 64) == pytest.approx(0.01) and price_fading(0.9, 64, LEAD_PRICE_FLOOR) == LEAD_PRICE_FLOOR
    assert price_fading(0.2, 64, LEAD_PRICE_FLOOR) == pytest.approx(0.64)  # a fading load: the square is higher
    cell = MatrixShape("32 experts on 4 GPUs, top-6", 32, 0, 4, 6)
    layout = PlacementShape(16, 32, 32, 4)
    loads = matrix_loads(cell, Workload("zipf-0.6", "abrupt", "high"), 16, 3, seed=0)
    current = plan_rebalance("migration", initial_phy2log(layout), loads[0], layout, fresh=True).target_phy2log
    current = plan_rebalance("migration", current, loads[1], layout).target_phy2log
    plans = {
        scale: plan_rebalance("migration", current, loads[2], layout, persistence=0.9, price_scale=scale)
        for scale in (1.0, MAX_PRICE_SCALE)
    }
    assert plans[1.0].experts_moved >= 2 * max(plans[MAX_PRICE_SCALE].experts_moved, 1)


def test_a_dearer_scale_narrows_only_the_fine_pass_and_keeps_the_price():
    assert spend_options(2.0, 544) == SpendOptions(DEFAULT_MOVE_PRICE, DEFAULT_FINE_MOVE_SHARE / 2)
    assert spend_options(MAX_SCALE, 288) == SpendOptions(DEFAULT_MOVE_PRICE, DEFAULT_FINE_MOVE_SHARE / MAX_SCALE)
    assert spend_options(MAX_SCALE, 12) == SpendOptions(DEFAULT_MOVE_PRICE, DEFAULT_FINE_MOVE_SHARE)


def past_the_fresh_first_plan(c) -> None:
    """One plan committed: the next ones repair (``fresh`` only at epoch 0) and are tallied."""
    commit_plan(c, step=c.registry.min_step() + 10)
    assert not c.plans.starts_fresh()


def plan_and_tally(c) -> None:
    """One planning round of the harness coordinator and the spend tally it starts."""

    async def plan() -> None:
        await c.plans.run_policy()
        await c.plans.settle_spend()

    asyncio.run(plan())


def hopping_load() -> np.ndarray:
    """8 experts on 4 ranks of 2 slots, 16 layers: experts 0 and 1 (rank 0's pair under the
    initial placement) hot, the rest near even."""
    rng = np.random.default_rng(5)
    load = rng.uniform(90, 110, size=(16, 8))
    load[:, 0] = 200.0
    load[:, 1] = 200.0 * rng.uniform(0.5, 1.0, 16)
    return load


def test_a_priced_out_layer_moves_at_a_cheaper_scale():
    """Where little of the imbalance lasts (persistence 0.2) the default price keeps 2-slot layers
    where they are; the controller's cheaper scale lets the ones that gain most move."""
    shape = PlacementShape(16, 8, 8, 4)
    current, load = initial_phy2log(shape), hopping_load()
    default = plan_rebalance("migration", current, load, shape, persistence=0.2)
    cheap = plan_rebalance("migration", current, load, shape, persistence=0.2, spend_scale=MIN_SCALE)
    assert default.experts_moved == 0 and cheap.experts_moved > 0
    assert cheap.balancedness_after > default.balancedness_after
    assert plan_rebalance("deepseek", current, load, shape, spend_scale=MIN_SCALE).experts_moved > 0  # ignored
    with pytest.raises(PlacementError, match="spend_scale"):
        plan_rebalance("migration", current, load, shape, spend_scale=0.0)


def test_a_priced_out_layer_moves_at_a_cheaper_scale_with_the_hierarchy_kept_too():
    """The same with DeepSeek's groups on nodes (2 groups of 8 on 2 nodes of 4 ranks): each node's
    sub-problem gets the scale, and every group stays on its node."""
    shape = PlacementShape(16, 16, 16, 8)
    current, load = initial_phy2log(shape), np.hstack([hopping_load(), hopping_load()[::-1]])
    hierarchy = {"num_groups": 2, "num_nodes": 2, "persistence": 0.2}
    default = plan_rebalance("migration", current, load, shape, **hierarchy)
    cheap = plan_rebalance("migration", current, load, shape, spend_scale=MIN_SCALE, **hierarchy)
    assert default.experts_moved == 0 and cheap.experts_moved > 0
    assert cheap.balancedness_after > default.balancedness_after
    node_of_slot = np.arange(16) // 8
    assert ((cheap.target_phy2log // 8) == node_of_slot).all()  # group g's experts on node g


def test_a_dearer_scale_keeps_fewer_fine_exchanges_and_still_levels_the_layer():
    """Above 1 only step 4's fine pass narrows: slowly drifting layers of 80 slots (DeepSeek-V2-Lite
    on 8 ranks, high noise) keep fewer of its exchanges, while steps 2-3 still level every rank."""
    matrix_shape = MATRIX_SHAPES[3]
    assert (matrix_shape.experts, matrix_shape.slots, matrix_shape.ranks) == (64, 80, 8)
    shape = PlacementShape(4, 64, 80, 8)
    loads = matrix_loads(matrix_shape, Workload("zipf-0.6", "slow", "high"), 4, 2, seed=0)
    current = plan_rebalance("migration", initial_phy2log(shape), loads[0], shape).target_phy2log
    default, dearer, dearest = (
        plan_rebalance("migration", current, loads[1], shape, spend_scale=scale) for scale in (1.0, 2.0, MAX_SCALE)
    )
    assert default.experts_moved > dearer.experts_moved >= dearest.experts_moved > 0
    assert default.balancedness_after >= dearer.balancedness_after >= dearest.balancedness_after
    assert dearest.balancedness_after > max(default.balancedness_before, 0.95)
    with pytest.raises(PlacementError, match="got 8.0"):
        plan_rebalance("migration", current, loads[1], shape, spend_scale=2 * MAX_SCALE)


def test_the_coordinator_holds_a_small_layers_scale_at_one_and_passes_a_dearer_one_on():
    """Plans that move what DeepSeek's move (far above a fifth of its slots; its shadow starts from
    its own previous plan, so the tallies differ a little) would make the next plan dearer, but
    in the harness's 8-slot layers a dearer scale changes nothing, so it stays at 1. A dearer
    scale, where the controller holds one, is what the runner asks the policy for (that the
    policy narrows step 4 with it: ``test_a_dearer_scale_keeps_fewer_fine_exchanges...``)."""
    c, _ = plannable()
    shape = c.book.shape
    assert scale_ceiling(shape.num_physical) == 1.0
    commit_plan(c, step=c.registry.min_step() + 10)  # past the fresh first plan

    def as_deepseek(current, load, persistence, seeding, fresh):
        return lambda: plan_rebalance("deepseek", current, load, shape)

    real_call, c.plans._policy_call = c.plans._policy_call, as_deepseek
    plan_and_tally(c)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    plan_and_tally(c)
    assert c.plans.spend.spent > SPEND_CAP * c.plans.spend.reference > 0
    assert c.plans.spend.scale == 1.0
    c.plans.spend = dataclasses.replace(c.plans.spend, scale=2.0)
    assert not c.plans.starts_fresh()
    call = real_call(c.placements[c.epoch], c.book.window.load, 1.0, False, False)
    assert call.keywords["spend_scale"] == 2.0 and call.keywords["fresh"] is False


def test_the_coordinator_takes_its_ceiling_from_a_nodes_slots_under_the_hierarchy(monkeypatch):
    """With ``--groups``/``--nodes`` the runner asks for the ceiling of a node's share of a layer's
    slots, which is what the policy's fine pass runs on there."""
    c, _ = plannable()
    c.plans.cfg = c.cfg = dataclasses.replace(c.cfg, num_groups=2, num_nodes=2)
    past_the_fresh_first_plan(c)
    asked: list[int] = []
    real = spend_control.scale_ceiling
    monkeypatch.setattr(spend_control, "scale_ceiling", lambda slots: asked.append(slots) or real(slots))
    plan_and_tally(c)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    plan_and_tally(c)
    assert asked and set(asked) == {c.book.shape.num_physical // 2}


def test_the_coordinator_makes_moves_cheaper_after_plans_that_moved_nothing_while_deepseek_would_have():
    """The runner tallies its plans against DeepSeek's from a shadow placement: the first plan only
    sets the shadow off; after one that moved nothing while DeepSeek's moved slots, the next plan
    is asked for at half the scale."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    assert c.cfg.policy == "migration"

    def no_change(current, load, persistence, seeding, fresh):
        return lambda: build_plan(current, current, load, c.book.shape)

    real_call, c.plans._policy_call = c.plans._policy_call, no_change
    plan_and_tally(c)
    assert c.plans.spend == SpendState()  # the first plan is not tallied
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0  # the load moves: DeepSeek repacks
    plan_and_tally(c)
    assert c.plans.spend.spent == 0 and c.plans.spend.reference > 0
    assert c.plans.spend.scale == 0.5
    call = real_call(c.placements[c.epoch], c.book.window.load, 1.0, False, False)
    assert call.keywords["spend_scale"] == 0.5
    c.plans.new_deployment()
    assert c.plans.spend == SpendState()


def test_a_plan_not_worth_making_spends_nothing():
    """A plan the coordinator skips (its gain under ``--min-gain``) moves no slot, so the tally
    counts none: counted, it kept the controller from making moves cheaper in a deployment whose
    plans are all skipped."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)
    c.plans.cfg = dataclasses.replace(c.plans.cfg, min_gain=0.99)
    plan_and_tally(c)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    proposed = c.plans._policy_call(c.placements[c.epoch].copy(), c.book.window.load.copy(), 1.0, False, False)()
    assert proposed.experts_moved > 0  # the policy would move slots, for less than min_gain
    plan_and_tally(c)
    assert c.plans.counts["skipped"] == 2
    assert c.plans.spend.spent == 0 and c.plans.spend.reference > 0 and c.plans.spend.scale == 0.5


def test_a_plan_is_sent_before_its_spend_tally_runs_and_the_next_plan_waits_for_it():
    """The shadow plan (DeepSeek's whole-model packing) takes longer than the migration plan on
    large models: run before the plan was decided, it added to every plan's time."""
    c, sent = plannable()
    tallied: list[int] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def slow_tally(current, load, spent: int, generation: int) -> None:
            await release.wait()
            tallied.append(spent)

        c.plans._tally_spend = slow_tally
        sent.clear()
        await asyncio.wait_for(c.plans.run_policy(), 10)  # a plan waiting on its tally never returns
        assert c.plans.plan is not None and "Plan" in names(sent)  # the plan went ahead...
        assert tallied == []  # ...while its tally waits
        c.plans.plan = None  # as if it committed: the next round may plan
        c.plans.planning = True
        next_round = asyncio.create_task(c.plans.run_policy())
        await asyncio.sleep(0.05)
        assert not next_round.done() and tallied == []  # the next plan waits for the last tally
        release.set()
        await next_round
        assert tallied[0] > 0

    asyncio.run(scenario())


def test_a_tally_of_the_previous_deployment_changes_nothing():
    """A new deployment registers while the last plan's tally runs: its scale starts at 1 and its
    shadow from its own placement, whatever the old tally finds."""
    c, _ = plannable()
    plan_and_tally(c)  # the shadow is set off
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0

    async def scenario() -> None:
        await c.plans.run_policy()
        c.plans.new_deployment()
        await c.plans.settle_spend()

    asyncio.run(scenario())
    assert c.plans.spend == SpendState() and c.plans._shadow is None


def test_operators_see_the_scale_as_a_metric_and_in_status():
    """A coordinator whose plans got cheaper says so where an operator looks: the gauge and the
    status document follow the controller, and a new deployment starts again at 1."""
    c, _ = plannable()
    past_the_fresh_first_plan(c)

    def scale_shown() -> tuple[float | None, dict]:
        doc = json.loads(status_json(c.status()))
        return c.metrics.registry.get_sample_value("eplb_move_price_scale", {}), doc["spend"]

    at_start = {"scale": 1.0, "moved": 0.0, "deepseek_moved": 0.0, "balance_lead": 0.0, "price_scale": 1.0}
    assert scale_shown() == (1.0, at_start)
    c.plans._policy_call = lambda current, load, persistence, seeding, fresh: (
        lambda: build_plan(current, current, load, c.book.shape)
    )
    plan_and_tally(c)
    c.book.window.load[:] = c.book.window.load[:, ::-1] + 1.0
    plan_and_tally(c)
    gauge, spend = scale_shown()
    assert gauge == spend["scale"] == 0.5 and spend["moved"] == 0 and spend["deepseek_moved"] > 0
    c.plans.new_deployment()
    assert scale_shown() == (1.0, at_start)
