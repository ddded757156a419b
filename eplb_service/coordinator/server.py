"""The coordinator daemon's shell: one ROUTER socket on an asyncio (uvloop) event loop.

The shell owns the socket, the loops, the metrics and the side duties (recording, HTTP
probes, status), and wires the parts that decide: the message router (``router``, which hands
every ``Hello`` to ``registration``), the plan runner (``plan_runner``), the placement book, the
side-communicator generations and the divergence guard. The loop only moves messages and state;
the placement policy runs in an executor thread, so a slow plan never delays heartbeats, load
reports or votes.

Nothing an agent or a client sends can stop it: every message is handled under a guard
(an unexpected exception is logged, counted in ``eplb_internal_errors_total`` and aborts the
plan in flight, maps untouched), every periodic duty likewise, and side duties such as
recording fail soft. It imports no torch: the side communicator's rendezvous store is
hosted by rank 0's worker, the coordinator only passes its address on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time

import numpy as np
import zmq
import zmq.asyncio

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.guards import DivergenceGuard
from eplb_service.coordinator.http_endpoints import serve_http
from eplb_service.coordinator.metrics import NAN, CoordinatorMetrics
from eplb_service.coordinator.open_files import OpenFileLimitError, OpenFileWatch, fit_open_file_limit
from eplb_service.coordinator.placement_book import PlacementBook
from eplb_service.coordinator.plan_runner import PlanOutcome, PlanRunner
from eplb_service.coordinator.progress import CoordinatorProgress, progress_of
from eplb_service.coordinator.registration_watch import RegistrationWatch
from eplb_service.coordinator.registry import Registry
from eplb_service.coordinator.router import MessageRouter
from eplb_service.coordinator.side_comm import SideComm
from eplb_service.coordinator.socket_dir import prepare_ipc_dir, release_ipc_endpoint
from eplb_service.coordinator.socket_watch import SocketFileWatch
from eplb_service.coordinator.status_doc import status_document
from eplb_service.logutil import rank_logger
from eplb_service.loop_stalls import LoopStalls
from eplb_service.security import apply_server_curve, check_endpoint_security, is_local_endpoint
from eplb_service.trace import TraceRecorder
from eplb_service.zmq_tcp import allow_ipv6

__all__ = ["Coordinator", "CoordinatorProgress", "PlanOutcome", "RECEIVE_HWM"]

RECEIVE_HWM = 64
"""Frames queued per connection before ZeroMQ stops reading from it: with the frame limit,
what bounds the memory one client can make the coordinator hold."""


def numbered_path(path: str, deployment: int) -> str:
    """``--record``'s file for the ``deployment``-th deployment: ``t.npz``, then ``t.2.npz``...

    A trace holds one deployment (its steps count from 0 again after a restart), and the first
    one's windows must not be overwritten by the next."""
    if deployment <= 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{deployment}{ext}"


BALANCEDNESS_EVERY_S = 1.0
"""How often the tick refreshes ``eplb_balancedness{kind="current"}``: a pass over every slot
(a few ms for 256 ranks of 768 slots), so not on every 20 ms tick; scrapes come seconds apart."""

HANDSHAKE_TIMEOUT_S = 15.0
"""Longest a new ZeroMQ connection may take to finish its handshake (greeting, CURVE) before it is
dropped; ZeroMQ's default is 30 s. Every connection holds a file descriptor until then: a client
opening connections that never send a byte (or half a greeting) ran the coordinator out of
descriptors, and for the next 30 s no agent could register and no status client got an answer
(nor any, if it kept reopening). Not shorter: CURVE takes about four round trips, 7-8 s over a
link with a 2 s round trip (one ranks must register over, see the agent's silence back-off),
and at 5 s every such connection was dropped before it finished."""

TICK_S = 0.02
"""The periodic duties' interval (liveness, plan deadlines, re-sends)."""

STALL_SLACK_S = 0.25
"""A tick later than this is a stall of the coordinator's loop, left out of the ranks' silence
(``loop_stalls``); less is ordinary scheduling on a busy host and counts."""

STALL_LOGGED_S = 1.0
"""A stall at least this long is logged (throttled): it says why no rank was declared dead."""

REQ_ENVELOPE = [b""]
"""What a REQ socket (or a DEALER speaking its envelope) puts between its identity and its message."""


class BindError(RuntimeError):
    """The endpoint or the metrics port cannot be bound (taken, or not an address here), or the
    open-file limit cannot hold the ranks; the message names which, so the CLI prints it as one
    line instead of a traceback."""


class Coordinator:
    """The shell: socket, loops, metrics, side duties, and the wiring of the parts.

    Formatted, about 375 lines, over the ~300 this code base aims at: a third of it is the
    two small interfaces the parts call back through (``PlanHost``, ``RouterHost``) and the
    read-only views that keep the names tools and tests read (``epoch``, ``counts``, ...);
    every decision lives in a part of its own.
    """

    def __init__(self, config: CoordinatorConfig, open_files_wanted: int = 0) -> None:
        self.cfg = config
        self.open_files_wanted = open_files_wanted
        """A soft open-file limit to raise to beyond what the ranks need (the daemon's; an embedded
        coordinator leaves its host process's limit alone unless the ranks need more)."""
        self.log = rank_logger(__name__, "coordinator")
        self.registry = Registry(config.world_size)
        self.metrics = CoordinatorMetrics(agent_counters=self._agent_counters)
        for rank in range(config.world_size):  # every rank's series from the start: zeros, not gaps
            self.metrics.commit_stall.labels(str(rank))
        self.book = PlacementBook(config.world_size, config.load_half_life_steps)
        self.side_comm = SideComm(config.world_size, config.agent.transport_timeout_s)
        self.guard = DivergenceGuard(config.check_step_clock, config.step_clock_grace_s, self.metrics, self.log)
        self.plans = PlanRunner(config, self.book, self.metrics, self.log, host=self)
        self.router = MessageRouter(
            config, self.registry, self.book, self.guard, self.plans, self.metrics, self.log, host=self
        )
        self.router.update_liveness_metrics()  # every rank's agent_up from the start, at 0
        self.recorder: TraceRecorder | None = None
        self._last_trace_flush = time.monotonic()
        self.max_message_bytes = protocol.UNSHAPED_MAX_MESSAGE_BYTES
        self._epoch_split_since: float | None = None
        self._epoch_split_warned = False
        self.deployments = 1
        """Deployments served: a vLLM restarted while this coordinator ran starts the next one."""
        self.metrics_port: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sock: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._auth = None
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.started_monotonic = time.monotonic()
        """When this coordinator started, on the monotonic clock: uptime must not jump when the wall clock is set."""
        self.last_tick = time.monotonic()
        self._caught_up_at = self.last_tick
        """When the receive loop last found no message waiting: everything sent before it was read."""
        self._socket_watch: SocketFileWatch | None = None
        """The ``ipc://`` socket file this coordinator bound: bound again if removed, removed when it stops."""
        self._open_files: OpenFileWatch | None = None
        """Logs when the descriptors in use come near the open-file limit (fitted at start)."""
        self._behind_warned = False
        self.stalls = LoopStalls(STALL_SLACK_S)
        """When this coordinator's loop did not run (liveness counts only the time it did)."""
        self._balancedness_at = float("-inf")
        self._comm_ready_logged = 0
        self._registration_watch = RegistrationWatch(config.world_size)
        """The side-communicator generation last logged as built on every rank (0: none yet)."""

    # -- lifecycle -------------------------------------------------------------------

    async def serve(self) -> None:
        """Bind, then run until :meth:`stop`; returns after a clean shutdown."""
        check_endpoint_security(self.cfg.endpoint, self.cfg.curve_dir, self.cfg.insecure)
        prepare_ipc_dir(self.cfg.endpoint)
        self._open_files = self._fit_open_files()
        self._ctx = zmq.asyncio.Context()
        sock = allow_ipv6(self._ctx.socket(zmq.ROUTER))
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        # A peer that vanished without closing (host gone, cable pulled) leaves its TCP
        # connection open here for good: nothing is sent on a dead rank's route, so TCP never
        # finds out. ZeroMQ's own pings close it; the timeout is twice the liveness timeout, so
        # a slow link (round trips of seconds) keeps its connection.
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.cfg.liveness_timeout_s * 500))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.cfg.liveness_timeout_s * 2000))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
        # No ROUTER_HANDOVER: a second connection with an identity in use is refused, so
        # nobody can take a registered agent's route over.
        auth_monitor = self._secure(sock)
        http = None
        try:
            sock.bind(self.cfg.endpoint)
            self._socket_watch = SocketFileWatch(
                self.cfg.endpoint,
                sock,
                lambda: bool(self.registry.alive),
                self.log,
                plan_in_flight=lambda: self.plans.plan is not None,
            )
            if self.cfg.metrics_port is not None:
                http = await self._serve_http()
        except (BindError, zmq.ZMQError) as exc:
            if auth_monitor is not None:
                auth_monitor.cancel()
            sock.close(linger=0)
            self._ctx.term()
            if self._socket_watch is not None:  # bound, then --metrics-port failed: no file left for `status` to find
                release_ipc_endpoint(self.cfg.endpoint, self._socket_watch.identity)
            if isinstance(exc, BindError):
                raise
            raise BindError(f"cannot listen on {self.cfg.endpoint}: {exc}") from None
        self._sock = sock
        self.log.info(
            "listening on %s for %d ranks (metrics %s, policy %s)",
            self.cfg.endpoint,
            self.cfg.world_size,
            self.metrics_port,
            self.cfg.policy,
        )
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
                await http.close()

    async def _serve_http(self):
        """The HTTP endpoints on ``--metrics-port``; :class:`BindError` names the port when it is taken."""
        try:
            http = await serve_http(self, self.cfg.http_host, self.cfg.metrics_port)
        except OSError as exc:
            where = self.cfg.http_host or "all interfaces"
            raise BindError(
                f"cannot serve HTTP on --metrics-port {self.cfg.metrics_port} ({where}): {exc.strerror or exc}"
            ) from None
        self.metrics_port = http.port
        return http

    def _fit_open_files(self) -> OpenFileWatch:
        """The open-file limit raised to what ``--dp`` needs; :class:`BindError` when it cannot hold the ranks."""
        try:
            budget = fit_open_file_limit(self.cfg.world_size, wanted=self.open_files_wanted)
        except OpenFileLimitError as exc:
            raise BindError(str(exc)) from None
        if budget.raised_from is not None:
            self.log.info(
                "raised the open-file limit (ulimit -n) from %d to %d (%d ranks)",
                budget.raised_from,
                budget.soft,
                self.cfg.world_size,
            )
        elif budget.soft != resource.RLIM_INFINITY and budget.soft < budget.needed:
            self.log.warning(
                "open-file limit (ulimit -n) %d is below the %d that %d ranks reconnecting at once need "
                "(the hard limit allows no more): raise it",
                budget.soft,
                budget.needed,
                self.cfg.world_size,
            )
        return OpenFileWatch(budget, self.log)

    def _secure(self, sock) -> asyncio.Task | None:
        """CURVE on the socket when keys are configured; returns the task counting refused handshakes."""
        if not self.cfg.curve_dir:
            if not is_local_endpoint(self.cfg.endpoint):
                self.log.warning(
                    "INSECURE: %s accepts unauthenticated, unencrypted agents from other hosts (--insecure)",
                    self.cfg.endpoint,
                )
            return None
        from zmq.auth.asyncio import AsyncioAuthenticator

        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=os.path.join(self.cfg.curve_dir, "clients"))
        apply_server_curve(sock, self.cfg.curve_dir)
        return self._spawn(
            self._count_auth_failures(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)), "auth-monitor"
        )

    async def _count_auth_failures(self, monitor) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            self.metrics.messages_rejected.labels("auth").inc()
            self.log.warning(
                "refused a connection that failed CURVE authentication (%s)",
                event.get("endpoint", b"").decode(errors="replace"),
            )

    def stop(self) -> None:
        self._stopping.set()

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
        plans = self.plans
        if plans.plan is not None and not plans.plan.phase.final:
            try:
                plans.abort(f"coordinator internal error in {where}: {type(exc).__name__}", "internal_error")
            except Exception as again:  # noqa: BLE001 - the guard must not fail itself
                self.log.error("aborting the plan after an internal error failed too: %s", again, exc_info=again)
                plans.plan, plans.pending_batches = None, []

    async def _shutdown(self) -> None:
        if self.plans.plan is not None and not self.plans.plan.phase.final:
            self.plans.abort("coordinator shutting down", "coordinator_stopping")
        self.broadcast(protocol.CoordinatorStopping(reason="coordinator shutting down"))
        self._end_recording()  # a full disk must not fail the shutdown: _end_recording catches it
        self.plans.close()
        if self._sock is not None:
            self._sock.close(linger=200)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=200)
        if self._socket_watch is not None:
            release_ipc_endpoint(self.cfg.endpoint, self._socket_watch.identity)
        self.log.info("stopped")

    # -- I/O ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        sock = self._sock
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        while not self._stopping.is_set():
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # pyzmq's async socket re-arms its poller after this
                self._caught_up_at = time.monotonic()
            recv = asyncio.ensure_future(sock.recv_multipart())
            done, _ = await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                break
            identity, *envelope, frame = recv.result()  # a ROUTER prepends the identity to every message
            if envelope == REQ_ENVELOPE:
                self._answer_request(identity, frame)
                continue
            if envelope:
                self._refuse_framing(identity, len(envelope) + 1)
                continue
            try:
                message = protocol.decode(frame, self.max_message_bytes)
            except protocol.ProtocolError as exc:
                other = protocol.hello_of_another_version(frame) if len(frame) <= self.max_message_bytes else None
                if other is not None:
                    self.router.registrar.refuse_version(identity, *other)
                    continue
                self.metrics.messages_rejected.labels("decode").inc()
                self.router.throttle.report(
                    ("decode", identity), logging.WARNING, "bad message from %r: %s", identity, exc
                )
                self.send(identity, protocol.Reject(reason=str(exc), code="bad_message"))
                continue
            try:
                self._handle(identity, message)
            except Exception as exc:  # noqa: BLE001 - no message may stop the coordinator
                self._internal_error(f"handling {type(message).__name__}", exc)
        stop_wait.cancel()

    def _answer_request(self, identity: bytes, frame: bytes) -> None:
        """A REQ socket's request (``[b"", message]``): its client waits for exactly one reply in
        that envelope, so it always gets one, the status or a ``Reject`` saying why. A REQ socket
        cannot take what the coordinator sends unasked, so it can ask for status, never register."""
        try:
            message = protocol.decode(frame, self.max_message_bytes)
        except protocol.ProtocolError as exc:
            self.metrics.messages_rejected.labels("decode").inc()
            reply: protocol.Message = protocol.Reject(reason=str(exc), code="bad_message")
        else:
            if isinstance(message, protocol.StatusRequest):
                reply = self.router.status_reply()
            else:
                self.metrics.messages_rejected.labels("framing").inc()
                reply = protocol.Reject(
                    reason=f"{type(message).__name__} came from a REQ socket, which can only ask for status "
                    "(StatusRequest); agents connect with a DEALER socket (proto/PROTOCOL.md)",
                    code="bad_message",
                )
        try:
            self._sock.send_multipart([identity, b"", protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone
            self.log.debug("reply to %r failed: %s", identity, exc)

    def _refuse_framing(self, identity: bytes, frames: int) -> None:
        """A multipart message other than a REQ envelope: answered, so its sender learns why nothing else comes."""
        self.metrics.messages_rejected.labels("framing").inc()
        self.router.throttle.report(
            ("framing", identity),
            logging.WARNING,
            "refused a message of %d frames from %r: every message is one frame",
            frames,
            identity,
        )
        self.send(
            identity,
            protocol.Reject(
                reason=f"got a message of {frames} frames; every message is one msgpack frame (proto/PROTOCOL.md)",
                code="bad_message",
            ),
        )

    def _handle(self, identity: bytes, message: protocol.Message) -> None:
        self.router.handle(identity, message)

    def send(self, identity: bytes, message: protocol.Message) -> None:
        try:
            self._sock.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone: liveness will notice
            self.log.debug("send to %r failed: %s", identity, exc)

    def broadcast(self, message: protocol.Message) -> None:
        for record in self.registry.alive:
            self.send(record.identity, message)

    def send_to_rank(self, rank: int, message: protocol.Message) -> None:
        """To the live agent registered for ``rank`` (a re-send; nothing if it is gone)."""
        record = self.registry.agents.get(rank)
        if record is not None and record.alive:
            self.send(record.identity, message)

    # -- what the router and the plan runner ask of the shell ----------------------------------

    def rebuild_comm(self) -> None:
        """(Re)build the side communicator on every rank with a fresh generation."""
        comm = self.side_comm.next(self.registry.agents[0].store)
        self.metrics.comm_generation.set(comm.generation)
        self.broadcast(comm)

    def current_comm(self) -> protocol.CommInit | None:
        if not self.side_comm.current_was_sent:
            return None
        return self.side_comm.current(self.registry.agents[0].store)

    def invalidate_comm(self) -> None:
        self.side_comm.invalidate()

    def comm_ready(self) -> bool:
        return self.registry.comm_ready(self.side_comm.generation)

    def _log_comm_built(self, now: float) -> None:
        """One coordinator line when a generation is built on every rank: each agent logs its
        own ``ready``, but at 64+ ranks only this line says the deployment can rebalance again
        (after a rank came back, an aborted batch) without counting worker lines."""
        generation = self.side_comm.generation
        if generation == self._comm_ready_logged or not self.side_comm.current_was_sent or not self.comm_ready():
            return
        self._comm_ready_logged = generation
        self.log.info(
            "side communicator generation %d built on all %d ranks (%.1fs after it was sent)",
            generation,
            len(self.registry.agents),
            now - self.side_comm.sent_at,
        )

    def complete(self) -> bool:
        return self.registry.complete

    def min_step(self) -> int:
        return self.registry.min_step()

    def epochs_agree(self) -> bool:
        return all(r.epoch == self.book.epoch for r in self.registry.alive)

    def clock_allows_planning(self, now: float) -> bool:
        return self.guard.clock_allows_planning(now)

    @property
    def halted_reason(self) -> str | None:
        return self.guard.halted_reason

    def halt(self, reason: str, advice: str = "restart the deployment's workers") -> None:
        """Stop rebalancing for good (until restart), loudly; a plan in flight is asked to abort.

        ``advice`` ends the log line: what the operator does about it (a divergence needs the
        workers restarted, a wrong coordinator flag only the coordinator)."""
        if self.guard.halted_reason:
            return
        self.guard.halted_reason = reason
        self.log.critical("%s; rebalancing halted, %s", reason, advice)
        self.plans.abort(reason, "step_clock" if reason.startswith("step clocks") else "other")

    def watch(self, now: float) -> None:
        """The divergence watches, after every heartbeat and commit: a verdict halts rebalancing.

        A step-clock halt lifts once every rank of the deployment is alive and its clock seen to
        match again (a host clock that was off, then set right); a divergence of placements never does."""
        alive = [r.rank for r in self.registry.alive]
        if self.guard.halted_reason:
            if not self.guard.clocks_agree_again(alive, self.registry.world_size):
                return
            was = self.guard.lift_clock_halt()
            self.log.warning(
                "step clocks agree again on ranks %s (was: %s; a host clock that was off by a step or more?); "
                "rebalancing resumes",
                sorted(alive),
                was,
            )
        split = self._restarted_alone()
        if split is not None:
            self.plans.count_diverged()
            self.halt(split, "it lifts by itself once none of the previous processes is left")
            return
        # A restarted worker's epoch and steps are its own, not a lag behind the old commit steps.
        continuing = [r.rank for r in self.registry.alive if not r.restarted]
        why = self.guard.epoch_verdict(continuing) or self.guard.clock_verdict(alive, self.registry.complete, now)
        if why is not None:
            self.plans.count_diverged()
            if self.guard.clock_halt:
                self.halt(
                    why,
                    "until the step clocks agree again (a host clock off by a step or more, once set right); "
                    "a rank that really counts steps apart needs the deployment's workers restarted",
                )
            else:
                self.halt(why)

    def _restarted_alone(self) -> str | None:
        """Why the live ranks no longer serve one placement because a worker restarted alone, or None.

        A restarted worker (a new process after every rank had been registered) comes back with the
        maps it started with. Where the others committed plans since, its maps are not theirs, and
        no plan can fix that: a plan moves every rank from one common placement. Judged once no
        plan is in flight (the one it missed has settled)."""
        alive = self.registry.alive
        old_epochs = {r.epoch for r in alive if not r.restarted}
        if self.plans.plan is not None or not old_epochs:
            return None
        for record in alive:
            if record.restarted and record.epoch not in old_epochs:
                others = sorted(r.rank for r in alive if not r.restarted)
                return (
                    f"rank {record.rank} restarted alone (a new process, pid {record.pid} on {record.node!r}, at "
                    f"placement epoch {record.epoch}) while ranks {others} serve epoch "
                    f"{max(old_epochs)}: its expert maps are not theirs, and no plan moves one rank alone; "
                    f"restart every worker of the deployment"
                )
        return None

    def model_known(self) -> None:
        """The first Hello told the model: fit the frame limit to it and start recording."""
        shape = self.book.shape
        self._set_frame_limit(protocol.max_message_bytes(shape.num_layers, shape.num_physical))
        if self.cfg.record_path:
            path = numbered_path(self.cfg.record_path, self.deployments)
            try:
                self.recorder = TraceRecorder(path, shape.num_layers, shape.num_logical, self.cfg.world_size)
                self.metrics.recording_enabled.set(1)
                self.log.info("recording load windows to %s", path)
            except Exception as exc:  # noqa: BLE001 - recording is a side duty
                self._record_failed(exc)

    def _set_frame_limit(self, limit: int) -> None:
        self.max_message_bytes = limit
        if self._sock is not None:  # applies to connections made from now on
            self._sock.setsockopt(zmq.MAXMSGSIZE, limit)

    def deployment_gone(self) -> None:
        """Every agent left or was declared dead. The state stays readable (status, the
        simulation's summary) until an agent registers again; the frame limit goes back to the
        unshaped one now, so that a vLLM restarted with a larger model can say Hello at all."""
        self.log.info(
            "no agent is alive (epoch %d): the next rank to register starts a new deployment", self.book.epoch
        )
        self._set_frame_limit(protocol.UNSHAPED_MAX_MESSAGE_BYTES)
        self._end_recording()

    def new_deployment(self, rank: int, restarted: list[int] | None = None) -> None:
        """A process that was never one of this deployment's agents registers while none is
        alive (or, ``restarted``, the last old process left and only restarted workers are
        alive): vLLM restarted under this coordinator (a daemon or a k8s sidecar container
        outlives it). Its processes count steps and placement epochs from 0 again, possibly
        with another model: judged against the old commit steps they would read as diverged,
        and the old steps would hold planning back. So everything learned from the old
        deployment goes, as if this coordinator had just started; a halt about the old
        deployment goes with it (its advice was to restart the workers)."""
        self.log.warning(
            "%s: a new deployment (the previous one was at epoch %d, step %d%s); its placement, load window, "
            "step marks and model are dropped",
            f"rank {rank} registers while no agent is alive"
            if restarted is None
            else f"the previous deployment's last process left; ranks {restarted} are workers restarted since",
            self.book.epoch,
            self.book.max_step_seen,
            f", halted: {self.guard.halted_reason}" if self.guard.halted_reason else "",
        )
        if restarted is not None:
            self._end_recording()  # its file is the old deployment's; model_known opens the next one
        self.registry.ever_complete = False
        self.deployments += 1
        self.book.reset()
        self.guard.reset()
        self.plans.new_deployment()
        self.metrics.forget_measurements()  # epoch, balancedness, persistence, report lag: NaN until measured again

    def _end_recording(self) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.flush(close_all=True)
            self.log.info("load trace: %d windows in %s", self.recorder.windows, ", ".join(self.recorder.files))
        except Exception as exc:  # noqa: BLE001 - recording is a side duty, and must not fail a shutdown
            self._record_failed(exc)
        self.recorder = None
        self.metrics.recording_enabled.set(0)

    def record_load(self, logical: np.ndarray, report: protocol.LoadReport, rank: int) -> None:
        if self.recorder is not None:
            self.recorder.add(logical, report.step_begin, report.step_end, report.epoch, rank)

    def _record_failed(self, exc: BaseException) -> None:
        self.metrics.recording_errors.inc()
        self.metrics.recording_enabled.set(0)
        self.log.error(
            "recording load windows to %s failed (%s: %s); recording is off, the coordinator goes on",
            self.cfg.record_path,
            type(exc).__name__,
            exc,
        )
        self.recorder = None

    def _agent_counters(self) -> dict[int, dict[str, int]]:
        return {rank: record.counters for rank, record in self.registry.agents.items() if record.alive}

    # -- periodic work ------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            meant_at = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            # One clock reading for the stall and the tick: read again in the tick, a process
            # stopped between the two reads woke to a silence no stall had been noted for.
            woke = time.monotonic()
            self._note_stall(meant_at, woke)
            try:
                await self._tick(woke)
            except Exception as exc:  # noqa: BLE001 - one bad tick must not end liveness and planning
                self._internal_error("tick", exc)

    def _note_stall(self, meant_at: float, now: float) -> None:
        """The tick meant for ``meant_at`` runs at ``now``: a stall of this coordinator's loop (its
        process not scheduled, or a handler holding the loop) is left out of the ranks' silence."""
        stalled = self.stalls.ran(meant_at, now)
        if stalled:
            self.metrics.loop_stall_seconds.inc(stalled)
        if stalled >= STALL_LOGGED_S:
            self.router.throttle.report(
                "own_stall",
                logging.WARNING,
                "this coordinator's loop did not run for %.1fs (an overloaded host? SIGSTOP?): the ranks' silence in "
                "that time is not counted against their liveness",
                stalled,
            )

    def _heard_until(self, now: float) -> float:
        """The moment up to which every rank's messages have been read: ``now`` when none waits,
        else when the receive loop last found none waiting.

        Liveness measures silence from there. A coordinator behind on its messages (a burst of
        load reports from hundreds of ranks, a slow handler) has heartbeats waiting in its
        socket; measured from ``now`` it declared live ranks dead, aborted the plan in flight
        and made them register again, which only added to its backlog."""
        if self._sock is None or self._sock.closed or not self._sock.get(zmq.EVENTS) & zmq.POLLIN:
            self._behind_warned = False
            return now
        behind = now - self._caught_up_at
        if behind > self.cfg.liveness_timeout_s and not self._behind_warned:
            self._behind_warned = True
            self.log.warning(
                "%.1fs behind on incoming messages (overloaded?): no rank is declared dead until they are read",
                behind,
            )
        return self._caught_up_at

    async def _tick(self, now: float | None = None) -> None:
        """The periodic work, at ``now`` (the loop's clock reading; a fresh one if None)."""
        now = self.last_tick = time.monotonic() if now is None else now
        self.router.throttle.tick()
        for record in self.registry.expire(self._heard_until(now), self.cfg.liveness_timeout_s, self.stalls):
            self.log.error("rank %d silent for %.1fs: declared dead", record.rank, self.cfg.liveness_timeout_s)
            self.router.lose_agent(record, now)
        self.plans.tick(now)
        waiting = self._registration_watch.tick(now, (r.rank for r in self.registry.alive))
        if waiting is not None:
            line, warning = waiting
            self.log.log(logging.WARNING if warning else logging.INFO, "%s", line)
        if now - self._balancedness_at >= BALANCEDNESS_EVERY_S:
            self._balancedness_at = now
            current = self.book.balancedness()
            self.metrics.balancedness.labels("current").set(NAN if current is None else current[0])
        self._resend_comm_init(now)
        self._log_comm_built(now)
        if self.registry.complete and not self.comm_ready() and self.side_comm.retry_due(now):
            self.log.warning(
                "side communicator generation %d not built on every rank; trying generation %d",
                self.side_comm.generation,
                self.side_comm.generation + 1,
            )
            self.rebuild_comm()  # a CommInit was lost or a rendezvous failed
        self._watch_epoch_split(now)
        if self._socket_watch is not None:
            self._socket_watch.tick(now)
        if self._open_files is not None:
            self._open_files.tick(now)
        if self.recorder is not None and now - self._last_trace_flush > 5.0:
            self._last_trace_flush = now
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.recorder.flush)
            except Exception as exc:  # noqa: BLE001 - a full or read-only disk ends recording, nothing else
                self._record_failed(exc)
        if self.plans.should_plan(now):
            self.plans.planning = True
            self._spawn(self.plans.run_policy(), "policy")

    def _resend_comm_init(self, now: float) -> None:
        """The current ``CommInit`` again to the ranks that have not reported its generation
        built, while the others still wait in the rendezvous (``SideComm.resend_due``)."""
        if not self.registry.complete or self.comm_ready() or not self.side_comm.resend_due(now):
            return
        comm = self.current_comm()
        if comm is None:
            return
        for record in self.registry.alive:
            if record.comm_generation != comm.generation:
                self.send(record.identity, comm)
                self.metrics.messages_resent.labels("CommInit").inc()

    def _watch_epoch_split(self, now: float) -> None:
        """Say why planning waits when every rank is here but their placement epochs differ with
        no plan in flight (between a decided commit and its step they differ for a moment; longer
        than ``voting_timeout_s`` is a rank that is not what the others are). Once per episode;
        never while halted: the halt names the cause and the remedy (a worker restarted alone
        needs every worker restarted, not its own), where this line would guess."""
        if self.guard.halted_reason:
            self._epoch_split_since = None
            return
        epochs: dict[int, list[int]] = {}
        for record in self.registry.alive:
            epochs.setdefault(record.epoch, []).append(record.rank)
        if not self.registry.complete or len(epochs) < 2 or self.plans.plan is not None:
            self._epoch_split_since = None
            return
        if self._epoch_split_since is None:
            self._epoch_split_since, self._epoch_split_warned = now, False
        elif not self._epoch_split_warned and now - self._epoch_split_since > self.cfg.voting_timeout_s:
            self._epoch_split_warned = True
            self.log.warning(
                "planning waits: the ranks report different placement epochs (epoch: ranks %s) for %.0fs with no "
                "plan in flight; a rank whose epoch none of the others has must register again (restart its worker)",
                dict(sorted(epochs.items())),
                now - self._epoch_split_since,
            )

    # -- views ----------------------------------------------------------------------------

    def current_balancedness(self) -> tuple[float, np.ndarray] | None:
        return self.book.balancedness()

    def status(self) -> dict:
        """The status document (``eplb-coordinator status``, ``StatusReply``)."""
        return status_document(
            self.cfg,
            self.registry,
            self.book,
            self.guard,
            self.plans,
            self.side_comm,
            self.started_monotonic,
            self.endpoint_unreachable,
        )

    @property
    def endpoint_unreachable(self) -> str | None:
        """Why agents that connect now do not reach this coordinator at its endpoint (another process
        replaced its socket file); ``None`` while they do. ``/readyz`` answers 503 with it."""
        return None if self._socket_watch is None else self._socket_watch.unreachable

    def progress(self) -> CoordinatorProgress:
        """Epoch, plan counts, traffic and the plan in flight, frozen now: what a process hosting
        this coordinator (the simulation, the GPU harness) polls while its ranks run."""
        return progress_of(self.registry, self.book, self.plans)

    @property
    def busy(self) -> bool:
        """A plan in flight, batches waiting, or the policy running: the public "not idle"."""
        plans = self.plans
        return plans.plan is not None or bool(plans.pending_batches) or plans.planning

    # -- the parts' state under the names tools and tests read ---------------------------------

    epoch = property(lambda self: self.book.epoch)
    placements = property(lambda self: self.book.placements)
    model = property(lambda self: self.book.model)
    window = property(lambda self: self.book.window)
    max_step_seen = property(lambda self: self.book.max_step_seen)
    comm_generation = property(lambda self: self.side_comm.generation)
    plan = property(lambda self: self.plans.plan)
    counts = property(lambda self: self.plans.counts)
    outcomes = property(lambda self: self.plans.outcomes)
    bytes_moved_total = property(lambda self: self.plans.bytes_moved_total)
    experts_moved_total = property(lambda self: self.plans.experts_moved_total)
    _pending_batches = property(lambda self: self.plans.pending_batches)
    _planning = property(lambda self: self.plans.planning)
    epoch_watch = property(lambda self: self.guard.epoch_watch)
    step_clock = property(lambda self: self.guard.step_clock)
    _beats = property(lambda self: self.guard.beats)

    @property
    def drain_at_step(self) -> int | None:
        return self.plans.drain_at_step

    @drain_at_step.setter
    def drain_at_step(self, step: int | None) -> None:
        self.plans.drain_at_step = step

    def _should_plan(self) -> bool:
        return self.plans.should_plan(time.monotonic())

    def _watch_epochs(self) -> None:
        self.watch(time.monotonic())
