"""Metric names follow Prometheus conventions, and the Grafana dashboard only uses real ones."""

from __future__ import annotations

import json
import pathlib
import re

from prometheus_client import generate_latest

from eplb_service.coordinator.metrics import CoordinatorMetrics

DASHBOARD = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "eplb-service-dashboard.json"
REQUIRED = {
    "eplb_balancedness",
    "eplb_plans_total",
    "eplb_plans_aborted_total",
    "eplb_moved_bytes_total",
    "eplb_plan_phase_seconds",
    "eplb_commit_stall_seconds",
    "eplb_agent_up",
    "eplb_agents_alive",
    "eplb_load_report_lag_steps",
    "eplb_messages_rejected_total",
    "eplb_messages_resent_total",
}


def exposed_names() -> dict[str, str]:
    text = generate_latest(CoordinatorMetrics().registry).decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def test_names_follow_prometheus_conventions():
    names = exposed_names()
    for name, kind in names.items():
        assert name.startswith("eplb_"), name
        assert re.fullmatch(r"[a-z_]+", name), name
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name} must not end in _total"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"histogram {name} should carry its unit"
    assert REQUIRED <= set(names), REQUIRED - set(names)


def test_dashboard_queries_only_exposed_metrics():
    names = set(exposed_names())
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"eplb_[a-z_]+", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", metric))
    assert used and used <= names, used - names
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def samples(registry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}


def test_measured_gauges_read_nan_until_there_is_a_value_and_outcomes_are_final():
    import math

    from eplb_service import __version__
    from eplb_service.protocol import PROTOCOL_VERSION

    values = samples(CoordinatorMetrics().registry)
    for kind in ("current", "projected"):
        assert math.isnan(values[("eplb_balancedness", (("kind", kind),))])
    assert math.isnan(values[("eplb_placement_epoch", ())])
    assert math.isnan(values[("eplb_load_report_lag_steps", ())])
    outcomes = {dict(labels)["outcome"] for name, labels in values if name == "eplb_plans_total"}
    assert outcomes == {"committed", "aborted", "diverged", "skipped"}  # proposals are counted apart
    assert values[("eplb_plans_proposed_total", ())] == 0
    assert values[("eplb_build_info", (("protocol", str(PROTOCOL_VERSION)), ("version", __version__)))] == 1


def test_agent_counters_from_heartbeats_and_stalls_per_rank_reach_prometheus():
    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    rank0, rank1 = c.registry.agents[0], c.registry.agents[1]
    c._handle(
        rank0.identity,
        protocol.Heartbeat(
            rank=0,
            step=5,
            epoch=0,
            session=rank0.session,
            counters={"committed": 3, "integrity_failures": 1, "bytes_received": 4096},
        ),
    )
    c._handle(
        rank1.identity, protocol.Heartbeat(rank=1, step=5, epoch=0, session=rank1.session, counters={"committed": 2})
    )
    c._handle(
        rank1.identity,
        protocol.Committed(rank=1, plan_id=1, commit_step=5, epoch=0, stall_s=2e-4, session=rank1.session),
    )
    values = samples(c.metrics.registry)
    assert values[("eplb_agent_events_total", (("event", "committed"), ("rank", "0")))] == 3
    assert values[("eplb_agent_events_total", (("event", "integrity_failures"), ("rank", "0")))] == 1
    assert values[("eplb_agent_events_total", (("event", "committed"), ("rank", "1")))] == 2
    assert values[("eplb_agent_received_bytes_total", (("rank", "0"),))] == 4096
    assert values[("eplb_agent_received_bytes_total", (("rank", "1"),))] == 0
    assert not any(
        name == "eplb_agent_events_total" and ("event", "bytes_received") in labels for name, labels in values
    )
    assert values[("eplb_commit_stall_seconds_count", (("rank", "1"),))] == 1
    assert math_isnan(values[("eplb_placement_epoch", ())]) is False  # both ranks report epoch 0: adopted


def math_isnan(value: float) -> bool:
    import math

    return math.isnan(value)


def test_abort_reasons_are_codes_not_text():
    import numpy as np

    from eplb_service.coordinator.plan_state import PlanRun

    plan = PlanRun(
        plan_id=1,
        base_epoch=0,
        layers=[0],
        rows=np.zeros((1, 8), dtype=np.int64),
        world_size=2,
        staging_timeout_s=10,
        voting_timeout_s=10,
        started_at=0.0,
    )
    plan.on_failed(1, "rank 3: plan 7 needs 9 bytes of staging, more than the budget", 1.0, code="invalid_plan")
    assert plan.phase.value == "aborted" and plan.code == "invalid_plan" and "rank 1" in plan.reason


PROMETHEUS_ACCEPT = (  # what Prometheus sends by default when it scrapes
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def scrape(port: int, accept: str | None) -> tuple[str, str]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


def test_metrics_parse_as_text_and_as_openmetrics_when_the_scraper_asks_for_it(tmp_path):
    """Before: ``Accept`` was ignored, so Prometheus got the classic text format, where every
    counter's ``_created`` is a gauge of its own (``eplb_plans_created{outcome}``, one per rank
    for the stall histogram): series nobody documented or meant, stored by every scrape."""
    import time

    from coordinator_thread import CoordinatorThread
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    from eplb_service.coordinator.config import CoordinatorConfig

    cfg = CoordinatorConfig(world_size=2, endpoint=f"ipc://{tmp_path}/c.sock", metrics_port=0, http_host="127.0.0.1")
    thread = CoordinatorThread(cfg).start()
    try:
        while thread.coordinator.metrics_port is None:
            time.sleep(0.02)
        port = thread.coordinator.metrics_port
        plain = scrape(port, None)
        old_style = scrape(port, "text/plain;version=0.0.4")
        openmetrics = scrape(port, PROMETHEUS_ACCEPT)
    finally:
        thread.stop()
    for content_type, text in (plain, old_style):
        assert content_type.startswith("text/plain"), content_type
        families = {f.name: f for f in parse_text(text)}
        assert families["eplb_plans"].type == "counter" and families["eplb_balancedness"].type == "gauge"
    content_type, text = openmetrics
    assert content_type.startswith("application/openmetrics-text; version=1.0.0"), content_type
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["eplb_plans"].type == "counter"
    assert {s.labels["outcome"] for s in families["eplb_plans"].samples if s.name == "eplb_plans_total"} == set(
        ("committed", "aborted", "diverged", "skipped")
    )
    assert families["eplb_plan_phase_seconds"].type == "histogram"
    assert not any(name.endswith("_created") for name in families), sorted(families)
    text_names = {f.name for f in parse_text(plain[1])}
    assert set(families) == {name for name in text_names if not name.endswith("_created")}


def test_docs_and_alert_rules_name_only_exposed_metrics():
    """Before: docs/FAILURE_MODEL.md told operators to watch ``eplb_agent_internal_errors{rank}``,
    which no coordinator exports (it is ``eplb_agent_events_total{rank,event="internal_errors"}``)."""
    root = DASHBOARD.parent.parent.parent
    names = set(
        re.findall(r"^# TYPE (\S+) ", generate_latest(CoordinatorMetrics(lambda: {0: {}}).registry).decode(), re.M)
    )
    for doc in (
        "README.md",
        "docs/FAILURE_MODEL.md",
        "deploy/k8s/README.md",
        "deploy/k8s/monitoring/prometheusrule.yaml",
    ):
        for metric in set(re.findall(r"\beplb_[a-z_]+", (root / doc).read_text())) - {"eplb_service"}:
            if metric.startswith("eplb_service_"):
                continue
            assert re.sub(r"_(bucket|sum|count)$", "", metric) in names, f"{doc} names {metric}, which is not exported"


def _hello(rank: int, world: int) -> "object":
    from eplb_service import protocol
    from eplb_service.placement import PlacementShape, initial_phy2log

    shape = PlacementShape(1, world, world, world)
    return protocol.Hello(
        protocol_version=protocol.PROTOCOL_VERSION,
        rank=rank,
        model=protocol.ModelShape(1, world, world, world, 36),
        phy2log=protocol.NDArray.from_numpy(initial_phy2log(shape)),
        epoch=0,
        step=0,
        transport="gloo",
        store_host="127.0.0.1" if rank == 0 else "",
        store_port=1 if rank == 0 else 0,
    )


def test_agent_up_follows_each_rank_from_the_start_through_registration_and_loss():
    import time

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.server import Coordinator
    from eplb_service.testing.protocol_fuzz import SocketSink

    c = Coordinator(CoordinatorConfig(world_size=4, endpoint="ipc:///nonexistent/up.sock"))
    c._sock = SocketSink()

    def up() -> dict[str, float]:
        values = samples(c.metrics.registry)
        return {dict(labels)["rank"]: v for (name, labels), v in values.items() if name == "eplb_agent_up"}

    assert up() == {"0": 0, "1": 0, "2": 0, "3": 0}  # every rank's series before anyone registers
    c._handle(b"rank-1", _hello(1, 4))
    c._handle(b"rank-3", _hello(3, 4))
    assert up() == {"0": 0, "1": 1, "2": 0, "3": 1}
    assert samples(c.metrics.registry)[("eplb_agents_alive", ())] == 2
    c.router.lose_agent(c.registry.agents[3], time.monotonic())
    assert up() == {"0": 0, "1": 1, "2": 0, "3": 0}
    assert samples(c.metrics.registry)[("eplb_agents_alive", ())] == 1


def test_a_registration_touches_its_own_rank_series_not_every_ranks():
    """A registration storm at 1024 ranks cost ranks² label look-ups when every registration
    refreshed every rank's ``eplb_agent_up``."""
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.server import Coordinator
    from eplb_service.testing.protocol_fuzz import SocketSink

    world = 64
    c = Coordinator(CoordinatorConfig(world_size=world, endpoint="ipc:///nonexistent/storm.sock"))
    c._sock = SocketSink()
    looked_up: list[tuple] = []
    original = c.metrics.agent_up.labels

    def counting(*args, **kwargs):
        looked_up.append(args)
        return original(*args, **kwargs)

    c.metrics.agent_up.labels = counting  # type: ignore[method-assign]
    for rank in range(world):
        c._handle(f"rank-{rank}".encode(), _hello(rank, world))
    assert c.registry.complete
    assert len(looked_up) <= 2 * world, f"{len(looked_up)} agent_up look-ups for {world} registrations"


def test_copies_of_a_comm_init_sent_again_are_counted_by_message():
    """``eplb_messages_resent_total{message}``: a lost message on the link shows as a copy sent again."""
    import time

    from eplb_service import protocol
    from eplb_service.testing.protocol_fuzz import HandlerHarness

    c = HandlerHarness().coordinator
    sent: list[tuple[bytes, protocol.Message]] = []
    c.send = lambda identity, message: sent.append((identity, message))
    c.rebuild_comm()
    rank0, rank1 = c.registry.agents[0], c.registry.agents[1]
    rank0.comm_generation = c.side_comm.generation  # rank 0 built it; rank 1's copy was lost
    sent.clear()
    c._resend_comm_init(time.monotonic() + 0.6)
    assert [(identity, type(m).__name__) for identity, m in sent] == [(rank1.identity, "CommInit")]
    values = samples(c.metrics.registry)
    assert values[("eplb_messages_resent_total", (("message", "CommInit"),))] == 1
    assert values[("eplb_messages_resent_total", (("message", "Plan"),))] == 0
