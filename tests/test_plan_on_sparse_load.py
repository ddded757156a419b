"""The coordinator plans on whatever the agents report: a layer no report has loaded yet (all
zero), a rank that has reported nothing, a window with no load at all. Each gives a valid plan of
the loaded layers only, or "no rebalance", never a policy exception; and ``--groups`` that does not
divide the model's experts halts rebalancing once under either policy."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from conftest import register_two_ranks, send_load_report

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator
from eplb_service.placement import PlacementShape, initial_phy2log, validate_phy2log
from eplb_service.testing.protocol_fuzz import SocketSink

SHAPE = PlacementShape(2, 6, 8, 2)
"""conftest.hello_message's model: 2 layers, 6 experts in 8 slots on 2 ranks."""


def coordinator(slot_load: np.ndarray, reporting: tuple[int, ...], **settings) -> Coordinator:
    """Both ranks registered in vLLM's initial placement; the ``reporting`` ranks each send six
    reports of 10 steps of ``slot_load`` (``[L, P]`` counts), the others none."""
    c = Coordinator(CoordinatorConfig(world_size=2, endpoint="ipc:///nonexistent/sparse.sock", **settings))
    c._sock = SocketSink()
    register_two_ranks(c)
    for step in range(10, 70, 10):
        for rank in reporting:
            send_load_report(c, rank, step, slot_load)
    return c


def run_policy(c: Coordinator) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """One ``run_policy``; returns the batches it would start (no side communicator here)."""
    started: list[tuple[tuple[int, ...], np.ndarray]] = []
    c.plans.start_next_batch = lambda: started.extend((tuple(b.layers), b.phy2log) for b in c.plans.pending_batches)
    asyncio.run(c.plans.run_policy())
    return started


# Layer 0: expert 0 hot (counted on slot 0 of its two), expert 2 warm; layer 1: nothing reported yet.
HOT_LAYER_0 = np.array([[500, 0, 100, 0, 0, 0, 0, 0], [0] * 8], dtype=np.int64)


@pytest.mark.parametrize("policy", ["migration", "deepseek"])
def test_a_silent_rank_and_an_unloaded_layer_plan_the_loaded_layer_only(policy, caplog):
    c = coordinator(HOT_LAYER_0, reporting=(0,), policy=policy)
    assert not c.book.window.load[1].any() and c.book.window.load[0, 0] > 0
    with caplog.at_level(logging.INFO):
        started = run_policy(c)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert [layers for layers, _ in started] == [(0,)]
    target = initial_phy2log(SHAPE)
    target[0] = started[0][1][0]
    validate_phy2log(target, SHAPE)
    assert c.halted_reason is None


@pytest.mark.parametrize("policy", ["migration", "deepseek"])
def test_a_window_without_load_starts_no_plan_and_logs_no_error(policy, caplog):
    c = coordinator(HOT_LAYER_0 * 0, reporting=(0, 1), policy=policy)
    with caplog.at_level(logging.INFO):
        started = run_policy(c)
    assert started == [] and c.plans.counts["skipped"] == 1 and c.halted_reason is None
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.parametrize("policy", ["migration", "deepseek"])
def test_groups_not_dividing_the_experts_halt_rebalancing_once_under_either_policy(policy):
    """``--groups 4 --nodes 2`` of a 6-expert model; the migration policy used to plan on, ignoring
    them, where it kept no hierarchy (``--groups 4 --nodes 3``: the same halt now)."""
    for nodes in (1, 2):
        c = coordinator(HOT_LAYER_0, reporting=(0,), policy=policy, num_groups=4, num_nodes=nodes)
        assert run_policy(c) == []
        assert c.halted_reason == (
            f"--policy {policy}: num_groups=4 (--groups) must divide the number of logical experts (6)"
        )
