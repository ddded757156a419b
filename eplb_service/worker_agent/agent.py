"""The worker agent: its background thread, and the object the host process holds.

One agent per EP rank. The host (vLLM plugin or the simulated serving loop) builds an
:class:`~.expert_model.ExpertModel`, creates a :class:`WorkerAgent`, calls ``start()``,
and from then on calls ``agent.hooks.before_step()`` / ``agent.hooks.after_step(load)``
from its serving loop. Everything else happens on the agent's own thread: this module is
its control loop (registration, heartbeats, load reports, the side communicator, plan
intake); the staging pipeline (``staging_pipeline``) and the vote (``commit_vote``) are
units of their own.

Plan life on an agent: ``Plan`` → validate → stage → ``Staged`` → ``VoteNow`` → vote and
propose to the plan's decision record → the serving thread applies the plan at step ``S``
exactly when the record says ``commit`` → ``Committed`` / ``Aborted``. At any failure the
maps stay untouched.

The loop is supervised: an unexpected exception is logged with its traceback, counted
(``internal_errors``, sent in heartbeats) and turns into a clean reset (a plan not yet voted
is dropped, one in its vote is asked to abort in the record, the transport is torn down, and
the agent registers again on a fresh socket), never a dead thread.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import cast

import msgspec
import numpy as np

from eplb_service import protocol
from eplb_service.deployment_id import deployment_id_problem
from eplb_service.log_throttle import LogThrottle
from eplb_service.logutil import rank_logger
from eplb_service.placement import PlacementError
from eplb_service.security import ClientCurve
from eplb_service.step_clock import PROBE_RADIUS, probes_from_ring
from eplb_service.worker_agent.commit_vote import CommitVoter
from eplb_service.worker_agent.decision import Decider, Decision
from eplb_service.worker_agent.expert_model import ExpertModel
from eplb_service.worker_agent.link import CoordinatorLink
from eplb_service.worker_agent.plan_check import check_plan
from eplb_service.worker_agent.rendezvous import RendezvousError, host_once
from eplb_service.worker_agent.schedule import build_schedule
from eplb_service.worker_agent.serving_hooks import CommitTicket, LoadSnapshot, ServingHooks
from eplb_service.worker_agent.side_link import SideLink
from eplb_service.worker_agent.staging_pipeline import Staged, StagingPipeline
from eplb_service.worker_agent.store_janitor import StoreJanitor
from eplb_service.worker_agent.transport import Transport, TransportError


class PlanAborted(Exception):
    """Staging stopped because the coordinator aborted the plan."""


SILENCE_HEARTBEATS = 4
"""Heartbeat intervals without a word from the coordinator before the agent reopens its
socket (a connection can be dead both ways while both ends believe it open)."""
PlanAnswer = protocol.Staged | protocol.Failed | protocol.Aborted
"""What an agent answers a ``Plan`` with (an ``Aborted`` when it dropped the plan before the vote)."""
ANSWERS_KEPT = 64
"""Answers to ``Plan``s kept for copies of them (one plan batch at a time: a few suffice)."""
ANSWER_AGAIN_S = 0.1
"""Least time between two sends of the same answer to a ``Plan``."""
SILENCE_LIMIT_MAX_S = 60.0
"""The longest silence limit the back-off reaches (see :func:`silence_limit_s`)."""


def silence_limit_s(heartbeat_interval_s: float, silent_reopens: int) -> float:
    """Seconds without a word from the coordinator before the agent reopens its socket.

    Doubles with each reopen that heard nothing since (up to ``SILENCE_LIMIT_MAX_S``): a
    fresh connection needs several round trips (ZeroMQ's handshake, then Hello and Welcome)
    before the coordinator's first word, and over a link slower than the fixed limit allows
    (a WAN link that delivers in bursts, a round trip of seconds) every reopen cut the next
    connection short, so the agent never registered. A coordinator restarted in the
    meantime is still reached at once: the open socket reconnects by itself, and the first
    heartbeat it reads is answered."""
    base = SILENCE_HEARTBEATS * heartbeat_interval_s + 1.0
    return min(base * 2 ** min(silent_reopens, 16), max(base, SILENCE_LIMIT_MAX_S))


class WorkerAgent:
    """Owns the agent thread of one rank. Thread-safe entry points: ``start``, ``stop``.

    About 520 lines, over the ~300 this code base aims at, for a reason: it is one state
    machine, the life of a plan on this rank (received, staging, staged, voted, finished) and
    of the registration it depends on (hello, welcome, session, reopen), and every handler
    below is one of its transitions. The parts that are not transitions live elsewhere: the
    link, the side-communicator build, the staging pipeline, the vote and commit, the checks
    on a plan. Its handlers are also the seams the tests' fault agents override.
    """

    def __init__(
        self,
        model: ExpertModel,
        endpoint: str,
        transport: Transport,
        *,
        ranks_per_node: int | None = None,
        hello_interval_s: float = 0.5,
        refused_retry_s: float = protocol.REFUSED_RETRY_S,
        staged_timeout_s: float = 60.0,
        curve: ClientCurve | None = None,
        staging_budget_bytes: int | None = None,
        config_overrides: dict | None = None,
        deployment: str = "",
    ) -> None:
        problem = deployment_id_problem(deployment) if deployment else None
        if problem is not None:
            raise ValueError(problem)
        self.deployment = deployment
        """Which deployment this rank is of (``Hello.deployment``; ``""``: unknown): the coordinator
        admits no rank of another deployment while this one's ranks are alive."""
        self.model, self.rank, self.endpoint, self.transport = model, model.rank, endpoint, transport
        self.ranks_per_node = ranks_per_node
        self.hello_interval_s = self._hello_backoff_s = hello_interval_s
        self._silent_reopens = 0
        """Reopens in a row that heard nothing from the coordinator since (the silence limit's back-off)."""
        self._stall_said = 0.0
        """``link.last_heard`` of the silence whose own-stall line was logged (one line per silence)."""
        self.refused_retry_s = refused_retry_s
        """How often an agent that cannot join tries again: a ``Hello`` the coordinator refused, and rank 0's
        rendezvous store that could not be hosted (both are for the operator to fix, not for a quick retry)."""
        self.staged_timeout_s = staged_timeout_s
        self.staging_budget_bytes = staging_budget_bytes
        """Most staging bytes this rank allocates for one plan batch; a batch needing more fails here."""
        self.config_overrides = dict(config_overrides or {})
        """``AgentConfig`` fields this instance sets itself, over the coordinator's ``Welcome``."""
        self.config = protocol.AgentConfig()
        self.hooks = ServingHooks(
            model,
            self.config.report_interval_steps,
            self.config.fence_steps,
            self.config.fence_timeout_s,
            decision_timeout_s=self.config.decision_timeout_s,
        )
        self.log = rank_logger(__name__, self.rank)
        self.throttle = LogThrottle(self.log)
        """Lines that repeat per heartbeat, report or retry while a fault lasts (``log_throttle``)."""
        self.stats = collections.Counter()
        self.link = CoordinatorLink(
            self.rank, endpoint, curve if curve is not None else ClientCurve.from_env(), self.stats, self.throttle
        )
        self.phy2log_host = model.phy2log.detach().cpu().numpy().astype(np.int64).copy()
        self._host_epoch = 0
        """The epoch ``phy2log_host`` is the placement of (it lags ``hooks.epoch`` from a commit
        on the serving thread until the agent reports that ticket; see :meth:`_placement`)."""
        self.shape = model.shape
        self.pipeline = StagingPipeline(model, transport, self.rank, ranks_per_node, self.stats)
        self.decider = Decider(self.rank)
        self.voter = CommitVoter(self, model)
        self.side = SideLink(self.rank, transport, self.log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._welcomed = False
        self._idle_reason: str | None = None
        """Why this agent does not register yet (rank 0 could not host the rendezvous store)."""
        self._next_store_attempt = 0.0
        self._refused_reason: str | None = None
        """Why the coordinator last refused this agent's Hello; it asks again every ``refused_retry_s``."""
        self._next_hello = self._next_heartbeat = 0.0
        self._hello_unanswered_since: float | None = None
        """When the first ``Hello`` the coordinator has not answered yet was sent (None: none sent).
        Until welcomed, the coordinator owes this agent nothing but an answer to its ``Hello``."""
        self._session = 0
        """From ``Welcome``; every message carries it, and a Hello after a reopen resumes it."""
        self._store: tuple[str, int] | None = None
        """Rank 0: where the rendezvous store it hosts is reached."""
        self.janitor: StoreJanitor | None = None
        """Rank 0: deletes the store keys of plans and generations every rank is past."""
        self._inbox: collections.deque = collections.deque()
        self._plan: protocol.Plan | None = None
        self._plan_rows: np.ndarray | None = None
        self._staged: Staged | None = None
        self._staged_at = 0.0
        self._abort_requested: int | None = None
        self._seen_plans: collections.deque[int] = collections.deque(maxlen=256)
        self._answers: collections.OrderedDict[int, tuple[PlanAnswer, float]] = collections.OrderedDict()
        """Plan id -> this rank's last answer to that ``Plan`` (``Staged``, ``Failed``, or ``Aborted``
        when it dropped the plan before the vote) and when it went out: a copy of the ``Plan`` is
        answered with it again, so a lost answer costs one re-send, not the plan."""
        self._voted_plans: collections.deque[int] = collections.deque(maxlen=256)
        self._abort_seen: collections.deque[int] = collections.deque(maxlen=256)
        """Plans the coordinator aborted: a ``Plan`` copy held back past its ``AbortPlan`` is not staged."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "WorkerAgent":
        self._thread = threading.Thread(target=self._run, name=f"eplb-agent-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def welcomed(self) -> bool:
        return self._welcomed

    @property
    def session(self) -> int:
        return self._session

    @property
    def busy(self) -> bool:
        """A plan held (received, staging or staged) or a commit armed on the serving hooks.

        Read from any thread: a host that changes the agent's chunking between plans (the GPU
        harness) waits until this is false on every rank."""
        return self._plan is not None or self.hooks.ticket is not None

    def override_config(self, **fields) -> protocol.AgentConfig:
        """Set ``AgentConfig`` fields over the coordinator's, now and after every later ``Welcome``.

        For a host that tunes its own agent while it runs (the GPU harness switches the
        throttle and the chunk size between phases). The fields join ``config_overrides``,
        so a re-registration does not put the coordinator's values back. Every rank must
        chunk a plan the same way: change ``chunk_bytes`` only while no rank is busy.
        Returns the config now in force.
        """
        unknown = sorted(set(fields) - set(protocol.AgentConfig.__struct_fields__))
        if unknown:
            raise ValueError(f"override_config: {unknown} are not AgentConfig fields")
        config = msgspec_replace(self.config, fields)
        self.config_overrides = {**self.config_overrides, **fields}
        self._apply_config(config)
        return config

    @property
    def _ticket(self) -> CommitTicket | None:
        return self.voter.ticket

    def send(self, message: protocol.Message) -> None:
        self.link.send(message)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        self.decider.start()
        self._host_store(time.monotonic())
        self.link.open()
        self.log.info("agent started, coordinator %s, transport %s", self.endpoint, self.transport.name)
        failures_in_a_row = 0
        while not self._stop.is_set():
            try:
                self._tick(poll_ms=5)
                failures_in_a_row = 0
            except Exception as exc:  # supervised: never a dead agent thread
                failures_in_a_row += 1
                self.stats["internal_errors"] += 1
                self.log.exception(
                    "agent loop failed (%d in a row); resetting: no plan is applied half, the agent registers again",
                    failures_in_a_row,
                )
                self._reset(f"internal error: {type(exc).__name__}: {exc}")
                self._stop.wait(min(5.0, 0.05 * 2**failures_in_a_row))
        try:
            self._shutdown()
        finally:
            self.decider.stop()
            if self.janitor is not None:
                self.janitor.stop()

    def _host_store(self, now: float) -> None:
        """Rank 0: host the rendezvous store, or stay unregistered and try again in ``refused_retry_s``.

        Until it hosts one this rank cannot register (its ``Hello`` names the store), so no plan
        runs anywhere, but serving is unaffected. A fixed ``EPLB_SERVICE_STORE_PORT`` still held by
        another process (a previous worker shutting down) is freed in time: trying again lets the
        deployment rebalance then without restarting vLLM."""
        if self.rank != 0 or self._store is not None or now < self._next_store_attempt:
            return
        try:
            hosted = host_once(self.endpoint, self.shape.num_ranks)
        except RendezvousError as exc:
            self._idle_reason = str(exc)
            self._next_store_attempt = now + self.refused_retry_s
            self.stats["store_host_failed"] += 1
            self.throttle.report(
                "store_host",
                logging.ERROR,
                "%s; this rank does not register (no rebalancing anywhere), serving is unaffected; "
                "trying again every %.0fs",
                exc,
                self.refused_retry_s,
            )
            return
        self._store = (hosted.host, hosted.port)
        self.janitor = StoreJanitor(hosted.store, hosted.port, self.rank)
        self._idle_reason = None
        if not self.throttle.clear("store_host", "hosting the rendezvous store at %s:%d", hosted.host, hosted.port):
            self.log.info("hosting the rendezvous store at %s:%d", hosted.host, hosted.port)

    def _reset(self, reason: str) -> None:
        """Back to a clean state after a failure of the loop; each part on its own, none may raise."""
        for part in (lambda: self._abandon_plan("internal_error", reason), self.transport.abort, self._reopen):
            try:
                part()
            except Exception:
                self.log.exception("reset step failed")

    def _reopen(self) -> None:
        self._welcomed = False
        self._inbox.clear()
        if self._refused_reason is None:  # a refused agent keeps its slow retry across reopens
            self._next_hello = 0.0
        self.link.open()

    def _tick(self, poll_ms: int) -> None:
        now = time.monotonic()
        self.throttle.tick()
        self._host_store(now)
        if not self._welcomed and now >= self._next_hello and self._idle_reason is None:
            pending = self._hello_unanswered_since
            if pending is None or self.link.last_heard >= pending:
                self._hello_unanswered_since = now
            self.send(self._hello())
            self._next_hello = now + self._hello_backoff_s
            self._hello_backoff_s = min(5.0, self._hello_backoff_s * 2)
        self._receive(poll_ms)
        self._check_silence(time.monotonic())
        while self._inbox:
            self._handle(self._inbox.popleft())
        self._flush_load_reports()
        self._check_connect()
        self._check_ticket()
        if (
            self._plan is not None
            and self._ticket is None
            and self._staged_at
            and now - self._staged_at > self.staged_timeout_s
        ):
            self._drop_plan("no_vote", f"no vote within staged_timeout_s={self.staged_timeout_s}")
        self._heartbeat(now)

    def _owed_since(self) -> float | None:
        """Since when the coordinator owes this agent a word, or None when it owes none.

        Welcomed, it answers every heartbeat: since the last frame heard. Until then it answers
        only ``Hello``: since the first one not answered. Counted from the last frame heard, the
        back-off between two refused ``Hello`` messages (``rank_taken``, up to 5 s) read as silence,
        and a refused agent reopened its socket every silence limit (9 reopens in 10 s, with
        heartbeats every 0.1 s), each one a new connection for the coordinator."""
        if self._welcomed:
            return self.link.last_heard
        pending = self._hello_unanswered_since
        return None if pending is None or self.link.last_heard >= pending else pending

    def _check_silence(self, now: float) -> None:
        """Reopen the connection when the coordinator was silent past the limit while this agent listened.

        Judged after reading the socket, and in the time this agent listened: a stall of its own
        (its process not scheduled) is not the coordinator's silence (``CoordinatorLink.silent_s``)."""
        since = self._owed_since()
        if since is None:
            return
        silent = self.link.silent_s(now, since)
        limit = silence_limit_s(self.config.heartbeat_interval_s, self._silent_reopens)
        if silent <= limit:
            if now - since > limit and self._stall_said != since:
                self._stall_said = since  # once per silence
                self.stats["own_stalls"] += 1
                self.throttle.report(
                    "own_stall",
                    logging.WARNING,
                    "nothing from the coordinator for %.1fs, %.1fs of which this agent's thread was not scheduled "
                    "(an overloaded host?): not the coordinator's silence, the connection is kept",
                    now - since,
                    now - since - silent,
                )
            return
        self.stats["socket_reopened"] += 1
        self._silent_reopens += 1
        self.throttle.report(
            "coordinator_silent",
            logging.WARNING,
            "nothing from the coordinator for %.1fs: reopening the connection",
            silent,
        )
        self._reopen()

    def _heartbeat(self, now: float) -> None:
        if self._welcomed and now >= self._next_heartbeat:
            gen = self.transport.generation if self.side_ready else -1
            staging = self._plan.plan_id if self._plan is not None and self._staged is None else 0
            decided = self.voter.last_decided()
            self.send(heartbeat_message(self.rank, self._session, self.hooks, gen, self.stats, staging, decided))
            self._next_heartbeat = now + self.config.heartbeat_interval_s

    def everyone_past(self, plan_id: int) -> None:
        """See ``CommitVoter``: rank 0 deletes what no rank can need any more (``store_janitor``)."""
        if self.janitor is not None:
            self.janitor.everyone_past(plan_id, self.side.built)

    def keep_alive(self) -> None:
        """While a long transport call waits: heartbeats go on, and the link stays fresh."""
        self._heartbeat(time.monotonic())
        self._receive(0)

    def _pump_while_staging(self, plan_id: int, wait_s: float = 0.0) -> None:
        """Between chunks: stay alive (heartbeats, load reports) for ``wait_s``, honour AbortPlan.

        Other messages wait in the inbox until staging ends.
        """
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            self._receive(int(max(0.0, min(deadline - now, 0.05)) * 1000))
            self._flush_load_reports()
            self._heartbeat(time.monotonic())
            if self._abort_requested == plan_id:
                self._drop_plan("aborted_by_coordinator", "aborted by the coordinator during staging")
                raise PlanAborted()
            if not self._welcomed:  # the coordinator lost us (restart, reopen): it no longer waits for this plan
                self._drop_plan("coordinator_lost", "the coordinator no longer knows this agent")
                raise PlanAborted()
            if self._stop.is_set():
                self._drop_plan("agent_stopping", "agent stopping")
                raise PlanAborted()
            if time.monotonic() >= deadline:
                return

    def _shutdown(self) -> None:
        try:
            self._abandon_plan("agent_stopping", "agent stopping")
            if self._welcomed:
                self.send(protocol.Goodbye(rank=self.rank, reason="agent stopped", session=self._session))
        finally:
            self.link.close()
            self.transport.abort()
        self.log.info("agent stopped")

    # -- messages from the coordinator ---------------------------------------------------------

    def _receive(self, poll_ms: int) -> None:
        messages = self.link.receive(poll_ms)
        if messages:
            self._silent_reopens = 0
            self.throttle.clear("coordinator_silent", "heard from the coordinator again")
        for message in messages:
            if isinstance(message, protocol.AbortPlan):
                self._abort_requested = message.plan_id
            elif isinstance(message, protocol.CommInit) and self._plan is not None and self._new_generation(message):
                # The coordinator sends a new generation only once the plan in flight has ended: a
                # rank still in its exchange (its AbortPlan lost) stops now, not at its transport
                # timeout, and joins the new rendezvous while its peers still wait in it.
                self._abort_requested = self._plan.plan_id
            self._inbox.append(message)

    def _placement(self) -> tuple[int, np.ndarray]:
        """The serving thread's epoch and the placement at that epoch, as one pair.

        The serving thread bumps ``hooks.epoch`` when it applies the armed ticket; the agent
        folds that ticket's rows into ``phy2log_host`` only when it reports it. In between,
        the placement is the host copy with the ticket's rows (fixed before it was armed).
        """
        epoch = self.hooks.epoch
        if epoch == self._host_epoch:
            return epoch, self.phy2log_host
        ticket = self._ticket  # applied by the serving thread, not reported yet (one at a time)
        assert ticket is not None and epoch == self._host_epoch + 1, (epoch, self._host_epoch)
        placement = self.phy2log_host.copy()
        placement[ticket.layers] = ticket.rows
        return epoch, placement

    def _hello(self) -> protocol.Hello:
        shape = self.shape
        epoch, placement = self._placement()
        return protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=self.rank,
            model=protocol.ModelShape(
                num_layers=shape.num_layers,
                num_logical=shape.num_logical,
                num_physical=shape.num_physical,
                num_ranks=shape.num_ranks,
                bytes_per_expert=self.model.bytes_per_expert,
            ),
            phy2log=protocol.NDArray.from_numpy(placement),
            epoch=epoch,
            step=self.hooks.steps_done,
            transport=self.transport.name,
            node=socket.gethostname(),
            pid=os.getpid(),
            store_host=self._store[0] if self._store else "",
            store_port=self._store[1] if self._store else 0,
            resume_session=self._session,
            deployment=self.deployment,
        )

    _handlers = {
        protocol.Welcome: "_on_welcome",
        protocol.Reject: "_on_reject",
        protocol.CommInit: "_connect",
        protocol.Plan: "_on_plan",
        protocol.VoteNow: "_on_vote",
        protocol.AbortPlan: "_on_abort",
        protocol.CoordinatorStopping: "_on_stopping",
        protocol.HeartbeatAck: "_on_heartbeat_ack",
    }
    """Message type -> handler name (by name, so subclasses' overrides are the ones called)."""

    def _handle(self, message: protocol.Message) -> None:
        name = self._handlers.get(type(message))
        if name is None:
            self.log.warning("ignored unexpected %s from the coordinator", type(message).__name__)
            return
        getattr(self, name)(message)

    def _on_stopping(self, message: protocol.CoordinatorStopping) -> None:
        self.log.warning("coordinator stopping (%s); serving continues, will register again", message.reason)
        self._abandon_plan("coordinator_stopping", "coordinator stopping")
        self._welcomed = False
        self._next_hello = time.monotonic() + self.hello_interval_s

    def _on_heartbeat_ack(self, message: protocol.HeartbeatAck) -> None:
        if self._welcomed and message.session != self._session:
            self.log.warning(
                "heartbeat answered for session %d, this agent holds %d: registering again",
                message.session,
                self._session,
            )
            self._welcomed = False

    def _on_welcome(self, msg: protocol.Welcome) -> None:
        self._apply_config(msgspec_replace(msg.config, self.config_overrides))
        hooks = self.hooks
        if self._welcomed and msg.session == self._session:
            # A duplicate (our Hello was retried or duplicated): the coordinator's answer to the
            # retry may carry the side communicator the first one could not; join it, say nothing.
            if msg.comm is not None:
                self._connect(msg.comm)
            return
        self._welcomed = True
        self._session = msg.session
        # Answered: the back-off (for a coordinator that does not answer) starts afresh, and so
        # does the next Hello's time. Left where the unanswered ones had put it (up to 5 s out), a
        # Hello the coordinator asked for soon after (Reject unknown_agent) waited for it.
        self._hello_backoff_s = self.hello_interval_s
        self._next_hello = 0.0
        self.throttle.clear("rank_taken", "rank %d is free again", self.rank)
        if self._refused_reason is not None:
            self.log.info("the coordinator accepts this agent now (it had refused it: %s)", self._refused_reason)
            self._refused_reason = None
        self.log.info("welcomed by the coordinator (epoch %d, step %d)", hooks.epoch, hooks.steps_done)
        if msg.comm is not None:
            self._connect(msg.comm)

    def _apply_config(self, config: protocol.AgentConfig) -> None:
        self.config = config
        hooks = self.hooks
        hooks.report_interval_steps, hooks.fence_steps = config.report_interval_steps, config.fence_steps
        hooks.fence_timeout_s, hooks.decision_timeout_s = config.fence_timeout_s, config.decision_timeout_s

    def _on_reject(self, msg: protocol.Reject) -> None:
        if msg.code in ("unknown_agent", "stale_session"):
            # The coordinator restarted (or declared us dead): register again. Every queued
            # heartbeat draws one of these; the Hello back-off keeps it to one Hello.
            self._welcomed = False
        elif msg.code == "rank_taken":
            self.stats["rank_taken"] += 1
            self.throttle.report("rank_taken", logging.WARNING, "coordinator: %s; trying again", msg.reason)
        elif msg.code == "bad_message":
            self.stats["bad_messages_reported"] += 1
            self.throttle.report(
                "bad_message", logging.ERROR, "coordinator refused a message of this agent as malformed: %s", msg.reason
            )
        else:
            # Version, shape, world size, placement: nothing this agent can change, but the
            # operator can (a coordinator restarted with the right --dp, or upgraded). So ask
            # again now and then instead of staying idle until the worker restarts.
            self._welcomed = False
            self._next_hello = time.monotonic() + self.refused_retry_s
            self.stats["refused"] += 1
            first = msg.reason != self._refused_reason
            self._refused_reason = msg.reason
            (self.log.error if first else self.log.debug)(
                "coordinator refused this agent: %s; serving is unaffected, rebalancing is off on this rank; "
                "asking again every %.0fs",
                msg.reason,
                self.refused_retry_s,
            )

    # -- the side communicator ------------------------------------------------------------------

    def _connect(self, comm: protocol.CommInit) -> None:
        """Join the side communicator ``comm`` names (see ``side_link``); a plan in flight is given up first."""
        if self.side.is_current(comm):
            return
        if comm.world_size != self.shape.num_ranks or not comm.store_host or not comm.store_port:
            self.stats["bad_messages"] += 1
            self.log.error(
                "ignored a CommInit for %d ranks at %r:%d; this deployment has %d ranks and needs a store address",
                comm.world_size,
                comm.store_host,
                comm.store_port,
                self.shape.num_ranks,
            )
            return
        if self.janitor is not None:
            self.janitor.saw_generation(comm, self.transport.store_keys(comm))
        if self.side.is_stale(comm):
            self.stats["duplicate_messages"] += 1
            self.log.debug("ignored a late copy of side communicator generation %d", comm.generation)
            return
        self._abandon_plan("comm_rebuilt", f"side communicator rebuilt (generation {comm.generation})")
        self.side.connect(comm, self.config.transport_timeout_s)

    def _new_generation(self, comm: protocol.CommInit) -> bool:
        """A ``CommInit`` this rank will act on (not a copy of its current or an older generation)."""
        return not self.side.is_current(comm) and not self.side.is_stale(comm)

    def _check_connect(self) -> None:
        comm = self.side.take_pending()
        if comm is not None:
            self._connect(comm)

    @property
    def side_ready(self) -> bool:
        return self.side.ready

    # -- load reports --------------------------------------------------------------------

    def _flush_load_reports(self) -> None:
        for snap, counts in self.hooks.take_load_windows():
            if self._welcomed:
                self.send(self._load_report(snap, counts))

    def _load_report(self, snap: LoadSnapshot, counts: np.ndarray) -> protocol.LoadReport:
        """One window's report (the seam where test agents send it altered)."""
        return protocol.LoadReport(
            rank=self.rank,
            epoch=snap.epoch,
            step_begin=snap.step_begin,
            step_end=snap.step_end,
            slot_load=protocol.NDArray.from_numpy(counts),
            session=self._session,
        )

    # -- plans -------------------------------------------------------------------------

    def _validate_plan(self, plan: protocol.Plan) -> np.ndarray:
        return check_plan(
            plan,
            self.shape,
            self.hooks.epoch,
            self.phy2log_host,
            int(self.model.log2phy.shape[2]),
            self.rank,
            self.staging_budget_bytes,
            self.staging_bytes,
        )

    def staging_bytes(self, plan: protocol.Plan, rows: np.ndarray) -> int:
        """Bytes of staging this rank needs for ``plan`` (one row per incoming expert)."""
        schedule = build_schedule(self.phy2log_host[list(plan.layers)], rows, self.shape.num_ranks, self.ranks_per_node)
        return len(schedule.per_rank[self.rank].staging) * self.model.bytes_per_expert

    def _on_plan(self, plan: protocol.Plan) -> None:
        if plan.plan_id in self._seen_plans:
            self.stats["duplicate_messages"] += 1
            self._answer_again(plan.plan_id)
            return
        self._seen_plans.append(plan.plan_id)
        if self.janitor is not None:
            self.janitor.saw_plan(plan.plan_id)
        if plan.plan_id in self._abort_seen:
            return self._aborted(plan.plan_id, "aborted_by_coordinator", "aborted by the coordinator before it arrived")
        busy = self._plan.plan_id if self._plan is not None else (self._ticket.plan_id if self._ticket else None)
        if busy is not None:
            return self._failed(plan.plan_id, "busy", f"busy with plan {busy}")
        try:
            rows = self._validate_plan(plan)
        except (PlacementError, protocol.ProtocolError) as exc:
            self.stats["plans_rejected"] += 1
            self.log.error("rejected plan %d: %s", plan.plan_id, exc)
            return self._failed(plan.plan_id, "invalid_plan", str(exc))
        if not self.side_ready or self.side.record is None:
            return self._failed(plan.plan_id, "not_connected", "side communicator not connected")
        self._plan, self._plan_rows, self._abort_requested = plan, rows, None
        t0, cpu0 = time.monotonic(), time.thread_time()
        try:
            received = self._stage(plan, rows)
        except PlanAborted:
            if self.transport.busy:  # groups its peers may never match: tear down, rebuild later
                self.transport.abort()
            return
        except (TransportError, RuntimeError) as exc:
            self.log.error("staging plan %d failed: %s", plan.plan_id, exc)
            self.transport.abort()
            self._clear_plan()
            return self._failed(plan.plan_id, "staging_failed", f"staging failed: {exc}")
        self._staged_at = time.monotonic()
        # The agent thread's CPU time holds the GIL the serving thread needs: keep it visible.
        self.stats["stage_cpu_us"] += int((time.thread_time() - cpu0) * 1e6)
        self.stats["staged"] += 1
        self._answer(
            protocol.Staged(
                rank=self.rank,
                plan_id=plan.plan_id,
                bytes_received=received,
                duration_s=self._staged_at - t0,
                session=self._session,
            )
        )

    def _answer(self, message: PlanAnswer) -> None:
        """Send this rank's answer to a ``Plan``, and keep it for a copy of that ``Plan``."""
        self._answers[message.plan_id] = (message, time.monotonic())
        self._answers.move_to_end(message.plan_id)
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        self.send(message)

    def _answer_again(self, plan_id: int) -> None:
        """A copy of a ``Plan`` (the coordinator missed the answer, or the link duplicated it):
        the same answer again, at most every ``ANSWER_AGAIN_S`` (copies queued while this rank
        staged all arrive at once). Nothing while it still stages: its answer is on its way."""
        kept = self._answers.get(plan_id)
        if kept is None or time.monotonic() - kept[1] < ANSWER_AGAIN_S:
            return
        message = kept[0]
        if message.session != self._session:  # registered again since
            message = msgspec.structs.replace(message, session=self._session)
        self.stats["answers_resent"] += 1
        self._answer(message)

    def _stage(self, plan: protocol.Plan, rows: np.ndarray) -> int:
        """Stage ``plan`` through the pipeline; returns the bytes received from other ranks."""
        me = threading.get_ident()

        def pump() -> None:  # between chunks, and while the transport waits on the host
            if threading.get_ident() == me:
                self._pump_while_staging(plan.plan_id)

        self._staged = self.pipeline.stage(plan, rows, self.phy2log_host, self.config, pump)
        return self._staged.received_bytes

    def _failed(self, plan_id: int, code: str, reason: str) -> None:
        self._answer(protocol.Failed(rank=self.rank, plan_id=plan_id, reason=reason, session=self._session, code=code))

    def _aborted(self, plan_id: int, code: str, reason: str) -> None:
        self._answer(protocol.Aborted(rank=self.rank, plan_id=plan_id, reason=reason, session=self._session, code=code))

    def _on_vote(self, msg: protocol.VoteNow) -> None:
        """Enter the commit vote (``commit_vote``), once per plan id."""
        if msg.plan_id in self._voted_plans:
            self.stats["duplicate_messages"] += 1
            if self.voter.voted_again(msg.plan_id):  # the coordinator missed this rank's Voted
                self.stats["answers_resent"] += 1
            return
        self._voted_plans.append(msg.plan_id)
        cpu0 = time.thread_time()
        try:
            self.voter.vote(msg, self._plan, self._plan_rows, self._staged, self.side.record)
        finally:
            self.stats["vote_cpu_us"] += int((time.thread_time() - cpu0) * 1e6)
            self.stats["votes"] += 1

    def _check_ticket(self) -> None:
        ticket = self.voter.report()
        if ticket is None:
            return
        if ticket.outcome == "committed":
            self.phy2log_host[ticket.layers] = ticket.rows
            self._host_epoch += 1
        if self._plan is not None and self._plan.plan_id == ticket.plan_id:
            self._clear_plan()

    def _clear_plan(self) -> None:
        self._plan = self._staged = self._plan_rows = None
        self._staged_at = 0.0

    def _on_abort(self, msg: protocol.AbortPlan) -> None:
        """Idempotent (the coordinator sends it again to ranks with no outcome): it only asks for
        abort. Where this rank knows the record's content, it says it again (``Voted``): the
        coordinator books no outcome it has no evidence of, and its ``Voted``/``Committed`` may
        have been lost."""
        copy = msg.plan_id in self._abort_seen
        if not copy:
            self._abort_seen.append(msg.plan_id)
        ticket = self._ticket
        if ticket is not None and ticket.plan_id == msg.plan_id:
            # In the vote: only the record decides. Ask for abort there; if commit is there
            # already, this rank commits at S like every other, and says so in Voted.
            self.voter.propose(
                Decision.abort(self.rank, f"aborted by the coordinator: {msg.reason}", "aborted_by_coordinator")
            )
        elif self._plan is not None and self._plan.plan_id == msg.plan_id:
            return self._drop_plan("aborted_by_coordinator", f"aborted by the coordinator: {msg.reason}")
        if self.voter.voted_again(msg.plan_id):
            self.stats["answers_resent"] += 1
        elif copy and msg.plan_id in self._answers:
            if isinstance(self._answers[msg.plan_id][0], (protocol.Aborted, protocol.Failed)):
                self._answer_again(msg.plan_id)  # dropped before the vote: that Aborted again

    def _abandon_plan(self, code: str, reason: str) -> None:
        """Give up the current plan the only safe way: before the vote, drop it; in the vote,
        ask for ``abort`` in the record and let the serving thread finish the ticket."""
        if self._ticket is not None:
            self.voter.propose(Decision.abort(self.rank, reason, code))
        else:
            self._drop_plan(code, reason)

    def _drop_plan(self, code: str, reason: str) -> None:
        """Drop a plan that has not been voted on (no ticket armed): nothing can apply it."""
        plan = self._plan
        if plan is None or self._ticket is not None:
            return
        self._clear_plan()
        self.stats["aborted"] += 1
        self.log.warning("dropped plan %d: %s; maps untouched", plan.plan_id, reason)
        self._aborted(plan.plan_id, code, reason)


def msgspec_replace(config: protocol.AgentConfig, overrides: dict) -> protocol.AgentConfig:
    """``config`` with this instance's own settings over the coordinator's."""
    if not overrides:
        return config
    import msgspec

    return msgspec.structs.replace(config, **overrides)


def heartbeat_message(
    rank: int,
    session: int,
    hooks: ServingHooks,
    comm_generation: int,
    stats: collections.Counter,
    staging_plan: int = 0,
    decided: tuple[int, Decision] | None = None,
) -> protocol.Heartbeat:
    """The heartbeat: the rank's step and epoch, step-clock probes, the agent's counters, the
    plan it is staging (``staging_plan``, 0: none), and the newest plan whose decision record it
    read with the record's content (``decided``: plan id and decision, None before any)."""
    # Read the step before the epoch: the serving thread bumps the epoch at the commit boundary
    # before the step count passes S, so (step > S, epoch = old) never pairs up falsely; the
    # coordinator relies on this to tell a missed commit from a slow one.
    step = hooks.steps_done
    epoch = hooks.epoch
    steps, times = probes_from_ring(hooks.step_end_times, step)
    clock = protocol.StepClock(
        probe_steps=steps, times=times, radius=PROBE_RADIUS, wall_minus_mono=time.time() - time.monotonic()
    )
    counters = {name: int(stats[name]) for name in protocol.AGENT_COUNTERS if stats[name]}
    counters["dropped_load_windows"] = hooks.dropped_windows
    return protocol.Heartbeat(
        rank=rank,
        step=step,
        epoch=epoch,
        comm_generation=comm_generation,
        session=session,
        internal_errors=stats["internal_errors"],
        clock=clock,
        counters=counters,
        staging_plan=staging_plan,
        decided_plan=decided[0] if decided else 0,
        decided_commit=bool(decided and decided[1].commit),
        decided_commit_step=max(decided[1].commit_step, 0) if decided else 0,
        decided_code=decided_code(decided[1]) if decided else "other",
    )


def decided_code(decision: Decision) -> protocol.AbortCode:
    """The record's abort code as a heartbeat carries it: ``other`` for a commit, or for a code this
    protocol does not name (a record is text any process can write; a code outside the wire's
    list would get every heartbeat refused, and the rank declared dead)."""
    if decision.commit or decision.code not in protocol.ABORT_CODES:
        return "other"
    return cast(protocol.AbortCode, decision.code)  # one of the Literal's values, checked above
