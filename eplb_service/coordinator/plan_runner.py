"""Running plans: when to plan, the policy off the event loop, batches, votes, aborts, outcomes.

One plan batch at a time goes through ``plan_state.PlanRun`` (staging, voting, a final
outcome). The runner decides when a new rebalance is worth computing, runs the policy in an
executor, cuts its result into batches, sends each (``Plan``, ``VoteNow``, ``AbortPlan``; the
each again to the ranks that have not answered, see ``resend``), and books the outcome: a
committed batch moves the placement book to its new epoch; an aborted one rebuilds the side
communicator; a diverged one halts rebalancing. Everything it needs of the rest of the
coordinator is in :class:`PlanHost`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from eplb_service import protocol
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.load_forecast import planning_persistence
from eplb_service.coordinator.placement_book import PlacementBook
from eplb_service.coordinator.plan_state import Phase, PlanRun
from eplb_service.coordinator.resend import VOTE_FIRST_S
from eplb_service.coordinator.spend_control import (
    SpendState,
    balance_lead,
    plan_factors,
    shape_terms,
    update_spend,
)
from eplb_service.placement import PlacementError, PolicySettingsError, is_initial_phy2log, validate_phy2log
from eplb_service.units import human_bytes


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


class PlanHost(Protocol):
    """What the runner needs of the coordinator around it."""

    halted_reason: str | None

    def broadcast(self, message: protocol.Message) -> None: ...

    def send_to_rank(self, rank: int, message: protocol.Message) -> None: ...

    def rebuild_comm(self) -> None: ...

    def comm_ready(self) -> bool: ...

    def complete(self) -> bool: ...

    def min_step(self) -> int: ...

    def epochs_agree(self) -> bool: ...

    def clock_allows_planning(self, now: float) -> bool: ...

    def halt(self, reason: str, advice: str = ...) -> None: ...


class PlanRunner:
    """Drives one plan batch at a time from the policy's result to its booked outcome.

    About 340 lines, over the ~300 this code base aims at: half of it is one-line entry
    points the router calls per message (``staged``, ``failed``, ``voted``, ``committed``,
    ``heartbeat``, ``agent_lost``) that feed the batch's ``PlanRun`` and then ``advance``;
    the rest is when to plan, the policy call, cutting batches and booking outcomes, which
    share the batch in flight and its counters. The state machine itself is ``plan_state``.
    """

    def __init__(
        self, cfg: CoordinatorConfig, book: PlacementBook, metrics, log: logging.LoggerAdapter, host: PlanHost
    ) -> None:
        self.cfg, self.book, self.metrics, self.log, self.host = cfg, book, metrics, log, host
        self.plan: PlanRun | None = None
        self.pending_batches: list = []
        # Plan ids are unique across coordinator restarts (agents drop ids they have seen, to
        # survive duplicated messages): a random 32-bit base, shifted, plus a counter.
        self._plan_counter = int.from_bytes(os.urandom(4), "big") << 16
        self._numbers: dict[int, int] = {}
        self.last_plan_end_step = 0
        self.last_persistence: float | None = None
        """Of the load window, as the last plan used it (see load_forecast); None until a plan measured it."""
        self.spend = SpendState()
        """The migration policy's spend controller (spend_control): how cheap the next plan makes moves,
        from the slots the plans moved against what DeepSeek's policy would have moved."""
        self._shadow: np.ndarray | None = None
        """DeepSeek's placement had it planned every rebalance from the first (never applied): the
        spend controller's reference; None until the first migration plan."""
        self._tally: asyncio.Task | None = None
        """The last plan's spend tally, run after that plan was decided (see :meth:`settle_spend`)."""
        self._spend_generation = 0
        """Bumped by :meth:`new_deployment`: a tally of the old deployment's plan then changes nothing."""
        self.planning = False
        self._seeded = False
        self.drain_at_step: int | None = None
        """No new plan starts once the deployment passes this step (planned shutdowns)."""
        self.outcomes: list[PlanOutcome] = []
        self.counts = {"committed": 0, "aborted": 0, "diverged": 0, "proposed": 0, "skipped": 0}
        self._over_budget_warned = False
        """Whether the layers over the staging budget were already warned about (see _report_over_budget)."""
        self.skips_in_a_row = 0
        """Evaluations without a plan since the last one that made a plan: the first is logged at
        INFO, the rest at DEBUG (a balanced deployment evaluates every interval, for days;
        ``eplb_plans_total{outcome="skipped"}`` counts them all)."""
        self.resent: collections.Counter[str] = collections.Counter()
        """Copies of ``Plan``, ``VoteNow`` and ``AbortPlan`` sent again to ranks that had not answered (``resend``)."""
        self._plan_message: protocol.Plan | None = None
        self.bytes_moved_total = 0
        self.experts_moved_total = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eplb-policy")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def new_deployment(self) -> None:
        """Plan for a new deployment as a fresh coordinator would: its steps count from 0 again
        (an old ``last_plan_end_step`` would hold its first plan back until it passed the old
        deployment's step), and ``--initial-placement`` applies to it. Counters and outcomes stay:
        they count this coordinator's life."""
        self.plan = None
        self.pending_batches = []
        self.last_plan_end_step = 0
        self.last_persistence = None  # the old deployment's load, not this one's
        self.spend, self._shadow = SpendState(), None
        self._spend_generation += 1
        self._show_spend()
        self._seeded = False
        self.drain_at_step = None
        self.skips_in_a_row = 0
        self._over_budget_warned = False

    def number(self, plan_id: int) -> int:
        return self._numbers.get(plan_id, 0)

    def knows(self, plan_id: int) -> bool:
        """Whether this coordinator proposed ``plan_id`` (ids are unique across restarts)."""
        return plan_id in self._numbers

    def count_diverged(self) -> None:
        self.counts["diverged"] += 1
        self.metrics.plans.labels("diverged").inc()

    @property
    def next_epoch_in_flight(self) -> int | None:
        return None if self.plan is None else self.plan.base_epoch + 1

    # -- when to plan, and the policy --------------------------------------------------

    def should_plan(self, now: float) -> bool:
        host, book = self.host, self.book
        if self.planning or host.halted_reason or self.plan is not None or self.pending_batches:
            return False
        if book.window is None or not host.comm_ready() or not host.epochs_agree():
            return False
        if not host.clock_allows_planning(now):
            return False
        if self.drain_at_step is not None and book.max_step_seen >= self.drain_at_step:
            return False
        if self.cfg.initial_placement is not None and not self._seeded:
            return True
        return (
            book.window.steps_covered() >= self.cfg.min_window_steps
            and host.min_step() - self.last_plan_end_step >= self.cfg.rebalance_interval_steps
        )

    def _policy_call(self, current: np.ndarray, load: np.ndarray, persistence: float, seeding: bool, fresh: bool):
        """The policy's call for the executor: ``seeding`` moves to ``--initial-placement``;
        ``fresh`` (:meth:`starts_fresh`, asked once per plan by its caller) lays DeepSeek's packing
        (``plan_rebalance(fresh=True)``)."""
        from eplb_service.coordinator.policy import build_plan, plan_rebalance  # heavy imports only when planning

        book, cfg = self.book, self.cfg
        if seeding:
            seed = np.asarray(cfg.initial_placement, dtype=np.int64)
            return functools.partial(
                build_plan,
                current,
                seed,
                load if load.any() else np.ones(load.shape),
                book.shape,
                bytes_per_expert=book.model.bytes_per_expert,
                staging_budget_bytes=cfg.staging_budget_bytes,
                require_gain=False,
                skip_over_budget=True,
            )
        return functools.partial(
            plan_rebalance,
            cfg.policy,
            current,
            load,
            book.shape,
            num_groups=cfg.num_groups,
            num_nodes=cfg.num_nodes,
            bytes_per_expert=book.model.bytes_per_expert,
            staging_budget_bytes=cfg.staging_budget_bytes,
            min_layer_gain=cfg.min_layer_gain,
            persistence=persistence,
            fresh=fresh,
            surges=book.window.surge_model() if cfg.policy == "migration" else None,
            skip_over_budget=True,
            **plan_factors(self.spend),
        )

    def starts_fresh(self) -> bool:
        """Whether the next plan starts from vLLM's initial placement, the one serving started
        with (epoch 0: no plan committed since, whatever this coordinator's own history), which
        the migration policy replaces with DeepSeek's packing instead of repairing it
        (``plan_rebalance(fresh=)``). A restarted coordinator sees the ranks' epoch, so it does
        not repack a placement plans already chose; a layout vLLM was started with other than its
        default (another expert placement strategy) is repaired as any other, and so is
        everything under ``--initial-placement`` (the operator chose that one, even where its
        seeding plan did not commit)."""
        book, cfg = self.book, self.cfg
        if book.epoch != 0 or cfg.policy != "migration" or cfg.initial_placement is not None or book.shape is None:
            return False
        started = book.placements.get(0)
        return started is not None and is_initial_phy2log(started, book.shape)

    async def settle_spend(self) -> None:
        """Wait for the last plan's spend tally: the next plan's scale is what it leaves."""
        tally, self._tally = self._tally, None
        if tally is not None and not tally.cancelled():  # cancelled: its event loop ended (a test's)
            await tally

    async def _tally_spend(self, current: np.ndarray, load: np.ndarray, spent: int, generation: int) -> None:
        """Plan DeepSeek's policy from the shadow placement for the same load and update the spend
        controller with both plans' slots. The first plan, and every fresh plan (from the
        placement serving started with: DeepSeek's packing, as DeepSeek's own first plan), sets
        the shadow off from its current placement and is not tallied: a fresh plan that did not
        commit is made again, and tallied it would count a whole packing against the budget. A
        failure here only leaves the controller where it was.

        It runs after its plan was decided and sent (:meth:`run_policy` starts it as a task), so
        the shadow plan (DeepSeek's whole-model packing: 9-19 ms for the Qwen3.5 shape, more than
        the migration plan itself) adds nothing to a plan's time; the next plan waits for it.
        ``generation``: :attr:`_spend_generation` when its plan was made (a new deployment since,
        and the tally changes nothing)."""
        from eplb_service.coordinator.policy import plan_rebalance

        first = self._shadow is None or self._shadow.shape != current.shape
        shadow = current if first else self._shadow
        call = functools.partial(
            plan_rebalance,
            "deepseek",
            shadow,
            load,
            self.book.shape,
            num_groups=self.cfg.num_groups,
            num_nodes=self.cfg.num_nodes,
        )
        try:
            reference = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as exc:
            self.log.warning(
                "spend controller: DeepSeek's shadow plan failed (%s); keeping scale %g", exc, self.spend.scale
            )
            return
        try:  # both placements were planned before this load arrived: what each made of it
            # Off the event loop, like the shadow plan: scoring two placements of the whole model
            # takes 0.3-0.7 ms for the Qwen3.5 shape, time the loop owes to load reports.
            measure = functools.partial(balance_lead, current, shadow, load, self.book.shape.num_ranks)
            lead = None if first else await asyncio.get_running_loop().run_in_executor(self._executor, measure)
        except Exception as exc:
            self.log.warning("spend controller: balance lead not measured (%s); step 6's price stays", exc)
            lead = None
        if generation != self._spend_generation:  # a new deployment since: this was the old one's
            return
        self._shadow = reference.target_phy2log
        if not first:
            try:
                self._update_spend(spent, reference.experts_moved, lead)
            except Exception as exc:  # the tally must not fail: the next plan awaits it
                self.log.warning("spend controller: update failed (%s); keeping scale %g", exc, self.spend.scale)

    def _show_spend(self) -> None:
        """The controller's gauges follow its state (after each tally, and a new deployment's reset)."""
        self.metrics.move_price_scale.set(self.spend.scale)
        self.metrics.balance_lead.set(self.spend.lead)
        self.metrics.step_price_scale.set(self.spend.price_scale)

    def _update_spend(self, spent: int, reference: int, lead: float | None) -> None:
        """Feed one tally to the controller; the gauges follow it and each change is logged once."""
        scale, price = self.spend.scale, self.spend.price_scale
        shape, groups, nodes = self.book.shape, self.cfg.num_groups, self.cfg.num_nodes
        self.spend = update_spend(
            self.spend,
            spent,
            reference,
            lead=lead,
            persistence=self.last_persistence,
            **shape_terms(shape.num_logical, shape.num_physical, shape.num_ranks, groups, nodes),
        )
        self._show_spend()
        if self.spend.price_scale != price:
            self.log.info(
                "spend controller: step 6's price x%g -> x%g: balance %+.2f points against DeepSeek's "
                "lately, %.0f slots moved against its %.0f",
                price,
                self.spend.price_scale,
                100 * self.spend.lead,
                self.spend.spent,
                self.spend.reference,
            )
        if self.spend.scale != scale:
            self.log.info(
                "spend controller: moves %s (scale %g -> %g): %.0f slots moved against DeepSeek's %.0f lately",
                "cheaper" if self.spend.scale < scale else "dearer",
                scale,
                self.spend.scale,
                self.spend.spent,
                self.spend.reference,
            )

    def _seed_fits(self) -> bool:
        """Whether ``--initial-placement`` fits the deployment the agents registered; if not, it is
        dropped with one error naming it (planning goes on from the placement the ranks have)."""
        try:
            validate_phy2log(np.asarray(self.cfg.initial_placement, dtype=np.int64), self.book.shape)
        except (PlacementError, ValueError) as exc:
            self.log.error(
                "--initial-placement does not fit this deployment (%s layers x %s slots, %s experts): %s; "
                "ignoring it and planning from the current placement",
                self.book.shape.num_layers,
                self.book.shape.num_physical,
                self.book.shape.num_logical,
                exc,
            )
            return False
        return True

    async def run_policy(self) -> None:
        """Compute a rebalance in the executor; send its first batch if it is worth it."""
        book = self.book
        epoch = book.epoch
        bytes_per_expert = book.model.bytes_per_expert
        if self.cfg.staging_budget_bytes < bytes_per_expert:  # the same every time: halt once, naming it
            self.host.halt(
                f"--staging-budget-bytes {self.cfg.staging_budget_bytes} is less than one expert's "
                f"{bytes_per_expert} bytes on a rank: no plan could move a single slot",
                f"restart the coordinator with --staging-budget-bytes of at least {bytes_per_expert}",
            )
            self.planning = False
            return
        await self.settle_spend()  # the last plan's tally sets this plan's scale
        seeding = self.cfg.initial_placement is not None and not self._seeded
        if seeding and not self._seed_fits():
            self._seeded, seeding = True, False
        t0 = time.perf_counter()
        try:
            persistence = self.last_persistence = book.window.persistence()
            self.metrics.load_persistence.set(persistence)
            current, load = book.placements[epoch].copy(), book.window.load.copy()
            fresh = not seeding and self.starts_fresh()
            call = self._policy_call(current, load, persistence, seeding, fresh)
            self._seeded = self._seeded or seeding
            result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except PolicySettingsError as exc:  # the same every time: one clear line, not one per interval
            self.host.halt(f"--policy {self.cfg.policy}: {exc}", "restart the coordinator with settings that fit")
            return
        except Exception as exc:
            self.log.exception("policy %s failed: %s", self.cfg.policy, exc)
            self.last_plan_end_step = self.host.min_step()
            return
        finally:
            self.planning = False
            self.metrics.phase_seconds.labels("policy").observe(time.perf_counter() - t0)
        self.last_plan_end_step = self.host.min_step()
        self._report_over_budget(result)
        gain = result.balancedness_after - result.balancedness_before
        self.metrics.balancedness.labels("projected").set(result.balancedness_after)
        skipped = epoch != book.epoch or not result.batches or (gain < self.cfg.min_gain and not result.forced_layers)
        if not seeding and self.cfg.policy == "migration":
            if fresh:  # the shadow restarts here, as at the first plan: this plan is not tallied
                self._shadow = None
            moved = 0 if skipped else result.experts_moved
            tally = self._tally_spend(current, load, moved, self._spend_generation)
            self._tally = asyncio.get_running_loop().create_task(tally)
        if seeding:
            self.log.info(
                "moving to the initial placement: %d batches, %d experts", len(result.batches), result.experts_moved
            )
        elif fresh and not skipped:
            self.log.info(
                "first plan from the placement serving started with: a full packing, %d batches, %d experts",
                len(result.batches),
                result.experts_moved,
            )
        elif skipped:
            self.counts["skipped"] += 1
            self.metrics.plans.labels("skipped").inc()
            self.skips_in_a_row += 1
            self.log.log(
                logging.INFO if self.skips_in_a_row == 1 else logging.DEBUG,
                "no rebalance: balancedness %.4f -> %.4f projected %s (gain %.4f < min_gain %.4f or nothing to "
                "move; %s)",
                result.balancedness_before,
                result.balancedness_after,
                self._planned_on(persistence),
                gain,
                self.cfg.min_gain,
                "the next ones at DEBUG until a plan is made" if self.skips_in_a_row == 1 else "again",
            )
            return
        self.skips_in_a_row = 0
        if result.forced_layers:
            self.log.info(
                "%d layers hold a group's experts on more than one node (--groups %d --nodes %d): this plan "
                "keeps each group on one node whatever its gain",
                len(result.forced_layers),
                self.cfg.num_groups,
                self.cfg.num_nodes,
            )
        self.log.info(
            "rebalance: balancedness %.4f -> %.4f projected %s, %d batches, %d experts, %s",
            result.balancedness_before,
            result.balancedness_after,
            self._planned_on(persistence),
            len(result.batches),
            result.experts_moved,
            human_bytes(result.bytes_moved),
        )
        self.pending_batches = list(result.batches)
        self.start_next_batch()

    def _planned_on(self, persistence: float) -> str:
        """Which load the projected balancedness is under. The migration policy plans for a forecast
        that shrinks each expert's deviation from the mean where little of it lasts, so with hot
        experts that come and go its "before" reads near 1.0 while the measured balancedness (the
        ``current`` gauge, status) is far lower; said plainly, the two do not read as a contradiction."""
        kept = planning_persistence(persistence) if self.cfg.policy == "migration" else 1.0
        if kept >= 1.0:
            return f"on the load window (load persistence {persistence:.2f})"
        return (
            f"on the forecast next window (load persistence {persistence:.2f}: {kept:.0%} of each expert's "
            "deviation from the mean kept)"
        )

    def _report_over_budget(self, result) -> None:
        """One warning for layers left out because alone they need more staging than the budget
        (the first plan that leaves any out, then DEBUG while some are left out: a plan is tried
        every interval, and the same layers keep needing the same bytes)."""
        layers = getattr(result, "over_budget_layers", ())
        if not layers:
            self._over_budget_warned = False
            return
        shown = ", ".join(str(i) for i in layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        self.log.log(
            logging.DEBUG if self._over_budget_warned else logging.WARNING,
            "layers %s keep their placement: each alone needs more staging on one rank than "
            "--staging-budget-bytes %d (up to %d bytes, the budget that lets them move); the other layers "
            "are planned as usual",
            shown,
            self.cfg.staging_budget_bytes,
            result.over_budget_need_bytes,
        )
        self._over_budget_warned = True

    # -- batches -----------------------------------------------------------------------

    def start_next_batch(self) -> None:
        if not self.pending_batches or self.host.halted_reason:
            self.pending_batches = []
            return
        if not self.host.comm_ready():
            self.log.warning("dropping %d planned batches: side communicator not ready", len(self.pending_batches))
            self.pending_batches = []
            return
        batch = self.pending_batches.pop(0)
        self._plan_counter += 1
        layers = [int(x) for x in batch.layers]
        rows = np.asarray(batch.phy2log, dtype=np.int64)
        book = self.book
        candidate = book.placements[book.epoch].copy()
        try:
            candidate[layers] = rows
            validate_phy2log(candidate, book.shape)
        except (PlacementError, ValueError, IndexError) as exc:  # a policy bug must never reach the agents
            self.log.error(
                "policy %s produced an invalid plan for layers %s: %s; not sent", self.cfg.policy, layers, exc
            )
            self.metrics.plans_aborted.labels("invalid_plan").inc()
            self.counts["aborted"] += 1
            self.pending_batches = []
            return
        cfg = self.cfg
        self.plan = PlanRun(
            plan_id=self._plan_counter,
            base_epoch=book.epoch,
            layers=layers,
            rows=rows,
            world_size=cfg.world_size,
            staging_timeout_s=cfg.staging_timeout_s,
            voting_timeout_s=cfg.voting_timeout_s,
            started_at=time.monotonic(),
            bytes_moved=int(batch.bytes_moved),
        )
        self.plan.vote_first_s = min(VOTE_FIRST_S, cfg.agent.fence_timeout_s / 4)
        self.counts["proposed"] += 1
        self._numbers[self.plan.plan_id] = self.counts["proposed"]
        self.log.info(
            "plan #%d (id %d): layers %s, %s",
            self.counts["proposed"],
            self.plan.plan_id,
            layers,
            human_bytes(self.plan.bytes_moved),
        )
        self.metrics.plans_proposed.inc()
        self._plan_message = protocol.Plan(
            plan_id=self.plan.plan_id,
            base_epoch=book.epoch,
            layers=layers,
            phy2log=protocol.NDArray.from_numpy(rows),
        )
        self.host.broadcast(self._plan_message)

    def abort(self, reason: str, code: str = "other") -> None:
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
        self.advance()

    # -- events from the ranks (each returns nothing; the runner acts on phase changes) --

    def _current(self, plan_id: int | None = None) -> PlanRun | None:
        plan = self.plan
        return plan if plan is not None and (plan_id is None or plan.plan_id == plan_id) else None

    def staged(self, plan_id: int, rank: int, now: float, received_bytes: int = 0, duration_s: float = 0.0) -> None:
        plan = self._current(plan_id)
        if plan is not None and plan.on_staged(rank, now, received_bytes, duration_s):
            self.log.info(
                "plan #%d staged on every rank: %s over the side communicator, slowest rank %.2f s",
                self.number(plan.plan_id),
                human_bytes(plan.received_bytes),
                plan.slowest_staging_s,
            )
            self.advance()

    def failed(self, plan_id: int, rank: int, reason: str, code: str, now: float) -> None:
        plan = self._current(plan_id)
        if plan is not None and plan.on_failed(rank, reason, now, code):
            self.advance()

    def voted(self, plan_id: int, commit_step: int, ok: bool, rank: int, via: str = "Voted", code: str = "") -> None:
        """The decision record's content, as ``rank`` read it (``via``: its ``Voted`` or its heartbeat,
        which also names the record's abort ``code``)."""
        plan = self._current(plan_id)
        if plan is None:
            return
        unknown = plan.outcome_unknown
        if plan.on_voted(commit_step, ok, code) and unknown:  # it was warned about: say that it is known now
            self.log.info(
                "plan #%d (id %d): the decision record says %s (rank %d's %s): its outcome is known",
                self.number(plan_id),
                plan_id,
                f"commit at step {commit_step}" if ok else "abort",
                rank,
                via,
            )

    def commit_epoch(self, plan_id: int) -> int | None:
        """The epoch a commit of ``plan_id`` moves the ranks into, while it is the plan in flight."""
        plan = self._current(plan_id)
        return None if plan is None else plan.base_epoch + 1

    def committed(self, plan_id: int, rank: int, step: int, stall_s: float, now: float) -> None:
        plan = self._current(plan_id)
        if plan is not None and plan.on_committed(rank, step, stall_s, now):
            self.advance()

    def heartbeat(self, rank: int, step: int, epoch: int, now: float, staging_plan: int = 0) -> None:
        plan = self._current()
        if plan is not None:
            plan.note_staging(rank, staging_plan)
        if plan is not None and plan.on_heartbeat(rank, step, epoch, now):
            self.advance()

    def agent_lost(self, rank: int, now: float) -> None:
        plan = self._current()
        if plan is not None and not plan.phase.final and plan.on_agent_lost(rank, now):
            self.advance()

    def rank_resumed(self, rank: int, now: float) -> None:
        """``rank``'s own process on a new socket (``Registrar._carry_over``): the plan goes on."""
        plan = self._current()
        if plan is None or plan.phase.final:
            return
        plan.on_rank_resumed(rank, now)
        self.log.info(
            "plan #%d (id %d) goes on while %s: rank %d resumed its session on a new connection (the same "
            "process, its staged rows kept); what went to its old connection is sent again",
            self.number(plan.plan_id),
            plan.plan_id,
            plan.phase.value,
            rank,
        )

    def tick(self, now: float) -> None:
        plan = self._current()
        if plan is not None and plan.on_tick(now):
            if plan.outcome_unknown and not plan.phase.final:
                self.log.warning(
                    "plan #%d (id %d): %s; AbortPlan goes on to the silent ranks (it draws the record's content), "
                    "and no new plan starts meanwhile",
                    self.number(plan.plan_id),
                    plan.plan_id,
                    plan.reason,
                )
            self.advance()
        plan = self._current()
        if plan is not None:
            self._resend(plan, now)

    def _resend(self, plan: PlanRun, now: float) -> None:
        """This phase's message again to the ranks that have not answered it (``resend``)."""
        ranks = plan.resend_due(now)
        if not ranks:
            return
        staging = plan.phase is Phase.STAGING
        message: protocol.Message
        if staging:
            message = self._plan_message
        elif plan.abort_sent:
            message = _abort_message(plan)
        else:
            message = protocol.VoteNow(plan_id=plan.plan_id)
        name = type(message).__name__
        self.resent[name] += len(ranks)
        self.metrics.messages_resent.labels(name).inc(len(ranks))
        self.log.info(
            "plan #%d: %s sent again to ranks %s (no %s from them after %.2fs)",
            self.number(plan.plan_id),
            name,
            ranks,
            "Staged" if staging else "outcome",
            now - plan.phase_started_at,
        )
        for rank in ranks:
            self.host.send_to_rank(rank, message)

    # -- phase changes ---------------------------------------------------------------------

    def advance(self) -> None:
        plan = self.plan
        if plan is None:
            return
        if plan.phase is Phase.VOTING and plan.abort_requested and not plan.abort_sent:
            plan.abort_sent = True  # ranks in their vote record "abort" unless "commit" is there already
            plan.abort_sent_at = time.monotonic()
            self.host.broadcast(_abort_message(plan))
            return
        if plan.phase is Phase.VOTING and not plan.committed and not plan.aborted and not plan.vote_sent:
            plan.vote_sent = True
            self.host.broadcast(protocol.VoteNow(plan_id=plan.plan_id))
            return
        if not plan.phase.final:
            return
        self.plan = None
        experts_moved, commit_step = 0, None
        if plan.phase is Phase.COMMITTED:
            experts_moved, commit_step = self._book_commit(plan)
        else:
            self._book_abort(plan)
        self.metrics.phase_seconds.labels("staging").observe(plan.staging_s)
        self.metrics.phase_seconds.labels("voting").observe(plan.voting_s)
        self.last_plan_end_step = self.host.min_step()
        stalls = [s for _, s in plan.committed.values()]
        self.outcomes.append(
            PlanOutcome(
                plan.plan_id,
                plan.phase.value,
                plan.reason,
                self.number(plan.plan_id),
                plan.code if plan.phase is Phase.ABORTED else "",
                plan.layers,
                plan.bytes_moved,
                experts_moved,
                commit_step,
                plan.staging_s,
                plan.voting_s,
                max(stalls, default=0.0),
            )
        )
        del self.outcomes[:-100]
        for old in list(self._numbers)[:-100]:
            del self._numbers[old]
        if plan.phase is Phase.COMMITTED:
            self.start_next_batch()

    def _book_commit(self, plan: PlanRun) -> tuple[int, int]:
        experts_moved = self.book.commit(plan.base_epoch, plan.layers, plan.rows)
        # -1: inferred from a heartbeat at the new epoch before any rank said the commit step
        commit_step = max(step for step, _ in plan.committed.values())
        if commit_step < 0 and plan.decision is not None:
            commit_step = plan.decision[0]
        self.bytes_moved_total += plan.bytes_moved
        self.experts_moved_total += experts_moved
        self.counts["committed"] += 1
        metrics = self.metrics
        metrics.plans.labels("committed").inc()
        metrics.bytes_moved.inc(plan.bytes_moved)
        metrics.experts_moved.inc(experts_moved)
        metrics.epoch.set(self.book.epoch)
        self.log.info(
            "plan #%d committed at step %d: layers %s, %d experts moved, epoch %d",
            self.number(plan.plan_id),
            commit_step,
            plan.layers,
            experts_moved,
            self.book.epoch,
        )
        return experts_moved, commit_step

    def _book_abort(self, plan: PlanRun) -> None:
        diverged = plan.phase is Phase.DIVERGED
        key = "diverged" if diverged else "aborted"
        self.counts[key] += 1
        self.metrics.plans.labels(key).inc()
        self.metrics.plans_aborted.labels("diverged" if diverged else (plan.code or "other")).inc()
        self.host.broadcast(_abort_message(plan))
        self.pending_batches = []
        if diverged:
            self.host.halt(f"plan #{self.number(plan.plan_id)} (id {plan.plan_id}) diverged: {plan.reason}")
            return
        self.log.warning(
            "plan #%d aborted (%s): %s; maps untouched on every rank",
            self.number(plan.plan_id),
            plan.code or "other",
            plan.reason,
        )
        if self.host.complete():
            self.host.rebuild_comm()  # a rank may have torn its communicator down


def _abort_message(plan: PlanRun) -> protocol.AbortPlan:
    """The ``AbortPlan`` for ``plan``: the same message when first broadcast (before or in the
    vote) and when sent again to the ranks with no outcome."""
    return protocol.AbortPlan(plan_id=plan.plan_id, reason=plan.reason, code=plan.code or "other")
