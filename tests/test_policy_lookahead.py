"""Small layers without redundant slots planned ahead (eplb_service/coordinator/policy_lookahead.py)."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service.coordinator.policy import plan_rebalance
from eplb_service.coordinator.policy_exact import small_layouts
from eplb_service.coordinator.policy_lookahead import (
    HOP_FROM,
    HOP_SHARE_PRICE,
    LOOKAHEAD_SHARE_PRICE,
    cheapest_answers,
    distance_tables,
    hop_cases,
    lookahead_costs,
    lookahead_phy2log,
    next_cases,
    plans_ahead,
    roomy_costs,
)
from eplb_service.coordinator.surge_model import SurgeModel, centred_log_shares
from eplb_service.placement import PlacementError, PlacementShape

PAIRS = small_layouts(8, 4, 2)


def model_for(
    load: np.ndarray, rate: float, reversion: float = 0.1, jump: float = float(np.log(2.0)), hop: float = 0.0
) -> SurgeModel:
    return SurgeModel(centred_log_shares(load), rate, reversion, jump, windows=5, hop=hop)


def pairs_of(row: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(row[r * 2 : r * 2 + 2].tolist()) for r in range(len(row) // 2)}


def test_which_shapes_are_planned_ahead():
    assert plans_ahead(8, 8, 4) and plans_ahead(6, 6, 3)
    assert not plans_ahead(8, 8, 2)  # ranks of 4 slots: policy_exact's best split, then the swap search
    assert not plans_ahead(8, 10, 2)  # redundant slots: policy_exact's
    assert not plans_ahead(12, 12, 6)  # 10 395 pairings
    assert not plans_ahead(64, 64, 32)  # too many ranks to weigh every layout


def test_the_cases_of_a_window_fade_every_excess_and_raise_one_colder_expert_above_the_rest():
    logits = np.log(np.array([[8.0, 1.0, 4.0, 2.0]]))
    level = np.zeros((1, 4))
    model = SurgeModel(level, rate=0.2, reversion=0.5, jump=1.0, windows=3)
    cases, odds = next_cases(logits, level, model)
    assert cases.shape == (1, 3, 4) and odds == pytest.approx([0.8, 0.1, 0.1])
    faded = 0.5 * logits[0]
    assert cases[0, 0] == pytest.approx(faded)
    for case, expert in zip(cases[0, 1:], (1, 3), strict=True):  # the two colder experts
        assert case[expert] == pytest.approx(faded.max() + 1.0)
        others = np.delete(np.arange(4), expert)
        assert case[others] == pytest.approx(faded[others])


def test_with_no_surges_and_no_fade_the_next_window_is_this_one():
    load = np.array([[40.0, 30.0, 10.0, 9.0, 5.0, 3.0, 2.0, 1.0]])
    costs = lookahead_costs(PAIRS, centred_log_shares(load), model_for(load, rate=0.0, reversion=0.0), 1.0, depth=1)
    shares = load / load.sum()
    assert costs[0] == pytest.approx(4 * PAIRS.max_loads(shares)[0])


def test_a_deeper_look_adds_the_best_answers_of_later_rebalances():
    load = np.array([[40.0, 30.0, 10.0, 9.0, 5.0, 3.0, 2.0, 1.0]])
    model = model_for(load, rate=0.25)
    one = lookahead_costs(PAIRS, centred_log_shares(load), model, 0.2, depth=1)
    two = lookahead_costs(PAIRS, centred_log_shares(load), model, 0.2, depth=2)
    assert np.all(two > one)  # a later window costs at least its cheapest layout
    with pytest.raises(ValueError, match="depth 0"):
        lookahead_costs(PAIRS, centred_log_shares(load), model, 0.2, depth=0)


def test_a_fresh_plan_takes_a_best_layout_and_leaves_room_beside_the_coldest():
    load = np.array([[40.0, 20.0, 18.0, 15.0, 10.0, 5.0, 3.0, 1.0]])
    costs = roomy_costs(PAIRS, load)
    best = costs.argmin(axis=1)
    peak = PAIRS.max_loads(load)
    assert peak[0, best[0]] == peak.min()
    chosen = {frozenset(m.tolist()) for m in PAIRS.members[best[0]]}
    assert frozenset({0, 7}) in chosen  # the hottest beside the coldest sets the largest rank
    assert frozenset({5, 6}) in chosen  # two cold experts together: room for a surge among them
    assert frozenset({1, 2}) in chosen  # and two warm ones, still under the largest rank


def test_a_surge_expected_among_cold_experts_keeps_them_apart_from_hot_ones_when_it_is_cheap():
    load = np.array([[40.0, 30.0, 25.0, 20.0, 12.0, 5.0, 3.0, 1.0]])
    even = np.array([[0, 7, 1, 6, 2, 5, 3, 4]])  # hottest with coldest, and so on
    calm = lookahead_phy2log(even, load, 4, model_for(load, rate=0.0), spend_scale=1.0, persistence=0.9, fresh=False)
    assert calm is not None and pairs_of(calm[0]) == pairs_of(even[0])  # nothing to gain: stays
    stormy = lookahead_phy2log(even, load, 4, model_for(load, rate=1.0), spend_scale=0.05, persistence=0.9, fresh=False)
    assert stormy is not None and pairs_of(stormy[0]) != pairs_of(even[0])
    assert (stormy[0] != even[0]).sum() <= 4


def test_a_fading_load_or_no_model_is_left_to_the_other_planners():
    load = np.ones((1, 8))
    row = np.arange(8)[None]
    assert lookahead_phy2log(row, load, 4, None, spend_scale=1.0, persistence=0.9, fresh=False) is None
    model = model_for(load, rate=0.2)
    assert lookahead_phy2log(row, load, 4, model, spend_scale=1.0, persistence=0.3, fresh=False) is None


def test_the_cases_of_a_hop_trade_the_hottest_expert_s_place_with_each_other_one():
    logits = np.log(np.array([[8.0, 1.0, 4.0, 2.0]]))
    cases, odds = hop_cases(logits, model_for(np.ones((1, 4)), rate=0.0, hop=0.6))
    assert cases.shape == (1, 4, 4) and odds == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert cases[0, 0] == pytest.approx(logits[0])
    traded = {int(np.argmax(case)): case for case in cases[0, 1:]}
    assert sorted(traded) == [1, 2, 3]  # the hottest's load lands on each other expert once
    for expert, case in traded.items():
        assert case[0] == pytest.approx(logits[0, expert]) and case[expert] == pytest.approx(logits[0, 0])


def test_where_the_hottest_expert_hops_where_it_sits_now_matters_less():
    load = np.array([[40.0, 30.0, 10.0, 9.0, 5.0, 3.0, 2.0, 1.0]])
    logits = centred_log_shares(load)
    crowded = next(s for s, m in enumerate(PAIRS.members) if {0, 1} in [set(p.tolist()) for p in m])
    best = int(np.argmin(PAIRS.max_loads(load)[0]))

    def gap(hop: float) -> float:
        costs = lookahead_costs(PAIRS, logits, model_for(load, rate=0.0, reversion=0.0, hop=hop), 0.01, 2, hops=True)
        return float(costs[0, crowded] - costs[0, best])

    assert gap(0.0) > gap(0.5) > gap(0.9) > 0.0  # the two hottest together still cost the most


def test_a_hopping_layer_is_planned_ahead_and_one_that_merely_fades_is_not():
    load = np.array([[40.0, 30.0, 25.0, 20.0, 12.0, 5.0, 3.0, 1.0]])
    crowded = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])  # the two hottest on one rank
    fading = model_for(load, rate=0.0, hop=HOP_FROM - 0.05)
    assert lookahead_phy2log(crowded, load, 4, fading, spend_scale=1.0, persistence=0.3, fresh=False) is None
    hopping = model_for(load, rate=0.0, hop=0.9)
    plan = lookahead_phy2log(crowded, load, 4, hopping, spend_scale=1.0, persistence=0.3, fresh=False)
    assert plan is not None and frozenset({0, 1}) not in pairs_of(plan[0])  # the next window still pays for it
    assert HOP_SHARE_PRICE < 0.1 * LOOKAHEAD_SHARE_PRICE


def test_plan_rebalance_names_a_model_of_another_shape():
    shape = PlacementShape(2, 8, 8, 4)
    load = np.arange(16, dtype=float).reshape(2, 8) + 1
    with pytest.raises(PlacementError, match="surges: a model of 3 layers x 8 experts"):
        plan_rebalance("migration", np.tile(np.arange(8), (2, 1)), load, shape, surges=model_for(np.ones((3, 8)), 0.2))
    plan = plan_rebalance(
        "migration", np.tile(np.arange(8), (2, 1)), load, shape, persistence=0.9, surges=model_for(load, 0.2)
    )
    assert plan.target_phy2log.shape == (2, 8)


def test_the_price_takes_the_controller_s_cheaper_scale_and_the_lead_s_factor(monkeypatch):
    from eplb_service.coordinator import policy_lookahead

    prices = []

    def spy(space, logits, model, price, depth=4, *, hops=False):
        prices.append(price)
        return lookahead_costs(space, logits, model, price, depth, hops=hops)

    monkeypatch.setattr(policy_lookahead, "lookahead_costs", spy)
    shape = PlacementShape(2, 8, 8, 4)
    load = np.random.default_rng(2).gamma(0.6, 100.0, size=(2, 8))
    current = np.tile(np.arange(8), (2, 1))
    model = model_for(load, rate=0.2)
    for spend_scale, price_scale in ((1.0, 1.0), (0.5, 1.0), (4.0, 1.0), (1.0, 2.0)):
        plan_rebalance(
            "migration",
            current,
            load,
            shape,
            persistence=0.9,
            surges=model,
            spend_scale=spend_scale,
            price_scale=price_scale,
        )
    base = policy_lookahead.LOOKAHEAD_SHARE_PRICE * 4
    assert prices == pytest.approx([base, base / 2, base, 2 * base])
    prices.clear()
    hopping = model_for(load, rate=0.2, hop=0.9)
    plan_rebalance("migration", current, load, shape, persistence=0.3, surges=hopping, spend_scale=0.5, price_scale=2.0)
    assert prices == pytest.approx([policy_lookahead.HOP_SHARE_PRICE * 4])


@pytest.mark.parametrize("shape", [(8, 4, 2), (6, 3, 2), (8, 2, 4), (8, 2, 5)])
def test_the_cheapest_answers_by_distance_are_the_cheapest_over_every_pair(shape):
    space = small_layouts(*shape)
    assert space is not None
    cost = np.random.default_rng(len(space)).random((300, len(space)))
    for price in (0.0, 0.03, 0.5):
        every_pair = (cost[:, None, :] + price * space.moves[None]).min(axis=2)
        assert np.allclose(cheapest_answers(cost, space.moves, price), every_pair, rtol=0, atol=1e-12)


def test_the_distance_tables_are_built_once_per_layout_space_and_cannot_be_written():
    """A coordinator plans one shape: its tables are built once, and a caller cannot change the
    copy every later plan reads. Each table lists every layout at its distance, and only those."""
    space = small_layouts(8, 4, 2)
    assert space is not None
    first = distance_tables(space.moves)
    assert distance_tables(space.moves.copy()) is first  # keyed by the values, not the array
    assert [count for count, _ in first] == sorted(set(np.unique(space.moves[space.moves > 0])))[:-1]
    for count, table in first:
        assert not table.flags.writeable
        for row, near in enumerate(table):
            assert set(near) - {row} == set(np.flatnonzero(space.moves[row] == count))


def test_an_idle_layer_keeps_its_row_in_a_fresh_plan():
    load = np.zeros((2, 8))
    load[1] = np.arange(1.0, 9.0)
    row = np.tile(np.array([[3, 1, 0, 2, 7, 5, 6, 4]]), (2, 1))
    with np.errstate(all="raise"):
        out = lookahead_phy2log(row, load, 4, None, spend_scale=1.0, persistence=1.0, fresh=True)
    assert out is not None
    assert np.array_equal(out[0], row[0])
    assert sorted(out[1].tolist()) == list(range(8))
