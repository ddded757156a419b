"""Metric names follow Prometheus conventions, and the Grafana dashboard only uses real ones."""

from __future__ import annotations

import json
import pathlib
import re

from prometheus_client import generate_latest

from eplb_service.coordinator.metrics import CoordinatorMetrics

DASHBOARD = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "eplb-service-dashboard.json"
REQUIRED = {
    "eplb_balancedness", "eplb_plans_total", "eplb_plans_aborted_total", "eplb_moved_bytes_total",
    "eplb_plan_phase_seconds", "eplb_commit_stall_seconds", "eplb_agent_up", "eplb_agents_alive",
    "eplb_load_report_lag_steps", "eplb_messages_rejected_total",
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
