"""Prometheus metrics of one coordinator, on its own registry (tests run several).

Gauges that describe something measured (balancedness, epoch, report lag) read NaN until
there is a value, so a dashboard never shows a made-up 0. The agents' own counters reach
Prometheus through the heartbeats: :class:`AgentCounters` exports the latest value each
rank reported, per rank.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from eplb_service import __version__
from eplb_service.protocol import AGENT_COUNTERS, PROTOCOL_VERSION

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STALL_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)

PLAN_OUTCOMES = ("committed", "aborted", "diverged", "skipped")
"""Final outcomes of a planning round (``eplb_plans_total``); proposals are counted apart."""
RESENT_MESSAGES = ("Plan", "VoteNow", "AbortPlan", "CommInit")
"""The messages the coordinator sends again to the ranks that have not answered (``eplb_messages_resent_total``)."""
NAN = float("nan")


AGENT_BYTE_COUNTERS = {"bytes_received": "eplb_agent_received_bytes"}
"""Agent counters that count bytes, not events: each is a metric of its own, so that no sum over
``eplb_agent_events_total`` adds bytes to commits."""


class AgentCounters:
    """A collector of what the agents count, from the latest heartbeat of each rank.

    Events go to ``eplb_agent_events_total{rank,event}``; byte counters to their own metric
    (:data:`AGENT_BYTE_COUNTERS`, e.g. ``eplb_agent_received_bytes_total{rank}``).
    """

    def __init__(self, source: Callable[[], dict[int, dict[str, int]]]) -> None:
        self.source = source

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, dict[str, CounterMetricFamily]]:
        events = CounterMetricFamily(
            "eplb_agent_events",
            "What each rank's agent counted since it started (from its heartbeats)",
            labels=["rank", "event"],
        )
        byte_families = {
            counter: CounterMetricFamily(
                name, f"Bytes each rank's agent counted as {counter} (heartbeats)", labels=["rank"]
            )
            for counter, name in AGENT_BYTE_COUNTERS.items()
        }
        return events, byte_families

    def describe(self) -> Iterable:
        events, byte_families = self._families()
        return [events, *byte_families.values()]

    def collect(self) -> Iterable:
        events, byte_families = self._families()
        for rank, counters in sorted(self.source().items()):
            for name in AGENT_COUNTERS:
                value = float(counters.get(name, 0))
                if name in byte_families:
                    byte_families[name].add_metric([str(rank)], value)
                else:
                    events.add_metric([str(rank), name], value)
        yield events
        yield from byte_families.values()


class CoordinatorMetrics:
    def __init__(self, agent_counters: Callable[[], dict[int, dict[str, int]]] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Gauge(
            "eplb_build_info",
            "Always 1: its labels name this coordinator's version and its wire protocol version",
            ["version", "protocol"],
            registry=r,
        )
        self.build_info.labels(__version__, str(PROTOCOL_VERSION)).set(1)
        self.agents_alive = Gauge("eplb_agents_alive", "Agents registered and heard from recently", registry=r)
        self.agent_up = Gauge("eplb_agent_up", "1 while the agent of this rank is alive", ["rank"], registry=r)
        self.balancedness = Gauge(
            "eplb_balancedness",
            "Model balancedness (mean/max rank load) of the load window (NaN until load is reported)",
            ["kind"],
            registry=r,
        )
        self.load_persistence = Gauge(
            "eplb_load_persistence",
            "Share of the load's imbalance that lasted from one load-window segment to the next, as "
            "the last plan used it (1: lasts; NaN until a plan)",
            registry=r,
        )
        self.move_price_scale = Gauge(
            "eplb_move_price_scale",
            "The migration policy's spend scale for its next plan (1: its defaults; below 1: moves made "
            "cheaper because its plans moved far fewer slots than DeepSeek's would have; above 1: dearer, "
            "its fine pass narrowed, because they moved close to a fifth of DeepSeek's)",
            registry=r,
        )
        self.move_price_scale.set(1.0)
        self.balance_lead = Gauge(
            "eplb_balance_lead",
            "How much better the placements served balanced the load windows than DeepSeek's shadow "
            "placements would have, in balancedness (faded over about three rebalances; 0.01 is one "
            "point ahead, negative behind)",
            registry=r,
        )
        self.balance_lead.set(0.0)
        self.step_price_scale = Gauge(
            "eplb_step_price_scale",
            "Extra factor on the migration policy's price of a moved slot for its next plan (1: none; "
            "doubled, up to 8, after each rebalance where its placements led DeepSeek's balance while its "
            "plans moved close to a fifth of DeepSeek's slots; held down to 12% of them; halved toward 1 "
            "below that or when behind; above 1 the price fades with the load's persistence to no less "
            "than 0.08 of itself)",
            registry=r,
        )
        self.step_price_scale.set(1.0)
        self.epoch = Gauge(
            "eplb_placement_epoch",
            "Placement epoch every rank reports (commits applied; NaN until the ranks agree)",
            registry=r,
        )
        self.plans = Counter(
            "eplb_plans_total",
            "Planning rounds by final outcome (committed, aborted, diverged, skipped: no gain worth moving for)",
            ["outcome"],
            registry=r,
        )
        self.plans_proposed = Counter("eplb_plans_proposed_total", "Plan batches sent to the agents", registry=r)
        self.plans_aborted = Counter(
            "eplb_plans_aborted_total", "Aborted plan batches by reason code", ["reason"], registry=r
        )
        self.bytes_moved = Counter("eplb_moved_bytes_total", "Expert bytes moved by committed plans", registry=r)
        self.experts_moved = Counter(
            "eplb_moved_experts_total", "Physical slots whose expert changed in committed plans", registry=r
        )
        self.phase_seconds = Histogram(
            "eplb_plan_phase_seconds", "Time spent per plan phase", ["phase"], buckets=_DURATION_BUCKETS, registry=r
        )
        self.commit_stall = Histogram(
            "eplb_commit_stall_seconds",
            "Serving-thread time of one commit on one rank",
            ["rank"],
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self.load_reports = Counter("eplb_load_reports_total", "Load reports received", registry=r)
        self.load_reports_dropped = Counter(
            "eplb_load_reports_dropped_total", "Load reports dropped", ["reason"], registry=r
        )
        self.load_report_lag = Gauge(
            "eplb_load_report_lag_steps",
            "Steps between the newest step seen and the newest report's end (NaN until a report arrives)",
            registry=r,
        )
        self.messages_rejected = Counter("eplb_messages_rejected_total", "Messages refused", ["reason"], registry=r)
        self.comm_generation = Gauge("eplb_side_comm_generation", "Generation of the side communicator", registry=r)
        self.messages_resent = Counter(
            "eplb_messages_resent_total",
            "Copies of a message sent again to ranks that had not answered it (a lost message costs one)",
            ["message"],
            registry=r,
        )
        for message in RESENT_MESSAGES:
            self.messages_resent.labels(message)  # every series from the start, at 0
        self.loop_stall_seconds = Counter(
            "eplb_coordinator_loop_stall_seconds_total",
            "Seconds the coordinator's loop ran late by more than its slack (host starved, SIGSTOP, a handler "
            "holding the loop): left out of the ranks' silence",
            registry=r,
        )
        self.internal_errors = Counter(
            "eplb_internal_errors_total",
            "Unexpected exceptions the coordinator survived, by where",
            ["where"],
            registry=r,
        )
        self.recording_errors = Counter(
            "eplb_recording_errors_total", "Load-trace recording failures (recording then stops)", registry=r
        )
        self.recording_enabled = Gauge(
            "eplb_recording_enabled", "1 while load windows are being recorded (--record)", registry=r
        )
        self.step_clock_offset = Gauge(
            "eplb_step_clock_offset_steps",
            "Steps this rank counts ahead of the reference rank (NaN until verified)",
            ["rank"],
            registry=r,
        )
        if agent_counters is not None:
            r.register(AgentCounters(agent_counters))
        self.forget_measurements()
        # Export every known label from the start, so dashboards and alerts see zeros, not gaps.
        for outcome in PLAN_OUTCOMES:
            self.plans.labels(outcome)
        for phase in ("policy", "staging", "voting"):
            self.phase_seconds.labels(phase)

    def forget_measurements(self) -> None:
        """Every gauge that describes the deployment's load or placement back to NaN ("not measured
        yet"): at the start, and for a new deployment under this coordinator, whose load and
        placement are not the previous one's. Counters stay: they count this coordinator's life."""
        for kind in ("current", "projected"):
            self.balancedness.labels(kind).set(NAN)
        self.load_persistence.set(NAN)
        self.load_report_lag.set(NAN)
        self.epoch.set(NAN)
