"""Every message the coordinator receives, routed by its type to the part that acts on it.

A ``Hello`` goes to registration (``registration``: the admission checks, the rank's record,
its ``Welcome``); every other agent message is accepted only from the connection, and with the
session, that registered its rank, and is filed under that rank whatever rank it names.
Heartbeats feed liveness, the epoch agreement and the divergence watches; plan events go to the
plan runner; load reports to the book. A rank lost (goodbye, silence, a placement to resync)
is taken off here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Protocol

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.guards import DivergenceGuard
from eplb_service.coordinator.placement_book import LoadRejected, PlacementBook
from eplb_service.coordinator.plan_runner import PlanRunner
from eplb_service.coordinator.registration import Registrar, RegistrationHost
from eplb_service.coordinator.registry import AgentRecord, Registry
from eplb_service.coordinator.status_doc import status_json
from eplb_service.log_throttle import LogThrottle

MAX_STEP_LEAP = 1_000_000
"""Most steps a heartbeat or load report may be past its rank's last known step (hours of serving)."""

LOAD_SILENCE_REPORTS = 20
"""Report intervals a heartbeating rank may step past its last load report before it is called
silent: its traffic is then missing from the load window, and plans balance the other ranks' alone."""


def newest_epoch(record: AgentRecord, reported: int) -> int:
    """The rank's epoch after a heartbeat or ``Committed`` reporting ``reported``: never lower than
    what it reported before.

    A rank's epoch counts its commits, so it only grows while the rank is registered (a restarted
    process registers anew, and its ``Hello`` sets the epoch). A lower one is a stale report. On
    one ZeroMQ connection messages keep their order, an agent sends a plan's ``Committed`` once and
    before anything of a later epoch (its next vote waits until that ticket is reported), and the
    frames of a connection its rank replaced are refused as from an unknown agent; so only a link
    that duplicates or reorders (the fault proxy does both) delivers one. Taken as the rank's epoch
    it set the deployment's agreed epoch back (``PlacementBook.agree``: every rank's stale
    heartbeat made the book agree on the old epoch, and the next plan named a base epoch nobody
    served), and one older than the book's history got the rank declared dead."""
    return max(record.epoch, reported)


class RouterHost(RegistrationHost, Protocol):
    """What the router needs of the coordinator's shell: registration's needs and these."""

    def status(self) -> dict: ...

    def deployment_gone(self) -> None: ...

    def record_load(self, logical, report: protocol.LoadReport, rank: int) -> None: ...

    def watch(self, now: float) -> None: ...


class MessageRouter:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        registry: Registry,
        book: PlacementBook,
        guard: DivergenceGuard,
        runner: PlanRunner,
        metrics,
        log: logging.LoggerAdapter,
        host: RouterHost,
    ) -> None:
        self.cfg, self.registry, self.book, self.guard, self.runner = cfg, registry, book, guard, runner
        self.metrics, self.log, self.host = metrics, log, host
        self.throttle = LogThrottle(log)
        """Lines one misbehaving sender would repeat per message (``log_throttle``), keyed by what and who."""
        self.registrar = Registrar(
            host=host,
            registry=registry,
            book=book,
            runner=runner,
            guard=guard,
            cfg=cfg,
            metrics=metrics,
            log=log,
            throttle=self.throttle,
            update_epoch=self.update_epoch,
            update_liveness_metrics=self.update_liveness_metrics,
        )
        """Every ``Hello`` goes there: admission, registration, and which processes make up the deployment."""
        self._agent_handlers: dict[type, Callable[[AgentRecord, protocol.Message, float], None]] = {
            protocol.Heartbeat: self._on_heartbeat,
            protocol.LoadReport: self._on_load,
            protocol.Staged: self._on_staged,
            protocol.Failed: self._on_failed,
            protocol.Aborted: self._on_failed,
            protocol.Voted: self._on_voted,
            protocol.Committed: self._on_committed,
            protocol.Goodbye: self._on_goodbye,
        }

    def handle(self, identity: bytes, message: protocol.Message) -> None:
        if isinstance(message, protocol.Hello):
            self.registrar.on_hello(identity, message)
        elif isinstance(message, protocol.StatusRequest):
            self.host.send(identity, self.status_reply())
        elif isinstance(message, protocol.CoordinatorMessage.__args__):
            self._refuse_coordinator_message(identity, message)
        else:
            self._on_agent_message(identity, message)

    def status_reply(self) -> protocol.StatusReply:
        return protocol.StatusReply(status_json=status_json(self.host.status()).encode())

    def _refuse_coordinator_message(self, identity: bytes, message: protocol.Message) -> None:
        """A message only the coordinator sends came to it: a bug or a probe, whoever sent it.
        Said as such (not as a stale session, which would only make an agent register again)."""
        name = type(message).__name__
        record = self.registry.by_identity(identity)
        self.metrics.messages_rejected.labels("coordinator_only").inc()
        self.throttle.report(
            ("coordinator_only", identity),
            logging.WARNING,
            "refused %s from %s: only the coordinator sends %s",
            name,
            f"rank {record.rank}" if record is not None else repr(identity),
            name,
        )
        self.host.send(
            identity,
            protocol.Reject(
                reason=f"{name} is a message only the coordinator sends; agents and clients do not send it",
                code="bad_message",
            ),
        )

    # -- agent messages ------------------------------------------------------------------

    def _on_agent_message(self, identity: bytes, message: protocol.Message) -> None:
        now = time.monotonic()
        record = self.registry.by_identity(identity)
        if record is None:
            self.metrics.messages_rejected.labels("unknown_agent").inc()
            self.host.send(
                identity, protocol.Reject(reason=f"unknown agent {identity!r}: send Hello first", code="unknown_agent")
            )
            return
        handler = self._agent_handlers.get(type(message))
        if handler is None or message.rank != record.rank or not record.speaks_for(message.session):
            # Filed under the rank the connection registered, never the rank a message names.
            self.metrics.messages_rejected.labels("session").inc()
            name = type(message).__name__
            named = f"rank {getattr(message, 'rank', '-')}, session {getattr(message, 'session', '-')}"
            self.throttle.report(
                ("session", record.rank),
                logging.WARNING,
                "refused %s naming %s from the connection of rank %d (session %d)",
                name,
                named,
                record.rank,
                record.session,
            )
            # The connection's own session is not echoed: naming what the message said, and
            # which of the two is off, is what its sender needs to see its mistake.
            wrong = " and ".join(
                what
                for what, off in (
                    ("rank", getattr(message, "rank", None) != record.rank),
                    ("session", getattr(message, "session", None) != record.session),
                )
                if off
            )
            self.host.send(
                identity,
                protocol.Reject(
                    reason=f"{name} names {named}; this connection registered rank {record.rank} under another "
                    f"session ({wrong} differ): send Hello again",
                    code="stale_session",
                ),
            )
            return
        record.last_seen = now
        # Only a message under this registration's own session shows its Welcome arrived.
        record.session_heard = record.session_heard or message.session == record.session
        if isinstance(message, protocol.Committed):  # even from a rank declared dead: the step is a fact
            self._learn_commit_step(record, message)
        if not record.alive:
            self.throttle.report(
                ("back_after_dead", record.rank),
                logging.WARNING,
                "rank %d is back after being declared dead; it must register again",
                record.rank,
            )
            self.host.send(
                identity,
                protocol.Reject(
                    reason=f"unknown agent {identity!r}: declared dead, send Hello again", code="unknown_agent"
                ),
            )
            return
        if (
            isinstance(message, (protocol.Heartbeat, protocol.Committed))
            and message.epoch >= record.epoch  # an older one is a stale report, not a placement to learn
            and self.book.unknown(message.epoch, self.runner.next_epoch_in_flight)
        ):
            self._resync(record, message.epoch, now)
            return
        handler(record, message, now)

    def _learn_commit_step(self, record: AgentRecord, message: protocol.Committed) -> None:
        """Feed the epoch watch; a plan this coordinator never proposed is said out loud.

        It is legitimate after a restart (the plan was decided before it), so the commit step
        still counts; but then this one rank's report is the only evidence for it, and if a
        divergence halt follows, the log line and the halt both name the rank it came from."""
        if not self.runner.knows(message.plan_id):
            self.log.warning(
                "rank %d committed plan id %d into placement epoch %d at step %d, a plan this coordinator has no "
                "record of (decided before it started?); its commit step is taken on that rank's word",
                record.rank,
                message.plan_id,
                message.epoch,
                message.commit_step,
            )
        self.guard.epoch_watch.committed(message.epoch, message.commit_step, record.rank)

    def _step_leap(self, record: AgentRecord, step: int, what: str) -> bool:
        """Whether ``step`` leaps implausibly far past the rank's last known step (then refused, logged,
        and the sender told with a ``bad_message`` Reject naming the step).

        One absurd step (2**62) would fast-forward the load window's decay for good and put the
        rank ahead of every commit step; a real rank reports every second or so, far less apart."""
        if step - record.step <= MAX_STEP_LEAP:
            return False
        self.metrics.messages_rejected.labels("bad_step").inc()
        detail = (
            f"{what} at step {step} is {step - record.step} steps past rank {record.rank}'s last known step "
            f"{record.step}; at most {MAX_STEP_LEAP} expected"
        )
        self.throttle.report(("step_leap", record.rank), logging.WARNING, "rank %d: %s; dropped", record.rank, detail)
        self._refuse(record, f"{detail}; dropped")
        return True

    def _refuse(self, record: AgentRecord, detail: str) -> None:
        """Tell a registered rank that its message broke the protocol and was dropped: without a
        word its sender could only guess why nothing came of it (an agent logs the detail)."""
        self.host.send(record.identity, protocol.Reject(reason=detail, code="bad_message"))

    def _on_heartbeat(self, record: AgentRecord, message: protocol.Heartbeat, now: float) -> None:
        if self._step_leap(record, message.step, "heartbeat"):
            return
        self.host.send(record.identity, protocol.HeartbeatAck(session=record.session))
        if not record.take_heartbeat(message):
            # A link's late copy: everything in it (epoch, step-clock probes, the decision read)
            # is older than the heartbeat already taken, so nothing in it is news, and its epoch
            # and step would set the watches' view of the rank back (see ``take_heartbeat``).
            self.log.debug(
                "rank %d: heartbeat of step %d arrived after one of step %d (a late copy): not taken",
                record.rank,
                message.step,
                record.heartbeat_step,
            )
            return
        record.epoch = newest_epoch(record, message.epoch)
        self.guard.heartbeat(record.rank, message.epoch, message.step, message.clock)
        self.book.max_step_seen = max(self.book.max_step_seen, message.step)
        if message.decided_plan:  # before the epoch it reports is judged: the decision names S
            self._learn_decision(
                record,
                message.decided_plan,
                message.decided_commit_step,
                message.decided_commit,
                "heartbeat",
                message.decided_code,
            )
        self.runner.heartbeat(record.rank, message.step, message.epoch, now, message.staging_plan)
        self.update_epoch()
        self.host.watch(now)
        self._watch_load_reports(record)

    def _watch_load_reports(self, record: AgentRecord) -> None:
        """Warn when a rank steps on but its load reports stopped (or never came): nothing else would
        show that the window, and so every plan, leaves its traffic out. Counted in steps, not
        seconds, so an idle engine (no steps, no reports) is never called silent."""
        since = record.load_reported_to
        if record.step - since > LOAD_SILENCE_REPORTS * self.cfg.agent.report_interval_steps:
            self.throttle.report(
                ("no_load_reports", record.rank),
                logging.WARNING,
                "rank %d heartbeats at step %d but sent no load report since step %d (%d steps, over %d report "
                "intervals): its load is missing from the window, plans balance the other ranks' traffic alone",
                record.rank,
                record.step,
                since,
                record.step - since,
                LOAD_SILENCE_REPORTS,
            )

    def _on_load(self, record: AgentRecord, report: protocol.LoadReport, now: float) -> None:
        if self._step_leap(record, report.step_end, "load report"):
            self.metrics.load_reports_dropped.labels("bad_steps").inc()
            return
        record.load_reported_to = max(record.load_reported_to, report.step_end)
        self.throttle.clear(("no_load_reports", record.rank), "rank %d sends load reports again", record.rank)
        try:
            logical = self.book.add_load(report)
        except LoadRejected as exc:
            self.metrics.load_reports_dropped.labels(exc.reason).inc()
            # An epoch the book does not hold is no fault of the sender: a rank flushes the window
            # it counted under the old placement right after a commit, and reports at the new epoch
            # before every rank has committed it (a heartbeat at an unknown epoch asks for a Hello).
            if exc.reason != "unknown_epoch":
                self.throttle.report(
                    ("bad_load_report", record.rank),
                    logging.WARNING,
                    "rank %d sent a bad load report: %s",
                    record.rank,
                    exc,
                )
                self._refuse(
                    record,
                    f"load report of steps {report.step_begin}..{report.step_end} at epoch {report.epoch} dropped "
                    f"({exc.reason}): {exc}",
                )
            return
        self.throttle.clear(("bad_load_report", record.rank), "rank %d's load reports are accepted again", record.rank)
        self.host.record_load(logical, report, record.rank)
        record.step = max(record.step, report.step_end)
        self.metrics.load_reports.inc()
        self.metrics.load_report_lag.set(self.book.max_step_seen - report.step_end)

    def _on_staged(self, record: AgentRecord, message: protocol.Staged, now: float) -> None:
        self.runner.staged(message.plan_id, record.rank, now, message.bytes_received, message.duration_s)

    def _on_failed(self, record: AgentRecord, message: protocol.Failed | protocol.Aborted, now: float) -> None:
        self.runner.failed(message.plan_id, record.rank, message.reason, message.code, now)

    def _on_voted(self, record: AgentRecord, message: protocol.Voted, now: float) -> None:
        self._learn_decision(record, message.plan_id, message.commit_step, message.ok, "Voted")

    def _learn_decision(
        self, record: AgentRecord, plan_id: int, commit_step: int, ok: bool, via: str, code: str = ""
    ) -> None:
        """A rank read the plan's decision record (``via``: its ``Voted`` or a heartbeat; ``code``: the
        abort code the record names, where the message carries it): the plan in flight books it, and
        a commit step feeds the epoch watch as a ``Committed`` does.

        By the record, every rank is at the plan's new epoch once past ``S``, so a rank seen past it
        at the old epoch went on with the old maps. Fed by ``Committed`` alone, the watch had no
        ``S`` for a commit whose every ``Committed`` was lost (the plan then settles on heartbeats at
        the new epoch): a rank the plan no longer tracked (lost during the vote, back since) could
        serve the old maps past ``S`` unseen."""
        epoch = self.runner.commit_epoch(plan_id)
        self.runner.voted(plan_id, commit_step, ok, record.rank, via, code)
        if ok and epoch is not None:
            self.guard.epoch_watch.committed(epoch, commit_step, record.rank)

    def _on_committed(self, record: AgentRecord, message: protocol.Committed, now: float) -> None:
        if message.plan_id not in record.committed_plans:  # a duplicating link's copy: one commit, one stall
            record.committed_plans.append(message.plan_id)
            self.metrics.commit_stall.labels(str(record.rank)).observe(message.stall_s)
        record.epoch = newest_epoch(record, message.epoch)
        self.update_epoch()
        self.host.watch(now)
        self.runner.committed(message.plan_id, record.rank, message.commit_step, message.stall_s, now)

    def _on_goodbye(self, record: AgentRecord, message: protocol.Goodbye, now: float) -> None:
        self.log.info("rank %d left: %s", record.rank, message.reason)
        self.lose_agent(record, now)

    def _resync(self, record: AgentRecord, epoch: int, now: float) -> None:
        """A rank moved to a placement this coordinator does not know (decided before it
        restarted, committed since): it registers again, and its Hello carries the placement."""
        self.log.info(
            "rank %d reports placement epoch %d, which this coordinator has not seen (decided before it "
            "started): asking it to register again with its placement",
            record.rank,
            epoch,
        )
        self.host.send(
            record.identity,
            protocol.Reject(reason=f"placement epoch {epoch} is unknown here: send Hello again", code="unknown_agent"),
        )
        self.lose_agent(record, now)

    def update_epoch(self) -> None:
        """The deployment's epoch is the one every rank reports; while they disagree (between a
        decided commit and its step, or a rank that is not what it claims) the last agreed one
        stands and no plan starts."""
        before = self.book.epoch
        epoch = self.book.agree([r.epoch for r in self.registry.alive])
        if epoch is not None:
            self.log.info(
                "every rank reports placement epoch %d"
                if before >= 0
                else "placement epoch %d adopted from the agents",
                epoch,
            )
            self.metrics.epoch.set(epoch)

    def lose_agent(self, record: AgentRecord, now: float) -> None:
        record.alive = False
        self.registry.remove(record.rank)
        self.host.invalidate_comm()
        self.runner.agent_lost(record.rank, now)
        self.update_liveness_metrics([record.rank])
        alive = self.registry.alive
        if not alive:
            self.host.deployment_gone()
        elif all(r.restarted for r in alive):
            if any(r.epoch != self.book.epoch for r in alive):
                self.registrar.restarted_deployment(alive)
            else:  # they serve the deployment's placement: they carry it on
                for r in alive:
                    r.restarted = False

    def update_liveness_metrics(self, ranks: Iterable[int] | None = None) -> None:
        """``eplb_agents_alive`` and ``eplb_agent_up`` for ``ranks`` (None: every rank). A
        registration or a loss changes one rank: refreshing all of them each time made a
        registration storm cost ranks² label look-ups (seconds of the event loop at 1024 ranks)."""
        self.metrics.agents_alive.set(len(self.registry.alive))
        for rank in range(self.cfg.world_size) if ranks is None else ranks:
            record = self.registry.agents.get(rank)
            self.metrics.agent_up.labels(str(rank)).set(1 if record is not None and record.alive else 0)
