"""The spend controller prototype of ``bench/spend_controller.py`` (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.planner import MATRIX_SHAPES, WORKLOADS, matrix_loads, run_sequence
from bench.spend_controller import SpendController, SpendState, controlled_sequence, policy_options, update_spend
from eplb_service.coordinator.policy_migration import DEFAULT_FINE_MOVE_SHARE, DEFAULT_MOVE_PRICE


def test_under_spending_makes_moves_cheaper_over_spending_dearer_within_the_range():
    ctl = SpendController(low=0.12, high=0.16, down=0.5, up=2.0, min_scale=0.25, max_scale=1.0)
    state = update_spend(SpendState(), 0, 100, ctl)
    assert state.scale == 0.5 and (state.spent, state.reference) == (0, 100)
    state = update_spend(update_spend(state, 0, 100, ctl), 0, 100, ctl)
    assert state.scale == 0.25  # held at min_scale
    state = update_spend(state, 100, 100, ctl)  # 100 of 400: over high
    assert state.scale == 0.5
    assert update_spend(SpendState(scale=1.0), 50, 100, ctl).scale == 1.0  # held at max_scale
    assert update_spend(SpendState(spent=14, reference=100, scale=0.5), 0, 0, ctl).scale == 0.5  # within the band
    assert update_spend(SpendState(), 0, 0, ctl).scale == 1.0  # no DeepSeek slots yet: nothing to compare


def test_memory_forgets_old_slots():
    ctl = SpendController(memory=0.5)
    state = update_spend(SpendState(spent=40, reference=100), 2, 10, ctl)
    assert (state.spent, state.reference) == (22, 60)


def test_a_cheaper_scale_lowers_the_price_and_widens_step_4_only_where_it_already_runs():
    assert policy_options(1.0, ("price", "room"), 544) == {}
    cheap = policy_options(0.5, ("price", "room"), 544)
    assert cheap == {"move_price": DEFAULT_MOVE_PRICE * 0.5, "fine_move_share": DEFAULT_FINE_MOVE_SHARE * 2}
    assert policy_options(0.5, ("price", "room"), 8) == {"move_price": DEFAULT_MOVE_PRICE * 0.5}
    with pytest.raises(ValueError, match="levers"):
        SpendController(levers=("speed",))


def test_at_a_fixed_scale_of_one_the_controlled_sequence_is_the_matrix_s_migration_sequence():
    # DeepSeek-V2-Lite on 32 ranks of 2 (the swap search), Zipf 0.6 swap: the price matters there.
    shape, workload = MATRIX_SHAPES[5], WORKLOADS[2]
    loads = matrix_loads(shape, workload, 8, 5, seed=3)
    fixed = controlled_sequence(shape, loads, SpendController(min_scale=1.0, max_scale=1.0))
    plain = run_sequence("migration", shape, loads, spend_control=False)
    assert (fixed.sequence.moved, fixed.sequence.next_window) == (plain.moved, plain.next_window)
    assert fixed.reference_moved == run_sequence("deepseek", shape, loads).moved
    assert fixed.scales == [1.0] * 4


def test_a_cell_that_moves_nothing_gets_cheaper_moves():
    shape, workload = MATRIX_SHAPES[0], WORKLOADS[2]  # Mixtral 8+0, Zipf 0.6 swap: priced out of moving
    loads = matrix_loads(shape, workload, 8, 6, seed=0)
    result = controlled_sequence(shape, loads, SpendController())
    assert result.scales[:2] == [1.0, 1.0] and result.scales[-1] < 1.0
    assert np.all(np.diff(result.scales[1:]) <= 0)
