"""What an operator reads (status document, status table, metrics) is true from the first second:
nothing there looks like a measurement or a placement before one exists, and a new deployment
under a running coordinator starts from "nothing known" again."""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
from conftest import hello_message, send_load_report

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator
from eplb_service.coordinator.status_client import format_status
from eplb_service.coordinator.status_doc import status_json
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.testing.protocol_fuzz import SocketSink

SHAPE = PlacementShape(2, 6, 8, 2)


def coordinator() -> Coordinator:
    c = Coordinator(CoordinatorConfig(world_size=2, endpoint="ipc:///nonexistent/truth.sock"))
    c._sock = SocketSink()
    return c


def load_report(c: Coordinator, rank: int, step_end: int) -> None:
    send_load_report(c, rank, step_end, np.arange(16, dtype=np.int64).reshape(2, 8) * (rank + 1))


def hello(c: Coordinator, rank: int, pid: int) -> bytes:
    identity = f"rank-{rank}-{pid}".encode()
    store = {"store_host": "127.0.0.1", "store_port": 1} if rank == 0 else {"store_host": "", "store_port": 0}
    c._handle(identity, hello_message(rank=rank, pid=pid, node="n", **store))
    return identity


def gauge(c: Coordinator, name: str, **labels: str) -> float:
    value = c.metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def shown(c: Coordinator) -> dict:
    """The document as it leaves the process (strict JSON)."""
    return json.loads(status_json(c.status()))


def leave_all(c: Coordinator) -> None:
    for record in list(c.registry.alive):
        c.router.lose_agent(record, time.monotonic())


def test_epoch_is_null_until_the_ranks_agree_and_again_for_a_new_deployment():
    """Before: the status document said ``"epoch": -1`` until the ranks agreed (a number that reads
    as an epoch), and a new deployment set ``eplb_placement_epoch`` to -1 instead of NaN."""
    c = coordinator()
    assert shown(c)["epoch"] is None and math.isnan(gauge(c, "eplb_placement_epoch"))
    assert "epoch none yet" in format_status(shown(c))
    hello(c, 0, pid=100)  # one rank of two: nothing agreed yet
    assert shown(c)["epoch"] is None and math.isnan(gauge(c, "eplb_placement_epoch"))
    hello(c, 1, pid=101)
    assert shown(c)["epoch"] == 0 and gauge(c, "eplb_placement_epoch") == 0
    assert "epoch 0 " in format_status(shown(c))
    leave_all(c)
    hello(c, 0, pid=200)  # vLLM restarted under this coordinator: a new deployment
    assert c.deployments == 2
    assert shown(c)["epoch"] is None and math.isnan(gauge(c, "eplb_placement_epoch"))
    hello(c, 1, pid=201)
    assert shown(c)["epoch"] == 0 and gauge(c, "eplb_placement_epoch") == 0
    assert np.array_equal(c.placements[0], initial_phy2log(SHAPE))


def test_measurements_are_null_until_measured_and_forgotten_for_a_new_deployment():
    """Before: status said ``"load_persistence": 1.0`` before any plan had measured it, and a new
    deployment kept the previous one's persistence (status and gauge), projected balancedness and
    report lag; ``eplb_balancedness{kind="current"}`` kept the old deployment's value until the new
    one reported load."""
    c = coordinator()
    doc = shown(c)
    assert doc["load_persistence"] is None and doc["balancedness"] is None
    assert math.isnan(gauge(c, "eplb_load_persistence"))
    hello(c, 0, pid=100)
    hello(c, 1, pid=101)
    for step in (10, 20, 30):
        for rank in (0, 1):
            load_report(c, rank, step)
    asyncio.run(c._tick())  # refreshes the current balancedness
    asyncio.run(c.plans.run_policy())  # a plan measures the persistence and projects a balancedness
    doc = shown(c)
    assert doc["load_persistence"] == 1.0 and doc["balancedness"]["model"] < 1.0
    measured = ("eplb_load_persistence", "eplb_load_report_lag_steps", "eplb_placement_epoch")
    assert not any(math.isnan(gauge(c, name)) for name in measured)
    assert not math.isnan(gauge(c, "eplb_balancedness", kind="current"))
    assert not math.isnan(gauge(c, "eplb_balancedness", kind="projected"))

    leave_all(c)
    hello(c, 0, pid=200)  # a new deployment: nothing of the old one's load is known
    asyncio.run(c._tick())
    doc = shown(c)
    assert doc["load_persistence"] is None and doc["balancedness"] is None and doc["load_reports"] == 0
    for name in measured:
        assert math.isnan(gauge(c, name)), name
    for kind in ("current", "projected"):
        assert math.isnan(gauge(c, "eplb_balancedness", kind=kind)), kind


def test_uptime_does_not_follow_the_wall_clock(monkeypatch):
    """Before: ``uptime_s`` was ``time.time() - start``: a wall clock set back an hour (NTP, an
    operator) made it -3600 s, set forward a day made a coordinator look up for a day."""
    c = coordinator()
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall - 3600.0)
    assert 0 <= shown(c)["uptime_s"] < 60
    monkeypatch.setattr(time, "time", lambda: wall + 86400.0)
    assert 0 <= shown(c)["uptime_s"] < 60


def test_each_rank_row_is_that_ranks_own_record_and_last_seen_is_an_age():
    """A row shows its own rank's step (not the step its load is reported to, nor another rank's),
    and ``last_seen_s`` is seconds since the rank was last heard, not a monotonic timestamp."""
    from eplb_service import protocol

    c = coordinator()
    hello(c, 0, pid=100)
    hello(c, 1, pid=101)
    for rank, step in ((0, 40), (1, 90)):
        record = c.registry.agents[rank]
        c._handle(record.identity, protocol.Heartbeat(rank=rank, step=step, epoch=0, session=record.session))
    rows = shown(c)["ranks"]
    assert [(r["rank"], r["pid"], r["step"], r["load_reported_to_step"]) for r in rows] == [
        (0, 100, 40, 0),
        (1, 101, 90, 0),
    ]
    assert all(0 <= r["last_seen_s"] < 60 for r in rows), rows


def test_last_plans_are_the_newest_ten_oldest_first():
    """The coordinator keeps 100 outcomes; the document shows the last 10 (what just happened),
    not the first 10 of its life."""
    from eplb_service.coordinator.plan_runner import PlanOutcome

    c = coordinator()
    for n in range(1, 13):
        c.plans.outcomes.append(
            PlanOutcome(
                plan_id=1000 + n,
                phase="committed",
                reason="",
                number=n,
                code="",
                layers=[0],
                bytes_moved=0,
                experts_moved=0,
                commit_step=10 * n,
                staging_s=0.0,
                voting_s=0.0,
                max_stall_s=0.0,
            )
        )
    assert [o["number"] for o in shown(c)["last_plans"]] == list(range(3, 13))


def test_a_number_that_is_not_finite_reads_null_inside_lists_too():
    """``last_plans`` is a list of dicts of floats (stall and phase times): a NaN there must read
    ``null`` as it does at the top level, not make ``status_json`` raise (no ``/status`` answer)."""
    doc = {"last_plans": [{"max_stall_s": math.nan, "layers": [0, 1]}], "pair": (math.inf, 1.5), "x": -math.inf}
    assert json.loads(status_json(doc)) == {
        "last_plans": [{"max_stall_s": None, "layers": [0, 1]}],
        "pair": [None, 1.5],
        "x": None,
    }


def test_load_reports_are_counted_and_the_lag_is_how_far_reports_trail_the_steps():
    """``eplb_load_reports_total`` grows by one per report taken, and ``eplb_load_report_lag_steps``
    is the newest step seen less the newest report's end: positive when reports trail."""
    from eplb_service import protocol

    c = coordinator()
    hello(c, 0, pid=100)
    hello(c, 1, pid=101)
    record = c.registry.agents[0]
    c._handle(record.identity, protocol.Heartbeat(rank=0, step=50, epoch=0, session=record.session))
    for step in (10, 20, 30):
        for rank in (0, 1):
            load_report(c, rank, step)
    assert gauge(c, "eplb_load_reports_total") == 6
    assert gauge(c, "eplb_load_report_lag_steps") == 20
