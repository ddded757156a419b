"""The coordinator daemon: one ROUTER socket on an asyncio (uvloop) event loop.

The loop only moves messages and state; the placement policy runs in an executor
thread, so a slow plan never delays heartbeats, load reports or votes. Agents are the
source of truth for the placement: they report it in ``Hello``, and the coordinator
only advances it when every rank has reported ``Committed``.

Nothing an agent or a client sends can stop it: every message is handled under a guard
(an unexpected exception is logged, counted in ``eplb_internal_errors_total`` and aborts the
plan in flight, maps untouched), every periodic duty likewise, and side duties such as
recording fail soft. A rank's messages are accepted only from the connection and session
that registered it. It imports no torch: the side communicator's rendezvous store is hosted
by rank 0's worker, the coordinator only passes its address on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import secrets
import time
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio

from eplb_service import protocol as P
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.epoch_watch import EpochLagWatch
from eplb_service.coordinator.http_endpoints import serve_http
from eplb_service.coordinator.load_window import LoadWindow
from eplb_service.coordinator.metrics import CoordinatorMetrics
from eplb_service.coordinator.plan_state import Phase, PlanRun
from eplb_service.coordinator.registry import AgentRecord, Registry
from eplb_service.coordinator.socket_dir import prepare_ipc_dir
from eplb_service.logutil import rank_logger
from eplb_service.security import apply_server_curve, check_endpoint_security, is_local_endpoint
from eplb_service.step_clock import StepClockWatch
from eplb_service.trace import TraceRecorder
from eplb_service.placement import (
    PlacementError, PlacementShape, layer_balancedness, model_balancedness, rank_loads, validate_phy2log,
)

_HISTORY_EPOCHS = 16


@dataclass
class PlanOutcome:
    plan_id: int
    phase: str
    reason: str
    number: int
    """1, 2, 3 ... in this coordinator's life (plan ids are long: unique across restarts)."""
    code: str
    layers: list[int]
    bytes_moved: int
    experts_moved: int
    commit_step: int | None
    staging_s: float
    voting_s: float
    max_stall_s: float


RECEIVE_HWM = 64
"""Frames queued per connection before ZeroMQ stops reading from it: with the frame limit,
what bounds the memory one client can make the coordinator hold."""


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.cfg = config
        self.log = rank_logger(__name__, "coordinator")
        self.registry = Registry(config.world_size)
        self.metrics = CoordinatorMetrics(agent_counters=self._agent_counters)
        for rank in range(config.world_size):  # every rank's series from the start: zeros, not gaps
            self.metrics.commit_stall.labels(str(rank))
        self.model: P.ModelShape | None = None
        self.shape: PlacementShape | None = None
        self.epoch = -1
        self.placements: dict[int, np.ndarray] = {}
        self.window: LoadWindow | None = None
        self.comm_generation = 0
        self._comm_sent_generation = -1
        self._comm_sent_at = 0.0
        self._nonce = secrets.token_hex(4)
        """Names this coordinator's rendezvous keys: the store on rank 0 outlives restarts."""
        self.plan: PlanRun | None = None
        self._pending_batches: list = []
        # Plan ids are unique across coordinator restarts (agents drop ids they have seen, to
        # survive duplicated messages): a random 32-bit base, shifted, plus a counter.
        self._plan_counter = int.from_bytes(os.urandom(4), "big") << 16
        self._last_plan_end_step = 0
        self._planning = False
        self.halted_reason: str | None = None
        self.epoch_watch = EpochLagWatch()
        self.step_clock = StepClockWatch()
        self._clock_unverified_since: float | None = None
        self._clock_warned = False
        self._beats: dict[int, tuple[int, int]] = {}
        """Rank -> (epoch, step) of its latest heartbeat: one report, so the pair is consistent
        (the record's step also moves with load reports, its epoch with Committed)."""
        self.drain_at_step: int | None = None
        self.recorder: TraceRecorder | None = None
        self._seeded = False
        self._last_trace_flush = time.monotonic()
        """No new plan starts once the deployment passes this step (planned shutdowns)."""
        self.outcomes: list[PlanOutcome] = []
        self._plan_numbers: dict[int, int] = {}
        self.counts = {"committed": 0, "aborted": 0, "diverged": 0, "proposed": 0, "skipped": 0}
        self.bytes_moved_total = 0
        self.experts_moved_total = 0
        self.max_step_seen = 0
        self.metrics_port: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eplb-policy")
        self._tasks: set[asyncio.Task] = set()
        self.max_message_bytes = P.UNSHAPED_MAX_MESSAGE_BYTES
        self._sock: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.started_at = time.time()
        self.last_tick = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------

    async def serve(self) -> None:
        """Bind, then run until :meth:`stop`; returns after a clean shutdown."""
        check_endpoint_security(self.cfg.endpoint, self.cfg.curve_dir, self.cfg.insecure)
        prepare_ipc_dir(self.cfg.endpoint)
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        # No ROUTER_HANDOVER: a second connection with an identity in use is refused, so
        # nobody can take a registered agent's route over.
        auth_monitor = None
        if self.cfg.curve_dir:
            from zmq.auth.asyncio import AsyncioAuthenticator

            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=os.path.join(self.cfg.curve_dir, "clients"))
            apply_server_curve(sock, self.cfg.curve_dir)
            auth_monitor = self._spawn(self._count_auth_failures(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)), "auth-monitor")
        elif not is_local_endpoint(self.cfg.endpoint):
            self.log.warning("INSECURE: %s accepts unauthenticated, unencrypted agents from other hosts (--insecure)", self.cfg.endpoint)
        sock.bind(self.cfg.endpoint)
        self._sock = sock
        http = None
        if self.cfg.metrics_port is not None:
            http = await serve_http(self, self.cfg.http_host, self.cfg.metrics_port)
            self.metrics_port = http.sockets[0].getsockname()[1]
        self.log.info("listening on %s for %d ranks (metrics %s, policy %s)", self.cfg.endpoint,
                      self.cfg.world_size, self.metrics_port, self.cfg.policy)
        self.ready.set()
        ticker = self._spawn(self._tick_loop(), "tick")
        try:
            await self._receive_loop()
        finally:
            ticker.cancel()
            if auth_monitor is not None:
                auth_monitor.cancel()
            await self._shutdown()
            if http is not None:
                http.close()

    async def _count_auth_failures(self, monitor) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            self.metrics.messages_rejected.labels("auth").inc()
            self.log.warning("refused a connection that failed CURVE authentication (%s)", event.get("endpoint", b"").decode(errors="replace"))

    def stop(self) -> None:
        self._stopping.set()

    def _agent_counters(self) -> dict[int, dict[str, int]]:
        return {rank: record.counters for rank, record in self.registry.agents.items() if record.alive}

    def _spawn(self, coro, name: str) -> asyncio.Task:
        """A task that is kept referenced and whose failure is logged and counted, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=f"eplb-{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._internal_error(name, t.exception())

        task.add_done_callback(done)
        return task

    def _internal_error(self, where: str, exc: BaseException) -> None:
        """A bug met at run time: logged with its traceback, counted, the plan in flight aborted."""
        self.metrics.internal_errors.labels(where).inc()
        self.log.error("internal error in %s: %s: %s", where, type(exc).__name__, exc, exc_info=exc)
        if self.plan is not None and not self.plan.phase.final:
            try:
                self._abort_plan(f"coordinator internal error in {where}: {type(exc).__name__}", "internal_error")
            except Exception as again:  # noqa: BLE001 - the guard must not fail itself
                self.log.error("aborting the plan after an internal error failed too: %s", again, exc_info=again)
                self.plan = None
                self._pending_batches = []

    def _record_failed(self, exc: BaseException) -> None:
        self.metrics.recording_errors.inc()
        self.metrics.recording_enabled.set(0)
        self.log.error("recording load windows to %s failed (%s: %s); recording is off, the coordinator goes on",
                       self.cfg.record_path, type(exc).__name__, exc)
        self.recorder = None

    async def _shutdown(self) -> None:
        if self.plan is not None and not self.plan.phase.final:
            self._abort_plan("coordinator shutting down", "coordinator_stopping")
        self._broadcast(P.CoordinatorStopping(reason="coordinator shutting down"))
        if self.recorder is not None:
            try:
                self.recorder.flush(close_all=True)
                self.log.info("load trace: %d windows in %s", self.recorder.windows, self.recorder.path)
            except Exception as exc:  # noqa: BLE001 - a full disk must not fail the shutdown
                self._record_failed(exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._sock is not None:
            self._sock.close(linger=200)
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=200)
        self.log.info("stopped")

    # -- I/O ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        sock = self._sock
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        while not self._stopping.is_set():
            recv = asyncio.ensure_future(sock.recv_multipart())
            done, _ = await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                break
            frames = recv.result()
            if len(frames) != 2:
                self.metrics.messages_rejected.labels("framing").inc()
                continue
            identity, frame = frames
            try:
                message = P.decode(frame, self.max_message_bytes)
            except P.ProtocolError as exc:
                self.metrics.messages_rejected.labels("decode").inc()
                self.log.warning("bad message from %r: %s", identity, exc)
                self._send(identity, P.Reject(reason=str(exc), code="bad_message"))
                continue
            try:
                self._handle(identity, message)
            except Exception as exc:  # noqa: BLE001 - no message may stop the coordinator
                self._internal_error(f"handling {type(message).__name__}", exc)
        stop_wait.cancel()

    def _send(self, identity: bytes, message: P.Message) -> None:
        try:
            self._sock.send_multipart([identity, P.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone: liveness will notice
            self.log.debug("send to %r failed: %s", identity, exc)

    def _broadcast(self, message: P.Message) -> None:
        for record in self.registry.alive:
            self._send(record.identity, message)

    # -- message handling -----------------------------------------------------------------

    def _handle(self, identity: bytes, message: P.Message) -> None:
        now = time.monotonic()
        if isinstance(message, P.Hello):
            self._on_hello(identity, message)
            return
        if isinstance(message, P.StatusRequest):
            self._send(identity, P.StatusReply(status_json=json.dumps(self.status()).encode()))
            return
        record = self.registry.by_identity(identity)
        if record is None:
            self.metrics.messages_rejected.labels("unknown_agent").inc()
            self._send(identity, P.Reject(reason=f"unknown agent {identity!r}: send Hello first", code="unknown_agent"))
            return
        if not isinstance(message, P.AgentMessage.__args__) or message.rank != record.rank or message.session != record.session:
            # Filed under the rank the connection registered, never the rank a message names.
            self.metrics.messages_rejected.labels("session").inc()
            self.log.warning("refused %s naming rank %s, session %s from the connection of rank %d (session %d)",
                             type(message).__name__, getattr(message, "rank", "-"), getattr(message, "session", "-"),
                             record.rank, record.session)
            self._send(identity, P.Reject(reason=f"{type(message).__name__} does not match this connection's rank "
                                                 f"{record.rank} and session", code="stale_session"))
            return
        record.last_seen = now
        if isinstance(message, P.Committed):  # even from a rank declared dead: the step is a fact
            self.epoch_watch.committed(message.epoch, message.commit_step)
        if not record.alive:
            self.log.warning("rank %d is back after being declared dead; it must register again", record.rank)
            self._send(identity, P.Reject(reason=f"unknown agent {identity!r}: declared dead, send Hello again",
                                          code="unknown_agent"))
            return
        plan = self.plan
        if isinstance(message, (P.Heartbeat, P.Committed)) and self._unknown_epoch(message.epoch):
            self._resync(record, message.epoch, now)
            return
        if isinstance(message, P.Heartbeat):
            self._send(identity, P.HeartbeatAck(session=record.session))
            record.step, record.comm_generation, record.epoch = message.step, message.comm_generation, message.epoch
            record.internal_errors = message.internal_errors
            record.counters = dict(message.counters)
            self._beats[record.rank] = (message.epoch, message.step)
            self.max_step_seen = max(self.max_step_seen, message.step)
            if message.clock is not None:
                clock = message.clock
                self.step_clock.observe(record.rank, clock.probe_steps, clock.times, clock.wall_minus_mono)
            if plan is not None and plan.on_heartbeat(record.rank, message.step, message.epoch, now):
                self._advance_plan()
            self._update_epoch()
            self._watch_epochs()
            self._watch_step_clock(now)
        elif isinstance(message, P.Voted):
            if plan is not None and plan.plan_id == message.plan_id:
                plan.on_voted(message.commit_step, message.ok)
        elif isinstance(message, P.LoadReport):
            self._on_load(record, message)
        elif isinstance(message, P.Staged):
            if plan is not None and plan.plan_id == message.plan_id and plan.on_staged(message.rank, now):
                self._advance_plan()
        elif isinstance(message, (P.Failed, P.Aborted)):
            if plan is not None and plan.plan_id == message.plan_id and plan.on_failed(record.rank, message.reason, now,
                                                                                        message.code):
                self._advance_plan()
        elif isinstance(message, P.Committed):
            self.metrics.commit_stall.labels(str(record.rank)).observe(message.stall_s)
            record.epoch = message.epoch
            self._update_epoch()
            self._watch_epochs()
            if plan is not None and plan.plan_id == message.plan_id and plan.on_committed(message.rank, message.commit_step, message.stall_s, now):
                self._advance_plan()
        elif isinstance(message, P.Goodbye):
            self.log.info("rank %d left: %s", message.rank, message.reason)
            self._lose_agent(record, now)
        else:
            self.metrics.messages_rejected.labels("unexpected").inc()
            self.log.warning("rank %d sent an unexpected %s", record.rank, type(message).__name__)

    def _on_hello(self, identity: bytes, hello: P.Hello) -> None:
        def reject(reason: str, code: str = "refused", metric: str = "hello") -> None:
            self.metrics.messages_rejected.labels(metric).inc()
            (self.log.warning if code == "rank_taken" else self.log.error)("refused rank %d: %s", hello.rank, reason)
            self._send(identity, P.Reject(reason=reason, code=code))

        if not (identity == f"rank-{hello.rank}".encode() or identity.startswith(f"rank-{hello.rank}-".encode())):
            return reject(f"identity {identity!r} does not match rank {hello.rank} (expected b'rank-{hello.rank}-...')")
        if hello.protocol_version != P.PROTOCOL_VERSION:
            return reject(f"protocol version {hello.protocol_version} does not match the coordinator's {P.PROTOCOL_VERSION}")
        if not 0 <= hello.rank < self.cfg.world_size:
            return reject(f"rank {hello.rank} outside [0, {self.cfg.world_size}) (coordinator world size {self.cfg.world_size})")
        if hello.model.num_ranks != self.cfg.world_size:
            return reject(f"agent reports {hello.model.num_ranks} EP ranks, the coordinator was started for {self.cfg.world_size}")
        if self.model is not None and hello.model != self.model:
            return reject(f"model shape {hello.model} differs from the deployment's {self.model}")
        if hello.rank == 0 and not (hello.store_host and hello.store_port):
            return reject("rank 0 must host the rendezvous store and name it (store_host, store_port); got "
                          f"{hello.store_host!r}:{hello.store_port}")
        try:
            shape = PlacementShape(hello.model.num_layers, hello.model.num_logical, hello.model.num_physical, hello.model.num_ranks)
            phy2log = hello.phy2log.to_numpy("hello.phy2log").astype(np.int64)
            validate_phy2log(phy2log, shape)
        except (PlacementError, P.ProtocolError) as exc:
            return reject(f"invalid placement: {exc}")
        now = time.monotonic()
        previous = self.registry.agents.get(hello.rank)
        if previous is not None and previous.alive:
            if previous.identity == identity:
                # The same connection saying Hello again (retried or duplicated): same place, same session.
                previous.last_seen = now
                comm = self._current_comm() if self._comm_sent_generation == self.comm_generation else None
                self._send(identity, P.Welcome(protocol_version=P.PROTOCOL_VERSION, rank=hello.rank, config=self.cfg.agent,
                                               comm=comm, session=previous.session))
                return
            if hello.resume_session != previous.session:
                # A live agent holds the rank; only it (proving its session) may take it back
                # on a new connection. A new process gets it once the old one is declared dead.
                return reject(f"rank {hello.rank} is held by a live agent (pid {previous.pid} on {previous.node!r}, heard "
                              f"{now - previous.last_seen:.1f}s ago); it is free again once that agent leaves or is "
                              f"silent for liveness_timeout_s={self.cfg.liveness_timeout_s}", code="rank_taken",
                              metric="rank_taken")
        known = self.placements.get(hello.epoch)
        others_alive = any(r.alive and r.rank != hello.rank for r in self.registry.agents.values())
        if others_alive and known is not None and not np.array_equal(phy2log, known):
            return reject(f"placement at epoch {hello.epoch} differs from the other ranks' placement at that epoch")
        if self.model is None or not others_alive:
            self._adopt_placement(hello.model, shape, phy2log, hello.epoch)
        else:
            self.placements.setdefault(hello.epoch, phy2log)
        record = AgentRecord(rank=hello.rank, identity=identity, node=hello.node, pid=hello.pid, epoch=hello.epoch,
                             step=hello.step, phy2log=phy2log, session=secrets.randbits(62) + 1,
                             store=(hello.store_host, hello.store_port) if hello.rank == 0 else None)
        self._beats.pop(hello.rank, None)
        self.step_clock.forget(hello.rank)
        replaced = self.registry.register(record)
        if replaced is not None and self.plan is not None and not self.plan.phase.final:
            self.plan.on_agent_lost(hello.rank, now)
            self._advance_plan()
        self.log.info("rank %d registered (node %s, pid %d, epoch %d, step %d, %s%s)", hello.rank, hello.node, hello.pid,
                      hello.epoch, hello.step, hello.transport, ", resumed its session" if replaced and hello.resume_session else "")
        self._send(identity, P.Welcome(protocol_version=P.PROTOCOL_VERSION, rank=hello.rank, config=self.cfg.agent,
                                       session=record.session))
        self._update_liveness_metrics()
        self._update_epoch()
        if self.registry.complete:
            self._init_comm()
        elif replaced is not None:
            self._comm_sent_generation = -1

    def _unknown_epoch(self, epoch: int) -> bool:
        """An epoch whose placement this coordinator never saw, and no plan of its own leads to."""
        if epoch in self.placements:
            return False
        plan = self.plan
        return plan is None or epoch != plan.base_epoch + 1

    def _resync(self, record: AgentRecord, epoch: int, now: float) -> None:
        """A rank moved to a placement this coordinator does not know (decided before it
        restarted, committed since): it registers again, and its Hello carries the placement."""
        self.log.info("rank %d reports placement epoch %d, which this coordinator has not seen (decided before it "
                      "started): asking it to register again with its placement", record.rank, epoch)
        self._send(record.identity, P.Reject(reason=f"placement epoch {epoch} is unknown here: send Hello again",
                                             code="unknown_agent"))
        self._lose_agent(record, now)

    def _adopt_placement(self, model: P.ModelShape, shape: PlacementShape, phy2log: np.ndarray, epoch: int) -> None:
        """The first rank of a deployment (or the first back when none is alive) seeds the placement table."""
        if self.model is None:
            self.model, self.shape = model, shape
            self.window = LoadWindow(shape.num_layers, shape.num_logical, self.cfg.load_half_life_steps)
            self.max_message_bytes = P.max_message_bytes(shape.num_layers, shape.num_physical)
            if self._sock is not None:  # applies to connections made from now on
                self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            if self.cfg.record_path:
                try:
                    self.recorder = TraceRecorder(self.cfg.record_path, shape.num_layers, shape.num_logical, self.cfg.world_size)
                    self.metrics.recording_enabled.set(1)
                    self.log.info("recording load windows to %s", self.cfg.record_path)
                except Exception as exc:  # noqa: BLE001 - recording is a side duty
                    self._record_failed(exc)
        self.placements = {epoch: phy2log}

    def _update_epoch(self) -> None:
        """The deployment's epoch is the one every rank reports, never one rank's word alone.

        While ranks disagree (between a decided commit and its step, or a rank that is not
        what it claims) the last agreed epoch stands and no plan starts (``_should_plan``).
        """
        alive = self.registry.alive
        if len(alive) != self.cfg.world_size:
            return
        epochs = {r.epoch for r in alive}
        if len(epochs) == 1:
            (epoch,) = epochs
            if epoch != self.epoch and epoch in self.placements:
                if self.epoch >= 0:
                    self.log.info("every rank reports placement epoch %d", epoch)
                else:
                    self.log.info("placement epoch %d adopted from the agents", epoch)
                self.epoch = epoch
                self.metrics.epoch.set(epoch)

    def _init_comm(self) -> None:
        """(Re)build the side communicator on every rank with a fresh generation."""
        self.comm_generation += 1
        self._comm_sent_generation = self.comm_generation
        self._comm_sent_at = time.monotonic()
        self.metrics.comm_generation.set(self.comm_generation)
        self._broadcast(self._current_comm())

    def _current_comm(self) -> P.CommInit:
        host, port = self.registry.agents[0].store
        return P.CommInit(generation=self.comm_generation, store_host=host, store_port=port,
                          world_size=self.cfg.world_size, nonce=self._nonce)

    def _on_load(self, record: AgentRecord, report: P.LoadReport) -> None:
        placement = self.placements.get(report.epoch)
        if placement is None:
            self.metrics.load_reports_dropped.labels("unknown_epoch").inc()
            return
        try:
            counts = report.slot_load.to_numpy("slot_load")
        except P.ProtocolError as exc:
            self.metrics.load_reports_dropped.labels("bad_array").inc()
            self.log.warning("rank %d sent a bad load report: %s", record.rank, exc)
            return
        if counts.shape != placement.shape:
            self.metrics.load_reports_dropped.labels("bad_shape").inc()
            self.log.warning("rank %d load report shape %s, expected %s", record.rank, counts.shape, placement.shape)
            return
        logical = self.window.to_logical(counts, placement, self.shape.num_logical)
        self.window.add(logical, report.step_begin, report.step_end)
        if self.recorder is not None:
            self.recorder.add(logical, report.step_begin, report.step_end, report.epoch, record.rank)
        record.step = max(record.step, report.step_end)
        self.max_step_seen = max(self.max_step_seen, report.step_end)
        self.metrics.load_reports.inc()
        self.metrics.load_report_lag.set(self.max_step_seen - report.step_end)

    def _lose_agent(self, record: AgentRecord, now: float) -> None:
        record.alive = False
        self.registry.remove(record.rank)
        self._comm_sent_generation = -1
        if self.plan is not None and self.plan.on_agent_lost(record.rank, now):
            self._advance_plan()
        self._update_liveness_metrics()

    def _update_liveness_metrics(self) -> None:
        self.metrics.agents_alive.set(len(self.registry.alive))
        for rank in range(self.cfg.world_size):
            record = self.registry.agents.get(rank)
            self.metrics.agent_up.labels(str(rank)).set(1 if record is not None and record.alive else 0)

    # -- periodic work ------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            try:
                await self._tick()
            except Exception as exc:  # noqa: BLE001 - one bad tick must not end liveness and planning
                self._internal_error("tick", exc)

    async def _tick(self) -> None:
        now = self.last_tick = time.monotonic()
        for record in self.registry.expire(now, self.cfg.liveness_timeout_s):
            self.log.error("rank %d silent for %.1fs: declared dead", record.rank, self.cfg.liveness_timeout_s)
            self._lose_agent(record, now)
        if self.plan is not None and self.plan.on_tick(now):
            self._advance_plan()
        self._publish_balancedness()
        if (self.registry.complete and not self.registry.comm_ready(self.comm_generation)
                and now - self._comm_sent_at > 2 * self.cfg.agent.transport_timeout_s + 2.0):
            # 2 x timeout: a rank still in its previous (failing) attempt is free again
            # before the next generation, so no rank stays one attempt behind.
            self.log.warning("side communicator generation %d not built on every rank; trying generation %d",
                             self.comm_generation, self.comm_generation + 1)
            self._init_comm()  # a CommInit was lost or a rendezvous failed
        if self.recorder is not None and now - self._last_trace_flush > 5.0:
            self._last_trace_flush = now
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.recorder.flush)
            except Exception as exc:  # noqa: BLE001 - a full or read-only disk ends recording, nothing else
                self._record_failed(exc)
        if self._should_plan():
            self._planning = True
            self._spawn(self._run_policy(), "policy")

    def _watch_epochs(self) -> None:
        """Halt, as for a diverged plan, when a rank keeps serving behind the others' epoch."""
        if self.halted_reason:
            return
        why = self.epoch_watch.observe({r.rank: self._beats[r.rank] for r in self.registry.alive if r.rank in self._beats})
        if why is not None:
            self.counts["diverged"] += 1
            self.metrics.plans.labels("diverged").inc()
            self.halted_reason = f"placements diverged: {why}"
            self.log.critical("%s; rebalancing halted, restart the deployment's agents", self.halted_reason)

    def _watch_step_clock(self, now: float) -> None:
        """Halt when a rank counts steps differently from the others (see ``step_clock``)."""
        if not self.cfg.check_step_clock or self.halted_reason:
            return
        states = self.step_clock.states(sorted(r.rank for r in self.registry.alive))
        for state in states.values():
            self.metrics.step_clock_offset.labels(str(state.rank)).set(float("nan") if state.offset is None else state.offset)
            if state.offset:
                self.counts["diverged"] += 1
                self.metrics.plans.labels("diverged").inc()
                self.halted_reason = (f"step clocks disagree: rank {state.rank} counts {state.offset:+d} step(s) against rank "
                                      f"{state.reference} (probes at steps {list(state.probes)}); a commit at step S would land "
                                      f"on different forward passes")
                self.log.critical("%s; rebalancing halted before any commit, restart the deployment's workers",
                                  self.halted_reason)
                if self.plan is not None and not self.plan.phase.final:
                    self._abort_plan(self.halted_reason, "step_clock")
                return
        unverified = [s.rank for s in states.values() if s.offset is None]
        if unverified and self.registry.complete:
            self._clock_unverified_since = self._clock_unverified_since or now
        else:
            self._clock_unverified_since = None

    def _clock_allows_planning(self, now: float) -> bool:
        """Plans wait until every rank's step clock is seen to match, up to ``step_clock_grace_s``."""
        if not self.cfg.check_step_clock or self._clock_unverified_since is None:
            return True
        waited = now - self._clock_unverified_since
        if waited < self.cfg.step_clock_grace_s:
            return False
        if not self._clock_warned:
            self._clock_warned = True
            self.log.warning("step clocks of some ranks could not be compared for %.0fs (ranks not stepping together, or "
                             "jitter as large as a step): planning without that check", waited)
        return True

    def _should_plan(self) -> bool:
        if self._planning or self.halted_reason or self.plan is not None or self._pending_batches:
            return False
        if self.window is None or not self.registry.comm_ready(self.comm_generation):
            return False
        if any(r.epoch != self.epoch for r in self.registry.alive):
            return False  # some rank has not reached the newest placement yet
        if not self._clock_allows_planning(time.monotonic()):
            return False
        step = self.registry.min_step()
        if self.drain_at_step is not None and self.max_step_seen >= self.drain_at_step:
            return False
        if self.cfg.initial_placement is not None and not self._seeded:
            return True
        return (self.window.steps_covered() >= self.cfg.min_window_steps
                and step - self._last_plan_end_step >= self.cfg.rebalance_interval_steps)

    async def _run_policy(self) -> None:
        from eplb_service.coordinator.policy import build_plan, plan_rebalance  # heavy imports only when planning

        loop = asyncio.get_running_loop()
        epoch = self.epoch
        current = self.placements[epoch].copy()
        load = self.window.load.copy()
        seeding = self.cfg.initial_placement is not None and not self._seeded
        t0 = time.perf_counter()
        try:
            if seeding:
                self._seeded = True
                seed = np.asarray(self.cfg.initial_placement, dtype=np.int64)
                validate_phy2log(seed, self.shape)
                call = functools.partial(build_plan, current, seed, load if load.any() else np.ones(load.shape), self.shape,
                                         bytes_per_expert=self.model.bytes_per_expert,
                                         staging_budget_bytes=self.cfg.staging_budget_bytes, require_gain=False)
            else:
                call = functools.partial(
                    plan_rebalance, self.cfg.policy, current, load, self.shape,
                    num_groups=self.cfg.num_groups, num_nodes=self.cfg.num_nodes,
                    bytes_per_expert=self.model.bytes_per_expert, staging_budget_bytes=self.cfg.staging_budget_bytes,
                    min_layer_gain=self.cfg.min_layer_gain)
            result = await loop.run_in_executor(self._executor, call)
        except Exception as exc:
            self.log.exception("policy %s failed: %s", self.cfg.policy, exc)
            self._last_plan_end_step = self.registry.min_step()
            return
        finally:
            self._planning = False
            self.metrics.phase_seconds.labels("policy").observe(time.perf_counter() - t0)
        self._last_plan_end_step = self.registry.min_step()
        gain = result.balancedness_after - result.balancedness_before
        self.metrics.balancedness.labels("projected").set(result.balancedness_after)
        if seeding:
            self.log.info("moving to the initial placement: %d batches, %d experts", len(result.batches), result.experts_moved)
        elif epoch != self.epoch or not result.batches or gain < self.cfg.min_gain:
            self.counts["skipped"] += 1
            self.metrics.plans.labels("skipped").inc()
            self.log.info("no rebalance: balancedness %.4f -> %.4f projected (gain %.4f < min_gain %.4f or nothing to move)",
                          result.balancedness_before, result.balancedness_after, gain, self.cfg.min_gain)
            return
        self.log.info("rebalance: balancedness %.4f -> %.4f projected, %d batches, %d experts, %.1f MiB",
                      result.balancedness_before, result.balancedness_after, len(result.batches),
                      result.experts_moved, result.bytes_moved / 2**20)
        self._pending_batches = list(result.batches)
        self._start_next_batch()

    def _start_next_batch(self) -> None:
        if not self._pending_batches or self.halted_reason:
            self._pending_batches = []
            return
        if not self.registry.comm_ready(self.comm_generation):
            self.log.warning("dropping %d planned batches: side communicator not ready", len(self._pending_batches))
            self._pending_batches = []
            return
        batch = self._pending_batches.pop(0)
        self._plan_counter += 1
        layers = [int(x) for x in batch.layers]
        rows = np.asarray(batch.phy2log, dtype=np.int64)
        candidate = self.placements[self.epoch].copy()
        try:
            candidate[layers] = rows
            validate_phy2log(candidate, self.shape)
        except (PlacementError, ValueError, IndexError) as exc:  # a policy bug must never reach the agents
            self.log.error("policy %s produced an invalid plan for layers %s: %s; not sent", self.cfg.policy, layers, exc)
            self.metrics.plans_aborted.labels("invalid_plan").inc()
            self.counts["aborted"] += 1
            self._pending_batches = []
            return
        self.plan = PlanRun(plan_id=self._plan_counter, base_epoch=self.epoch, layers=layers, rows=rows,
                            world_size=self.cfg.world_size, staging_timeout_s=self.cfg.staging_timeout_s,
                            voting_timeout_s=self.cfg.voting_timeout_s, started_at=time.monotonic(),
                            bytes_moved=int(batch.bytes_moved))
        self.counts["proposed"] += 1
        self._plan_numbers[self.plan.plan_id] = self.counts["proposed"]
        self.log.info("plan #%d (id %d): layers %s, %.1f MiB", self.counts["proposed"], self.plan.plan_id, layers,
                      self.plan.bytes_moved / 2**20)
        self.metrics.plans_proposed.inc()
        self._broadcast(P.Plan(plan_id=self.plan.plan_id, base_epoch=self.epoch, layers=layers, phy2log=P.NDArray.from_numpy(rows)))

    def _number(self, plan_id: int) -> int:
        return self._plan_numbers.get(plan_id, 0)

    def _abort_plan(self, reason: str, code: str = "other") -> None:
        """Before the vote: abort now. In the vote: only the decision record decides, so ask
        the ranks to record ``abort`` and let the plan settle on what they report."""
        plan = self.plan
        if plan is None:
            return
        if plan.phase is Phase.VOTING:
            if not plan.abort_requested:
                plan.abort_requested, plan.reason, plan.code = True, reason, code
        elif not plan.phase.final:
            plan._abort(reason, time.monotonic(), code)
        self._advance_plan()

    def _advance_plan(self) -> None:
        plan = self.plan
        if plan is None:
            return
        if plan.phase is Phase.VOTING and plan.abort_requested and not plan.abort_sent:
            plan.abort_sent = True  # ranks in their vote record "abort" unless "commit" is there already
            self._broadcast(P.AbortPlan(plan_id=plan.plan_id, reason=plan.reason, code=plan.code or "other"))
            return
        if plan.phase is Phase.VOTING and not plan.committed and not plan.aborted and not plan.vote_sent:
            plan.vote_sent = True
            self._broadcast(P.VoteNow(plan_id=plan.plan_id))
            return
        if not plan.phase.final:
            return
        self.plan = None
        experts_moved = 0
        commit_step = None
        if plan.phase is Phase.COMMITTED:
            old = self.placements[plan.base_epoch]
            new = old.copy()
            new[plan.layers] = plan.rows
            experts_moved = int((old != new).sum())
            self.epoch = plan.base_epoch + 1
            self.placements[self.epoch] = new
            for stale in [e for e in self.placements if e <= self.epoch - _HISTORY_EPOCHS]:
                del self.placements[stale]
            commit_step = max(step for step, _ in plan.committed.values())
            self.bytes_moved_total += plan.bytes_moved
            self.experts_moved_total += experts_moved
            self.counts["committed"] += 1
            self.metrics.plans.labels("committed").inc()
            self.metrics.bytes_moved.inc(plan.bytes_moved)
            self.metrics.experts_moved.inc(experts_moved)
            self.metrics.epoch.set(self.epoch)
            self.log.info("plan #%d committed at step %d: layers %s, %d experts moved, epoch %d",
                          self._number(plan.plan_id), commit_step, plan.layers, experts_moved, self.epoch)
            self._start_next_batch()
        else:
            key = "diverged" if plan.phase is Phase.DIVERGED else "aborted"
            self.counts[key] += 1
            self.metrics.plans.labels(key).inc()
            self.metrics.plans_aborted.labels((plan.code or "other") if key == "aborted" else "diverged").inc()
            self._broadcast(P.AbortPlan(plan_id=plan.plan_id, reason=plan.reason, code=plan.code or "other"))
            self._pending_batches = []
            if plan.phase is Phase.DIVERGED:
                self.halted_reason = f"plan #{self._number(plan.plan_id)} (id {plan.plan_id}) diverged: {plan.reason}"
                self.log.critical("%s; rebalancing halted, restart the deployment's agents", self.halted_reason)
            else:
                self.log.warning("plan #%d aborted (%s): %s; maps untouched on every rank", self._number(plan.plan_id),
                                 plan.code or "other", plan.reason)
                if self.registry.complete:
                    self._init_comm()  # a rank may have torn its communicator down
        self.metrics.phase_seconds.labels("staging").observe(plan.staging_s)
        self.metrics.phase_seconds.labels("voting").observe(plan.voting_s)
        self._last_plan_end_step = self.registry.min_step()
        stalls = [s for _, s in plan.committed.values()]
        self.outcomes.append(PlanOutcome(plan.plan_id, plan.phase.value, plan.reason, self._number(plan.plan_id),
                                         plan.code if plan.phase is Phase.ABORTED else "", plan.layers, plan.bytes_moved,
                                         experts_moved, commit_step, plan.staging_s, plan.voting_s, max(stalls, default=0.0)))
        del self.outcomes[:-100]
        for old in list(self._plan_numbers)[:-100]:
            del self._plan_numbers[old]

    # -- views ----------------------------------------------------------------------------

    def current_balancedness(self) -> tuple[float, np.ndarray] | None:
        if self.window is None or self.epoch not in self.placements or not self.window.load.any():
            return None
        loads = rank_loads(self.placements[self.epoch], self.window.load, self.cfg.world_size)
        return model_balancedness(loads), layer_balancedness(loads)

    def _publish_balancedness(self) -> None:
        current = self.current_balancedness()
        if current is not None:
            self.metrics.balancedness.labels("current").set(current[0])

    def status(self) -> dict:
        """The status document (``eplb-coordinator status``, ``StatusReply``)."""
        now = time.monotonic()
        current = self.current_balancedness()
        clocks = self.step_clock.states(sorted(r.rank for r in self.registry.alive)) if self.cfg.check_step_clock else {}
        ranks = []
        for rank in range(self.cfg.world_size):
            record = self.registry.agents.get(rank)
            clock = clocks.get(rank)
            ranks.append(None if record is None else {
                "rank": rank, "alive": record.alive, "node": record.node, "pid": record.pid,
                "last_seen_s": round(now - record.last_seen, 3), "step": record.step, "epoch": record.epoch,
                "comm_generation": record.comm_generation, "internal_errors": record.internal_errors,
                "step_clock_offset": None if clock is None else clock.offset,
            })
        plan = self.plan
        return {
            "world_size": self.cfg.world_size, "endpoint": self.cfg.endpoint, "policy": self.cfg.policy, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3), "epoch": self.epoch,
            "comm_generation": self.comm_generation, "ranks": ranks, "halted": self.halted_reason,
            "plan_in_flight": None if plan is None else {"number": self._number(plan.plan_id), "plan_id": plan.plan_id,
                                                         "phase": plan.phase.value, "layers": plan.layers},
            "plans": dict(self.counts), "bytes_moved": self.bytes_moved_total, "experts_moved": self.experts_moved_total,
            "last_plans": [o.__dict__ for o in self.outcomes[-10:]],
            "load_reports": self.window.reports if self.window else 0,
            "balancedness": None if current is None else {
                "model": current[0], "layer_min": float(current[1].min()), "layer_mean": float(current[1].mean()),
                "layer_max": float(current[1].max()),
            },
            "max_step_seen": self.max_step_seen,
        }
