"""What a rank checks of a ``Plan`` before staging it, at the edges of each bound.

``tests/test_bad_input.py`` sends malformed plans through a whole agent; these call
:func:`check_plan` directly, at the exact limits: replicas per expert against the map width
(per layer), and staging bytes against the rank's budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from eplb_service import protocol
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log
from eplb_service.worker_agent.plan_check import check_plan

SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


def plan(rows: list[list[int]], layers: tuple[int, ...] = (0,)) -> protocol.Plan:
    return protocol.Plan(
        plan_id=7, base_epoch=0, layers=list(layers), phy2log=protocol.NDArray.from_numpy(np.array(rows))
    )


def check(p: protocol.Plan, map_width: int = 3, budget: int | None = None, need: int = 0) -> np.ndarray:
    return check_plan(p, SHAPE, 0, initial_phy2log(SHAPE), map_width, 0, budget, lambda _plan, _rows: need)


def test_an_expert_may_fill_the_map_width_but_not_pass_it():
    three_of_expert_0 = plan([[0, 1, 2, 3, 4, 5, 0, 0]])
    assert check(three_of_expert_0, map_width=3).tolist() == [[0, 1, 2, 3, 4, 5, 0, 0]]
    with pytest.raises(PlacementError, match="plan 7: an expert gets 3 replicas, more than the map width 2"):
        check(three_of_expert_0, map_width=2)


def test_replicas_are_counted_per_layer_not_over_the_plans_layers():
    """Expert 0 has two replicas in each of two layers: four over the plan, two per map row."""
    rows = [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert check(plan(rows, layers=(0, 1)), map_width=2).shape == (2, 8)


def test_a_plan_that_exactly_fills_the_staging_budget_is_taken():
    """The coordinator cuts batches to at most the budget: one that fits exactly must stage."""
    ok = plan([[4, 5, 2, 3, 0, 1, 0, 1]])
    assert check(ok, budget=72, need=72).shape == (1, 8)
    with pytest.raises(PlacementError, match="needs 72 bytes of staging on rank 0, more than .*=71"):
        check(ok, budget=71, need=72)
