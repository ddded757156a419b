"""What happens when a rank says ``Hello``: it is refused, welcomed again, or registered.

``admission`` decides, as pure functions, whether a Hello can belong to this deployment and what
it means for the rank's live holder (a :class:`~eplb_service.coordinator.admission.Claim`). This
module acts on that verdict: it says why a refused Hello was refused, answers a repeated one with
the holder's session, and otherwise builds the rank's record, carries over what the same process
still holds (its side communicator, the plan in flight), sends the ``Welcome`` and, once every
rank is registered, the side communicator. It also keeps the deployment's identity: which agent
processes belong to it, so that a process coming back is told from a new deployment, and a set of
live ranks that are all restarted workers becomes one.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, Hashable, Iterable, Protocol

from eplb_service import protocol
from eplb_service.coordinator.admission import (
    Claim,
    claim,
    deployment_label,
    hello_placement,
    hello_problem,
    same_process,
    version_problem,
)
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.guards import DivergenceGuard
from eplb_service.coordinator.metrics import CoordinatorMetrics
from eplb_service.coordinator.placement_book import PlacementBook
from eplb_service.coordinator.plan_runner import PlanRunner
from eplb_service.coordinator.registry import SESSIONS_KEPT, AgentRecord, Registry
from eplb_service.log_throttle import LogThrottle
from eplb_service.placement import PlacementError

PROCESSES_KEPT_PER_RANK = 4
"""Agent processes remembered per rank (on average) to tell a returning agent from a new deployment."""


class RegistrationHost(Protocol):
    """What registration needs of the coordinator's shell: sending, and the side communicator."""

    def send(self, identity: bytes, message: protocol.Message) -> None: ...

    def rebuild_comm(self) -> None: ...

    def current_comm(self) -> protocol.CommInit | None: ...

    def invalidate_comm(self) -> None: ...

    def model_known(self) -> None: ...

    def new_deployment(self, rank: int, restarted: list[int] | None = None) -> None: ...


class Registrar:
    """Registers ranks from their ``Hello`` (the router hands every one here) and keeps which agent
    processes make up the deployment.

    Its parts are the router's, passed by name: the ``throttle`` is shared, so a rank's registration
    settles every condition the router logged about that rank; ``update_epoch`` and
    ``update_liveness_metrics`` are the router's, since a registration changes the ranks whose
    epochs must agree and the ranks that are up, as a heartbeat or a loss does."""

    def __init__(
        self,
        *,
        host: RegistrationHost,
        registry: Registry,
        book: PlacementBook,
        runner: PlanRunner,
        guard: DivergenceGuard,
        cfg: CoordinatorConfig,
        metrics: CoordinatorMetrics,
        log: logging.LoggerAdapter,
        throttle: LogThrottle,
        update_epoch: Callable[[], None],
        update_liveness_metrics: Callable[[Iterable[int]], None],
    ) -> None:
        self.cfg, self.registry, self.book, self.guard, self.runner = cfg, registry, book, guard, runner
        self.metrics, self.log, self.throttle, self.host = metrics, log, throttle, host
        self.update_epoch, self.update_liveness_metrics = update_epoch, update_liveness_metrics
        self.processes: dict[tuple[str, int], None] = {}
        """(node, pid) of the agents registered in this deployment, oldest first: one of them coming
        back (after a partition, or declared dead while stalled) is the same deployment, not a new
        one. The newest ``PROCESSES_KEPT_PER_RANK`` per rank on average; a process restarted more
        often than that since is long gone (each worker restart used to add one for good)."""

    def _reject(
        self,
        identity: bytes,
        rank: int,
        reason: str,
        code: str = "refused",
        metric: str = "hello",
        key: Hashable | None = None,
    ) -> None:
        """``key``: what the refusal is about (see ``HelloProblem.key``); by default this rank's ``code``."""
        self.metrics.messages_rejected.labels(metric).inc()
        # An agent asks again every few seconds (rank_taken) or every refused_retry_s: first, then counts.
        level = logging.WARNING if code == "rank_taken" else logging.ERROR
        self.throttle.report(("hello_refused", *(key or (rank, code))), level, "refused rank %d: %s", rank, reason)
        self.host.send(identity, protocol.Reject(reason=reason, code=code))

    def _welcome(self, identity: bytes, rank: int, session: int, comm: protocol.CommInit | None = None) -> None:
        """``Welcome`` with the rank's ``session``. A new registration's carries no ``comm``: its
        ``CommInit`` follows once every rank is registered (:meth:`_comm_after_register`)."""
        self.host.send(
            identity,
            protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION, rank=rank, config=self.cfg.agent, comm=comm, session=session
            ),
        )

    def refuse_version(self, identity: bytes, version: int, rank: int) -> None:
        """A Hello of another protocol version that this version's decoder could not read."""
        problem = version_problem(version)
        self._reject(identity, rank, problem.reason, key=problem.key)

    def on_hello(self, identity: bytes, hello: protocol.Hello) -> None:
        if self.book.model is not None and not self.registry.alive and (hello.node, hello.pid) not in self.processes:
            self.processes.clear()
            self.host.new_deployment(hello.rank)
        problem = hello_problem(identity, hello, self.cfg.world_size, self.book.model, self.registry.live_deployment())
        if problem is not None:
            return self._reject(identity, hello.rank, problem.reason, code=problem.code, key=problem.key)
        try:
            shape, phy2log = hello_placement(hello)
        except PlacementError as exc:
            return self._reject(identity, hello.rank, f"invalid placement: {exc}", key=(hello.rank, "placement"))
        now = time.monotonic()
        holder = self.registry.agents.get(hello.rank)
        verdict = claim(holder, identity, hello)
        if verdict is Claim.REPEATED:
            holder.last_seen = now
            return self._welcome(identity, hello.rank, holder.session, comm=self.host.current_comm())
        if verdict is Claim.STALE:
            return self._reject(
                identity,
                hello.rank,
                (
                    f"this Hello of rank {hello.rank} (pid {hello.pid} on {hello.node!r}, resume_session "
                    f"{hello.resume_session}) is older than the rank's connection: the same process has used the "
                    f"session it was welcomed with since (heard {now - holder.last_seen:.1f}s ago); a delayed or "
                    "duplicated copy, ignored"
                ),
                code="rank_taken",
                metric="stale_hello",
                key=(hello.rank, "stale_hello"),
            )
        if verdict is Claim.TAKEN:
            return self._reject(
                identity,
                hello.rank,
                (
                    f"rank {hello.rank} is held by a live agent (pid {holder.pid} on {holder.node!r}, step "
                    f"{holder.step}, epoch {holder.epoch}, heard {now - holder.last_seen:.1f}s ago); this Hello is "
                    f"from pid {hello.pid} on {hello.node!r}, step {hello.step}, epoch {hello.epoch}. If it is "
                    "another deployment, give it a coordinator of its own (its own endpoint); if it is this rank's "
                    "worker restarted, it gets the rank once the old agent leaves or is silent for "
                    f"liveness_timeout_s={self.cfg.liveness_timeout_s}"
                ),
                code="rank_taken",
                metric="rank_taken",
            )
        others_alive = any(r.alive and r.rank != hello.rank for r in self.registry.agents.values())
        if others_alive and self.book.conflicts(hello.epoch, phy2log):
            return self._reject(
                identity,
                hello.rank,
                f"placement at epoch {hello.epoch} differs from the other ranks' placement at that epoch",
                key=(hello.rank, "placement"),
            )
        if not others_alive:
            if self.book.adopt(hello.model, shape, phy2log, hello.epoch):
                self.host.model_known()
        else:
            self.book.learn(hello.epoch, phy2log)
        if verdict is Claim.REOPENED:  # the same process: a worker restarted alone or not, as it was
            restarted = holder.restarted
        else:
            restarted = others_alive and self.registry.ever_complete and hello.resume_session == 0
        self._register(identity, hello, phy2log, verdict, now=now, restarted=restarted)

    def _register(
        self, identity: bytes, hello: protocol.Hello, phy2log, verdict: Claim, now: float, restarted: bool = False
    ) -> None:
        key = (hello.node, hello.pid)
        self.processes.pop(key, None)
        self.processes[key] = None
        for old in list(self.processes)[: -PROCESSES_KEPT_PER_RANK * self.cfg.world_size]:
            del self.processes[old]
        record = AgentRecord(
            rank=hello.rank,
            identity=identity,
            node=hello.node,
            pid=hello.pid,
            epoch=hello.epoch,
            step=hello.step,
            load_reported_to=hello.step,
            phy2log=phy2log,
            session=secrets.randbits(62) + 1,
            store=(hello.store_host, hello.store_port) if hello.rank == 0 else None,
            restarted=restarted,
        )
        self.guard.registered(hello.rank, hello.resume_session, record.session)
        # Every condition about this rank (keys ``(what, rank, ...)``) is over: its Hello was taken.
        self.throttle.settle_where(lambda key: isinstance(key, tuple) and key[1:2] == (hello.rank,))
        if self.registry.deployment != hello.deployment:  # admitted with another id: none was alive
            self.log.info("deployment %s registers (rank %d first)", deployment_label(hello.deployment), hello.rank)
        self.registry.deployment = hello.deployment
        replaced = self.registry.register(record)
        resumed = verdict in (Claim.RESUMED, Claim.REOPENED)
        carried = replaced is not None and resumed and same_process(replaced, hello)
        if carried:
            self._carry_over(replaced, record)
        elif replaced is not None:
            # A new process: its side communicator is gone, the current generation is void, and
            # a batch still staging aborts, which already rebuilds the communicator once every
            # rank is registered (see ``_comm_after_register``).
            self.host.invalidate_comm()
            self.runner.agent_lost(hello.rank, now)
        note = ", resumed its session" if carried else ", a restarted worker" if restarted else ""
        if verdict is Claim.REOPENED:
            note = ", its own process on a new connection, which missed the Welcome of its last registration" + (
                ": resumed its session" if carried else " and of every one before: registered anew"
            )
        elif resumed and not carried:
            note = ", its session named from another process or store: a new process"
        self.log.info(
            "rank %d registered (node %s, pid %d, epoch %d, step %d, %s%s)",
            hello.rank,
            hello.node,
            hello.pid,
            hello.epoch,
            hello.step,
            hello.transport,
            note,
        )
        if carried:
            self.runner.rank_resumed(hello.rank, now)
        self._welcome(identity, hello.rank, record.session)
        self.update_liveness_metrics([hello.rank])
        self.registry.ever_complete = self.registry.ever_complete or self.registry.complete
        self.update_epoch()
        self._comm_after_register(hello.rank)

    def _carry_over(self, old: AgentRecord, record: AgentRecord) -> None:
        """The rank's own process on a new socket (it found the coordinator silent past its limit:
        a coordinator stalled, a link that made ZeroMQ reconnect): its record moves to the new
        identity, and what the process still holds goes on.

        Its side communicator is the one it had: voiding it made every rank resuming after a
        coordinator stall send a generation of its own, and ranks split between them waited out
        the transport timeout (its heartbeats say if it did lose it; the coordinator's retry then
        builds a new one). A plan in flight goes on too: booked as lost, every such stall aborted
        the plan staging (``rank R lost during staging``) and rebuilt the communicator, though the
        process kept its staged rows; the runner sends what went to the old socket again
        (``PlanRunner.rank_resumed``). The outcome stays the decision record's, so keeping the plan
        cannot split the ranks."""
        record.comm_generation = old.comm_generation
        record.committed_plans = old.committed_plans
        record.earlier_sessions = (*old.earlier_sessions, old.session)[-SESSIONS_KEPT:]
        record.restarted = old.restarted  # a worker restarted alone stays one across its reopens
        # Its counters only grow: left empty until its next heartbeat, a scrape read a counter reset.
        record.counters, record.internal_errors = old.counters, old.internal_errors
        # Its agent names the old session until this record's Welcome reaches it (admission.claim).

    def _comm_after_register(self, rank: int) -> None:
        """One new side-communicator generation once every rank is registered, never two.

        A rank that registers again while a batch is staging aborts that batch, and the abort
        already sends a new generation. A second one right behind it made every rank attempt
        both rendezvous in turn: a rank that missed the first ``CommInit`` (lost, or still in
        an older build) went straight to the second while its peers waited out
        ``transport_timeout_s`` in the first, so both failed and rebalancing stalled until the
        coordinator's retry (``2 x transport_timeout_s + 2`` s, 62 s by default)."""
        if not self.registry.complete:
            return
        on_its_way = self.host.current_comm()
        if on_its_way is not None:
            self.log.debug(
                "rank %d registered; side communicator generation %d is already on its way to every rank",
                rank,
                on_its_way.generation,
            )
            return
        self.host.rebuild_comm()

    def restarted_deployment(self, alive: list[AgentRecord]) -> None:
        """The last process of the previous deployment left, the live ranks are all workers
        restarted since, and they do not serve its placement (the operator restarted every worker;
        some came back before the old ones were declared dead). They are a new deployment, as if
        none had been alive in between: their steps and epochs count from 0 again, and judged
        against the old commit steps they would read as diverged for good. The book is seeded
        again from their registrations."""
        model, shape = self.book.model, self.book.shape
        self.processes = {(r.node, r.pid): None for r in alive}
        self.host.new_deployment(alive[0].rank, restarted=[r.rank for r in alive])
        first = alive[0]
        self.book.adopt(model, shape, first.phy2log, first.epoch)
        self.host.model_known()
        for r in alive:
            r.restarted = False
            self.book.learn(r.epoch, r.phy2log)
        self.registry.ever_complete = False
        self.update_epoch()
