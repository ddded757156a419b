"""The worker agent: its background thread, and the object the host process holds.

One agent per EP rank. The host (vLLM plugin or the simulated serving loop) builds an
:class:`~.expert_model.ExpertModel`, creates a :class:`WorkerAgent`, calls ``start()``,
and from then on calls ``agent.hooks.before_step()`` / ``agent.hooks.after_step(load)``
from its serving loop. Everything else — the DEALER socket, the side communicator, the
staging, the vote — happens on the agent's own thread.

Plan life on an agent: ``Plan`` → validate → build the global schedule → stage (local
copies, chunked remote exchange, duplicates) → ``Staged`` → ``VoteNow`` → vote on the
side communicator with (entry step, ok, digests) → propose ``commit S`` or ``abort`` to the
plan's decision record (``decision``) → the serving thread applies the plan at step ``S``
exactly when the record says ``commit`` → ``Committed`` / ``Aborted``. At any failure the
maps stay untouched.

The loop is supervised: an unexpected exception is logged with its traceback, counted
(``internal_errors``, sent in heartbeats) and turns into a clean reset (a plan not yet voted
is dropped, one in its vote is asked to abort in the record, the transport is torn down, and
the agent registers again on a fresh socket), never a dead thread.
"""

from __future__ import annotations

import collections
import os
import secrets
import socket
import threading
import time

import numpy as np
import zmq

from eplb_service import protocol as P
from eplb_service.logutil import rank_logger
from eplb_service.placement import PlacementError, validate_phy2log
from eplb_service.security import ClientCurve
from eplb_service.step_clock import probes_from_ring
from eplb_service.worker_agent.decision import Decider, Decision, DecisionRecord, StoreDecisionRecord
from eplb_service.worker_agent.expert_model import ExpertModel
from eplb_service.worker_agent.rendezvous import RendezvousError, host_once
from eplb_service.worker_agent.schedule import build_schedule, chunk_transfers
from eplb_service.worker_agent.serving_hooks import CommitTicket, ServingHooks
from eplb_service.worker_agent.staging import StagingArea, prepare_commit
from eplb_service.worker_agent.transport import P2POp, Transport, TransportError


_NO_DIGEST = -(1 << 62)
"""Vote entry of a rank that took no part in a remote op (below every real digest)."""


class CpuSections:
    """CPU time of this thread per section of a handler, added to ``stats[f"{prefix}_{name}_cpu_us"]``.

    The agent thread shares the GIL with the serving thread, so its CPU time is what it can
    take from serving; the sections say where it goes (``thread_time``: a few hundred ns a mark).
    """

    __slots__ = ("stats", "prefix", "last")

    def __init__(self, stats: collections.Counter, prefix: str) -> None:
        self.stats, self.prefix, self.last = stats, prefix, time.thread_time()

    def mark(self, name: str) -> None:
        now = time.thread_time()
        self.stats[f"{self.prefix}_{name}_cpu_us"] += int((now - self.last) * 1e6)
        self.last = now


def weights_row(tensors: list, row: int) -> list:
    """One expert's row of every weight tensor of a layer: one record."""
    return [t[row] for t in tensors]


class PlanAborted(Exception):
    """Staging stopped because the coordinator aborted the plan."""


SILENCE_HEARTBEATS = 4
"""Heartbeat intervals without a word from the coordinator before the agent reopens its
socket (a connection can be dead both ways while both ends believe it open)."""


class WorkerAgent:
    """Owns the agent thread of one rank. Thread-safe entry points: ``start``, ``stop``."""

    def __init__(self, model: ExpertModel, endpoint: str, transport: Transport, *,
                 ranks_per_node: int | None = None, hello_interval_s: float = 0.5,
                 staged_timeout_s: float = 60.0, curve: ClientCurve | None = None) -> None:
        self.model = model
        self.rank = model.rank
        self.endpoint = endpoint
        self.transport = transport
        self.ranks_per_node = ranks_per_node
        self.hello_interval_s = hello_interval_s
        self._hello_backoff_s = hello_interval_s
        """Doubles up to 5 s while the coordinator does not answer; reset by Welcome."""
        self.staged_timeout_s = staged_timeout_s
        self.curve = curve if curve is not None else ClientCurve.from_env()
        """CURVE keys for a coordinator on another host (``EPLB_SERVICE_CURVE_*`` by default)."""
        self.config = P.AgentConfig()
        self.hooks = ServingHooks(model, self.config.report_interval_steps, self.config.fence_steps,
                                  self.config.fence_timeout_s, decision_timeout_s=self.config.decision_timeout_s)
        self.log = rank_logger(__name__, self.rank)
        self.phy2log_host = model.phy2log.detach().cpu().numpy().astype(np.int64).copy()
        self.shape = model.shape
        self.bytes_per_expert = model.bytes_per_expert
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._ctx: zmq.Context | None = None
        self._welcomed = False
        self._rejected_reason: str | None = None
        self._next_hello = 0.0
        self._next_heartbeat = 0.0
        self._session = 0
        """From ``Welcome``; every message carries it, and a Hello after a reopen resumes it."""
        self._last_heard = 0.0
        self._store: tuple[str, int] | None = None
        """Rank 0: where the rendezvous store it hosts is reached."""
        self.decider = Decider(self.rank)
        self.record_factory = StoreDecisionRecord
        """Builds the decision record from a ``CommInit``'s store address (tests swap in their own)."""
        self._record: DecisionRecord | None = None
        """The decision record of the current rendezvous store (from ``CommInit``)."""
        self._inbox: collections.deque = collections.deque()
        # current plan batch
        self._plan: P.Plan | None = None
        self._plan_rows: np.ndarray | None = None
        self._area: StagingArea | None = None
        self._ticket: CommitTicket | None = None
        self._ticket_generation = -1
        """Side-communicator generation the ticket's vote ran on (torn down after an abort)."""
        self._staged_at = 0.0
        self._abort_requested: int | None = None
        self._seen_plans: collections.deque[int] = collections.deque(maxlen=256)
        self._voted_plans: collections.deque[int] = collections.deque(maxlen=256)
        self._digests: np.ndarray | None = None
        """Integrity digests of this plan's remote rows (see ``_vote_vector``)."""
        self._connecting: threading.Thread | None = None
        self._pending_comm: P.CommInit | None = None
        self._connecting_comm: P.CommInit | None = None
        self._comm_current: P.CommInit | None = None
        self.stats = collections.Counter()

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

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        self._ctx = zmq.Context()
        self.decider.start()
        if self.rank == 0:
            try:
                hosted = host_once(self.endpoint, self.shape.num_ranks)
                self._store = (hosted.host, hosted.port)
                self.log.info("hosting the rendezvous store at %s:%d", hosted.host, hosted.port)
            except RendezvousError as exc:
                self._rejected_reason = str(exc)
                self.log.error("%s; the agent stays idle, serving is unaffected", exc)
        self._open_socket()
        self.log.info("agent started, coordinator %s, transport %s", self.endpoint, self.transport.name)
        failures_in_a_row = 0
        while not self._stop.is_set():
            try:
                self._tick(poll_ms=5)
                failures_in_a_row = 0
            except Exception as exc:  # supervised: never a dead agent thread
                failures_in_a_row += 1
                self.stats["internal_errors"] += 1
                self.log.exception("agent loop failed (%d in a row); resetting: no plan is applied half, the agent "
                                   "registers again", failures_in_a_row)
                self._reset(f"internal error: {type(exc).__name__}: {exc}")
                self._stop.wait(min(5.0, 0.05 * 2 ** failures_in_a_row))
        try:
            self._shutdown()
        finally:
            self.decider.stop()

    def _open_socket(self) -> None:
        """A fresh DEALER with a fresh identity: a reopened agent never collides with its old pipe."""
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"rank-{self.rank}-{secrets.token_hex(6)}".encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoint)
        self._sock = sock
        self._last_heard = time.monotonic()

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
        self._next_hello = 0.0
        self._open_socket()

    def _tick(self, poll_ms: int) -> None:
        now = time.monotonic()
        if now - self._last_heard > SILENCE_HEARTBEATS * self.config.heartbeat_interval_s + 1.0:
            self.stats["socket_reopened"] += 1
            self.log.warning("nothing from the coordinator for %.1fs: reopening the connection", now - self._last_heard)
            self._reopen()
        if not self._welcomed and now >= self._next_hello and self._rejected_reason is None:
            self._send(self._hello())
            self._next_hello = now + self._hello_backoff_s
            self._hello_backoff_s = min(5.0, self._hello_backoff_s * 2)
        self._receive(poll_ms)
        while self._inbox:
            self._handle(self._inbox.popleft())
        self._flush_load_reports()
        self._check_connect()
        self._check_ticket()
        if self._plan is not None and self._ticket is None and now - self._staged_at > self.staged_timeout_s and self._staged_at:
            self._drop_plan("no_vote", f"no vote within staged_timeout_s={self.staged_timeout_s}")
        self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        if self._welcomed and now >= self._next_heartbeat:
            gen = self.transport.generation if self._side_ready else -1
            # Read the step before the epoch: the serving thread bumps the epoch at the commit
            # boundary before the step count passes S, so (step > S, epoch = old) never pairs up
            # falsely; the coordinator relies on this to tell a missed commit from a slow one.
            step = self.hooks.steps_done
            epoch = self.hooks.epoch
            steps, times = probes_from_ring(self.hooks.step_end_times, step)
            clock = P.StepClock(probe_steps=steps, times=times, radius=3, wall_minus_mono=time.time() - time.monotonic())
            counters = {name: int(self.stats[name]) for name in P.AGENT_COUNTERS if self.stats[name]}
            counters["dropped_load_windows"] = self.hooks.dropped_windows
            self._send(P.Heartbeat(rank=self.rank, step=step, epoch=epoch, comm_generation=gen, session=self._session,
                                   internal_errors=self.stats["internal_errors"], clock=clock, counters=counters))
            self._next_heartbeat = now + self.config.heartbeat_interval_s

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
            if self._sock is not None:
                if self._welcomed:
                    self._send(P.Goodbye(rank=self.rank, reason="agent stopped", session=self._session))
                self._sock.close(linger=200)
        finally:
            self.transport.abort()
            if self._ctx is not None:
                self._ctx.term()
        self.log.info("agent stopped")

    # -- messaging ---------------------------------------------------------------------

    def _send(self, message: P.Message) -> None:
        assert self._sock is not None
        try:
            self._sock.send(P.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["send_dropped"] += 1

    def _receive(self, poll_ms: int) -> None:
        sock = self._sock
        if not sock.poll(poll_ms, zmq.POLLIN):
            return
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                message = P.decode(frame)
            except P.ProtocolError as exc:
                self.stats["bad_messages"] += 1
                self.log.error("dropped a bad message from the coordinator: %s", exc)
                continue
            if isinstance(message, P.AbortPlan):
                self._abort_requested = message.plan_id
            self._inbox.append(message)

    def _hello(self) -> P.Hello:
        shape = self.shape
        return P.Hello(
            protocol_version=P.PROTOCOL_VERSION, rank=self.rank,
            model=P.ModelShape(num_layers=shape.num_layers, num_logical=shape.num_logical,
                               num_physical=shape.num_physical, num_ranks=shape.num_ranks,
                               bytes_per_expert=self.bytes_per_expert),
            phy2log=P.NDArray.from_numpy(self.phy2log_host), epoch=self.hooks.epoch,
            step=self.hooks.steps_done, transport=self.transport.name,
            node=socket.gethostname(), pid=os.getpid(),
            store_host=self._store[0] if self._store else "", store_port=self._store[1] if self._store else 0,
            resume_session=self._session,
        )

    def _handle(self, message: P.Message) -> None:
        name = self._handlers.get(type(message))
        if name is None:
            self.log.warning("ignored unexpected %s from the coordinator", type(message).__name__)
            return
        getattr(self, name)(message)

    def _on_stopping(self, message: P.CoordinatorStopping) -> None:
        self.log.warning("coordinator stopping (%s); serving continues, will register again", message.reason)
        self._abandon_plan("coordinator_stopping", "coordinator stopping")
        self._welcomed = False
        self._next_hello = time.monotonic() + self.hello_interval_s

    def _on_heartbeat_ack(self, message: P.HeartbeatAck) -> None:
        if self._welcomed and message.session != self._session:
            self.log.warning("heartbeat answered for session %d, this agent holds %d: registering again",
                             message.session, self._session)
            self._welcomed = False

    def _on_welcome(self, msg: P.Welcome) -> None:
        self.config = msg.config
        hooks = self.hooks
        hooks.report_interval_steps = msg.config.report_interval_steps
        hooks.fence_steps = msg.config.fence_steps
        hooks.fence_timeout_s = msg.config.fence_timeout_s
        hooks.decision_timeout_s = msg.config.decision_timeout_s
        if self._welcomed and msg.session == self._session and msg.comm is None:
            return  # a duplicate (our Hello was retried or duplicated)
        self._welcomed = True
        self._session = msg.session
        self._hello_backoff_s = self.hello_interval_s
        self.log.info("welcomed by the coordinator (epoch %d, step %d)", hooks.epoch, hooks.steps_done)
        if msg.comm is not None:
            self._connect(msg.comm)

    def _on_reject(self, msg: P.Reject) -> None:
        if msg.code in ("unknown_agent", "stale_session"):
            # The coordinator restarted (or declared us dead): register again. Every queued
            # heartbeat draws one of these; the Hello back-off keeps it to one Hello.
            self._welcomed = False
            return
        if msg.code == "rank_taken":
            self.stats["rank_taken"] += 1
            self.log.warning("coordinator: %s; trying again", msg.reason)
            return
        if msg.code == "bad_message":
            self.stats["bad_messages_reported"] += 1
            self.log.error("coordinator could not decode a message of this agent: %s", msg.reason)
            return
        self._rejected_reason = msg.reason
        self._welcomed = False
        self.log.error("coordinator refused this agent: %s; the agent stays idle, serving is unaffected", msg.reason)

    def _connect(self, comm: P.CommInit) -> None:
        """Join the side communicator on a helper thread, so heartbeats go on meanwhile.

        Building a communicator is a rendezvous of every rank and can take up to the
        transport timeout when a peer is gone; the agent thread must keep talking to the
        coordinator in the meantime or it would be declared dead itself.
        """
        if comm == self._comm_current and self._side_ready:
            return  # already built from this very rendezvous (a repeated CommInit)
        if comm.world_size != self.shape.num_ranks or not comm.store_host or not comm.store_port:
            self.stats["bad_messages"] += 1
            self.log.error("ignored a CommInit for %d ranks at %r:%d; this deployment has %d ranks and needs a store address",
                           comm.world_size, comm.store_host, comm.store_port, self.shape.num_ranks)
            return
        self._abandon_plan("comm_rebuilt", f"side communicator rebuilt (generation {comm.generation})")
        if self._record is None or self._record.address != f"{comm.store_host}:{comm.store_port}":
            self._record = self.record_factory(comm.store_host, comm.store_port, self.config.transport_timeout_s)
        if self._connecting is not None and self._connecting.is_alive():
            # Build it once this attempt ends, unless it is the very rendezvous being attempted
            # (a duplicate): retrying that alone would leave this rank one attempt behind.
            if comm != self._connecting_comm:
                self._pending_comm = comm
            return
        self.transport.abort()

        def connect() -> None:
            t0 = time.monotonic()
            try:
                self.transport.connect(comm, self.rank, self.config.transport_timeout_s)
            except TransportError as exc:
                self.log.error("could not build the side communicator: %s", exc)
                return
            self._comm_current = comm
            self.log.info("side communicator generation %d ready (%s, %.2fs)", comm.generation, self.transport.name, time.monotonic() - t0)

        self._connecting_comm = comm
        self._connecting = threading.Thread(target=connect, name=f"eplb-connect-{self.rank}", daemon=True)
        self._connecting.start()

    def _check_connect(self) -> None:
        if self._pending_comm is not None and not (self._connecting and self._connecting.is_alive()):
            comm, self._pending_comm = self._pending_comm, None
            self._connect(comm)

    @property
    def _side_ready(self) -> bool:
        return self.transport.connected and not (self._connecting is not None and self._connecting.is_alive())

    # -- load reports --------------------------------------------------------------------

    def _flush_load_reports(self) -> None:
        hooks = self.hooks
        while hooks.snapshots:
            snap = hooks.snapshots[0]
            if snap.event is not None and not snap.event.query():
                return
            hooks.snapshots.popleft()
            counts = hooks.host_buffers[snap.buffer_index].numpy().copy()
            hooks.free_buffers.append(snap.buffer_index)
            if self._welcomed:
                self._send(P.LoadReport(rank=self.rank, epoch=snap.epoch, step_begin=snap.step_begin, step_end=snap.step_end,
                                        slot_load=P.NDArray.from_numpy(counts), session=self._session))

    # -- plans -------------------------------------------------------------------------

    def _validate_plan(self, plan: P.Plan) -> np.ndarray:
        shape = self.shape
        if plan.base_epoch != self.hooks.epoch:
            raise PlacementError(f"plan {plan.plan_id} is for epoch {plan.base_epoch}, this rank is at epoch {self.hooks.epoch}")
        rows = plan.phy2log.to_numpy("plan.phy2log")
        layers = list(plan.layers)
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= shape.num_layers:
            raise PlacementError(f"plan {plan.plan_id}: layers {layers} must be distinct and in [0, {shape.num_layers})")
        if rows.shape != (len(layers), shape.num_physical):
            raise PlacementError(f"plan {plan.plan_id}: phy2log shape {rows.shape}, expected {(len(layers), shape.num_physical)}")
        full = self.phy2log_host.copy()
        full[layers] = rows
        validate_phy2log(full, shape)
        width = int(self.model.log2phy.shape[2])
        max_replicas = int(np.bincount(rows.ravel().astype(np.int64) + np.repeat(np.arange(len(layers)) * shape.num_logical, shape.num_physical)).max())
        if max_replicas > width:
            raise PlacementError(f"plan {plan.plan_id}: an expert gets {max_replicas} replicas, more than the map width {width}")
        return rows.astype(np.int64)

    def _on_plan(self, plan: P.Plan) -> None:
        if plan.plan_id in self._seen_plans:
            self.stats["duplicate_messages"] += 1
            return
        self._seen_plans.append(plan.plan_id)
        busy = self._plan or (self._ticket and self._ticket.plan_id)
        if busy:
            self._failed(plan.plan_id, "busy", f"busy with plan {busy.plan_id if isinstance(busy, P.Plan) else busy}")
            return
        try:
            rows = self._validate_plan(plan)
        except (PlacementError, P.ProtocolError) as exc:
            self.stats["plans_rejected"] += 1
            self.log.error("rejected plan %d: %s", plan.plan_id, exc)
            self._failed(plan.plan_id, "invalid_plan", str(exc))
            return
        if not self._side_ready or self._record is None:
            self._failed(plan.plan_id, "not_connected", "side communicator not connected")
            return
        self._plan, self._plan_rows, self._abort_requested = plan, rows, None
        t0 = time.monotonic()
        cpu0 = time.thread_time()
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
            self._failed(plan.plan_id, "staging_failed", f"staging failed: {exc}")
            return
        self._staged_at = time.monotonic()
        # The agent thread's CPU time holds the GIL the serving thread needs: keep it visible.
        self.stats["stage_cpu_us"] += int((time.thread_time() - cpu0) * 1e6)
        self.stats["staged"] += 1
        self._send(P.Staged(rank=self.rank, plan_id=plan.plan_id, bytes_received=received, duration_s=self._staged_at - t0,
                            session=self._session))

    def _failed(self, plan_id: int, code: str, reason: str) -> None:
        self._send(P.Failed(rank=self.rank, plan_id=plan_id, reason=reason, session=self._session, code=code))

    def _aborted(self, plan_id: int, code: str, reason: str) -> None:
        self._send(P.Aborted(rank=self.rank, plan_id=plan_id, reason=reason, session=self._session, code=code))

    def _stage(self, plan: P.Plan, rows: np.ndarray) -> int:
        """Fill this rank's staging rows; returns bytes received from other ranks.

        Every rank of the plan runs the same chunks in the same order, each one group of
        whole blocks (one op per peer: records of every weight tensor), and the same throttle gap after
        each, even a rank with no part in a chunk: the gaps are what keep the ranks' groups
        starting together (see ``CupyNcclTransport``).
        """
        layers = list(plan.layers)
        cfg = self.config
        bpe = self.bytes_per_expert
        cpu = CpuSections(self.stats, "stage")
        schedule = build_schedule(self.phy2log_host[layers], rows, self.shape.num_ranks, self.ranks_per_node)
        bounds = schedule.chunks(cfg.max_ops_per_group, cfg.chunk_bytes, bpe)
        schedule = schedule.contiguous_by_source(bounds)
        work = schedule.per_rank[self.rank]
        area = self._area = StagingArea(self.model, work)
        weights = self.model.expert_weights
        transport = self.transport
        me = threading.get_ident()

        def pump() -> None:  # called by the transport while it waits on the host
            if threading.get_ident() == me:
                self._pump_while_staging(plan.plan_id)

        transport.poll_hook = pump
        cpu.mark("plan")
        try:
            transport.start_batch()
            for copy in work.local:
                for k, live in enumerate(weights[layers[copy.layer]]):
                    transport.copy_local(area.rows[k][copy.dst_staging], live[copy.src_row])
            cpu.mark("local")
            received = 0
            pending: list[tuple[list[int], object]] = []  # (remote op indices, their digests)
            for number, (begin, end) in enumerate(bounds):
                part = chunk_transfers(schedule, self.rank, begin, end)
                ops: list[P2POp] = []
                blocks = []
                for peer, sent in part.sends.items():
                    block = transport.gather([weights_row(weights[layers[layer]], row) for layer, row in sent], area.layout)
                    ops.append(P2POp(True, block, peer, number))
                    blocks.append((part.send_ops[peer], block))
                for peer, (first, count) in part.receives.items():
                    block = area.block(first, count)
                    ops.append(P2POp(False, block, peer, number))
                    blocks.append((part.receive_ops[peer], block))
                    received += count * bpe
                cpu.mark("pack")
                # The throttle: the busiest rank's bytes in this chunk over the rate, the same
                # figure on every rank.
                pace_s = schedule.chunk_cost_bytes(begin, end, bpe) / cfg.throttle_bytes_per_s if cfg.throttle_bytes_per_s > 0 else 0.0
                transport.exchange(ops, pace_s)
                cpu.mark("exchange")
                pending.extend((indices, transport.block_digests(block)) for indices, block in blocks)
                cpu.mark("digest")
                self._pump_while_staging(plan.plan_id)
                cpu.mark("pump")
            for dup in work.duplicates:
                transport.copy_local(area.block(dup.dst_staging, 1), area.block(dup.src_staging, 1))
            transport.synchronize()
            cpu.mark("synchronize")
            self._digests = self._remote_digests(len(schedule.remote), pending)
            cpu.mark("collect")
        finally:
            transport.poll_hook = None
        self.stats["bytes_received"] += received
        return received

    def _remote_digests(self, num_remote: int, pending: list[tuple[list[int], object]]) -> np.ndarray:
        """Digest of every remote op's record as this rank sent or received it (sentinel if neither)."""
        digests = np.full(num_remote, _NO_DIGEST, dtype=np.int64)
        if pending:
            for (indices, _), values in zip(pending, self.transport.collect([d for _, d in pending])):
                digests[indices] = values
        return digests

    def _on_vote(self, msg: P.VoteNow) -> None:
        """Enter the commit vote: one small MAX all-reduce of (entry step, fail, plan id, digests)."""
        if msg.plan_id in self._voted_plans:
            self.stats["duplicate_messages"] += 1
            return
        self._voted_plans.append(msg.plan_id)
        cpu0 = time.thread_time()
        try:
            self._vote(msg)
        finally:
            self.stats["vote_cpu_us"] += int((time.thread_time() - cpu0) * 1e6)
            self.stats["votes"] += 1

    def _vote(self, msg: P.VoteNow) -> None:
        """Arm the commit ticket, all-reduce (entry step, fail, plan id, digests), then propose
        the outcome to the plan's decision record. The record's answer, not the all-reduce,
        decides: the serving thread applies the plan iff the record says ``commit``."""
        ready = (self._plan is not None and self._plan.plan_id == msg.plan_id and self._area is not None
                 and self._ticket is None and self._record is not None)
        ticket = None
        hooks = self.hooks
        cpu = CpuSections(self.stats, "vote")
        if ready:
            with self.transport.device_context():  # complete when the vote below returns
                action = prepare_commit(self.model, msg.plan_id, list(self._plan.layers), self._plan_rows, self._area)
            cpu.mark("prepare")
            ticket = CommitTicket(action=action, layers=list(self._plan.layers), rows=self._plan_rows, record=self._record)
            ticket.propose_abort = lambda code, reason, t=ticket: self._propose(t, Decision.abort(self.rank, reason, code))
            self._ticket_generation = self.transport.generation
            hooks.ticket = ticket
            entry = hooks.steps_done
            ticket.vote_entry_step = entry
            # If the serving thread passed entry+F before it could see the entry, this rank
            # cannot honour the fence: vote "fail" so that no rank commits.
            fail = 1 if hooks.steps_done >= entry + hooks.fence_steps else 0
            self._ticket = ticket
        else:
            entry, fail = hooks.steps_done, 1
        if not self._side_ready:
            if ticket is not None:
                ticket.propose_abort("not_connected", "side communicator not connected at the vote")
            else:
                self._aborted(msg.plan_id, "not_connected", "side communicator not connected at vote")
            return
        me = threading.get_ident()

        def keep_alive() -> None:  # called by the transport while the vote is pending
            if threading.get_ident() != me:
                return
            self._heartbeat(time.monotonic())  # a slow vote must not get this rank declared dead
            self._receive(0)  # keeps the link fresh; an AbortPlan is handled once the vote returns
            if ticket is not None and ticket.is_decided:
                # The record is final (this rank's serving thread, or another rank, got there
                # first): nothing the all-reduce returns can change it.
                raise TransportError(f"left the vote: the decision record already says {ticket.decision.describe()}")

        self.transport.poll_hook = keep_alive
        try:
            result = self.transport.max_reduce(self._vote_vector(entry, fail, msg.plan_id, ready))
            cpu.mark("reduce")
        except TransportError as exc:
            self.log.error("vote for plan %d: %s", msg.plan_id, exc)
            self.transport.abort()  # a pending collective must not meet a later one
            if ticket is not None:
                self._propose(ticket, Decision.abort(self.rank, f"vote_failed: {exc}", "vote_failed"))
            else:
                self._aborted(msg.plan_id, "vote_failed", f"vote failed: {exc}")
            return
        finally:
            self.transport.poll_hook = None
        ok = int(result[1]) == 0 and int(result[2]) == msg.plan_id and int(result[3]) == -msg.plan_id
        reason, code = "vote_failed: a rank was not ready", "vote_failed"
        corrupt = self._corrupt_ops(result)
        if ok and corrupt:
            ok = False
            self.stats["integrity_failures"] += 1
            reason = f"vote_failed: integrity: row digests differ between sender and receiver for remote ops {corrupt[:8]}"
            code = "integrity"
            self.log.error("plan %d: expert rows corrupted in transit (remote ops %s); nobody commits", msg.plan_id, corrupt[:8])
        if ticket is None:
            self._aborted(msg.plan_id, "not_staged", "vote arrived for a plan this rank has not staged")
            return
        proposal = Decision.commit_at(int(result[0]) + hooks.fence_steps, self.rank) if ok else Decision.abort(self.rank, reason, code)
        self._propose(ticket, proposal)

    def _propose(self, ticket: CommitTicket, proposal: Decision) -> None:
        """To the record the ticket was armed with (never a newer store's): answered on the decider thread."""
        self.decider.submit(ticket, ticket.record, proposal)

    def _vote_vector(self, entry: int, fail: int, plan_id: int, ready: bool) -> np.ndarray:
        """``[entry, fail, plan_id, -plan_id, d_0..d_K-1, -d_0..-d_K-1]`` for the MAX all-reduce.

        ``d_k`` is this rank's digest of remote op ``k``'s row (sent or received), or a
        sentinel when it took no part. After MAX over ranks, slot ``k`` holds the larger
        of sender's and receiver's digest and slot ``K+k`` minus the smaller: they agree
        exactly when both digests are equal, so every rank learns of any corrupt row.
        """
        head = np.array([entry, fail, plan_id, -plan_id], dtype=np.int64)
        digests = self._digests if ready and self._digests is not None else np.empty(0, dtype=np.int64)
        negated = np.where(digests == _NO_DIGEST, _NO_DIGEST, -digests)
        return np.concatenate([head, digests, negated])

    @staticmethod
    def _corrupt_ops(result: np.ndarray) -> list[int]:
        body = result[4:]
        k = body.size // 2
        return np.flatnonzero(body[:k] != -body[k:]).tolist()

    def _check_ticket(self) -> None:
        """Report the decision once it is known (``Voted``), and the outcome once served."""
        ticket = self._ticket
        if ticket is None:
            return
        if ticket.is_decided and not ticket.voted_reported:
            ticket.voted_reported = True
            decision = ticket.decision
            if decision.commit:
                self._send(P.Voted(rank=self.rank, plan_id=ticket.plan_id, commit_step=decision.commit_step, ok=True,
                                   session=self._session))
            else:
                self._send(P.Voted(rank=self.rank, plan_id=ticket.plan_id, commit_step=0, ok=False, session=self._session))
        if not ticket.finished.is_set():
            return
        self._ticket = None
        if ticket.outcome == "committed":
            self.phy2log_host[ticket.layers] = ticket.rows
            self.stats["committed"] += 1
            self.log.info("committed plan %d at step %d (epoch %d, stall %.1f us)", ticket.plan_id, ticket.outcome_step,
                          self.hooks.epoch, ticket.stall_s * 1e6)
            self._send(P.Committed(rank=self.rank, plan_id=ticket.plan_id, commit_step=ticket.outcome_step,
                                   epoch=self.hooks.epoch, stall_s=ticket.stall_s, session=self._session))
        else:
            self.stats["aborted"] += 1
            reason = ticket.outcome if ticket.outcome != "aborted" else ticket.reason
            code = ticket.code if ticket.outcome == "aborted" and ticket.code else "missed_commit_step"
            self.log.warning("plan %d not committed at step %d: %s; maps untouched", ticket.plan_id, ticket.outcome_step, reason)
            if self.transport.generation == self._ticket_generation:
                self.transport.abort()  # a vote left pending on some rank must never meet a later collective
            self._aborted(ticket.plan_id, code, reason)
        if self._plan is not None and self._plan.plan_id == ticket.plan_id:
            self._clear_plan()

    def _clear_plan(self) -> None:
        self._plan = self._area = self._plan_rows = None
        self._staged_at = 0.0

    def _on_abort(self, msg: P.AbortPlan) -> None:
        ticket = self._ticket
        if ticket is not None and ticket.plan_id == msg.plan_id:
            # In the vote: only the record decides. Ask for abort there; if commit is there
            # already, this rank commits at S like every other, and says so in Voted.
            if not ticket.is_decided:
                self._propose(ticket, Decision.abort(self.rank, f"aborted by the coordinator: {msg.reason}",
                                                     "aborted_by_coordinator"))
            return
        if self._plan is None or self._plan.plan_id != msg.plan_id:
            return
        self._drop_plan("aborted_by_coordinator", f"aborted by the coordinator: {msg.reason}")

    def _abandon_plan(self, code: str, reason: str) -> None:
        """Give up the current plan the only safe way: before the vote, drop it; in the vote,
        ask for ``abort`` in the record and let the serving thread finish the ticket."""
        ticket = self._ticket
        if ticket is not None:
            if not ticket.is_decided:
                self._propose(ticket, Decision.abort(self.rank, reason, code))
            return
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

    _handlers = {
        P.Welcome: "_on_welcome", P.Reject: "_on_reject", P.CommInit: "_connect", P.Plan: "_on_plan",
        P.VoteNow: "_on_vote", P.AbortPlan: "_on_abort", P.CoordinatorStopping: "_on_stopping",
        P.HeartbeatAck: "_on_heartbeat_ack",
    }
    """Message type -> handler name (by name, so subclasses' overrides are the ones called)."""

