"""A snapshot of the coordinator's progress, for the processes that host one in-process.

The simulated deployment and the GPU harness run the coordinator on their own event loop
and poll it while their rank processes run: for a progress line, a hang report and the
summary at the end. :class:`CoordinatorProgress` is what they may read, frozen at one
moment, so that they need neither the parts' internals nor the full status document.
"""

from __future__ import annotations

from dataclasses import dataclass

from eplb_service.coordinator.placement_book import PlacementBook
from eplb_service.coordinator.plan_runner import PlanRunner
from eplb_service.coordinator.registry import Registry


@dataclass(frozen=True)
class CoordinatorProgress:
    """The coordinator at one moment.

    Attributes:
        epoch: placement epoch (-1 until every rank has registered and the maps are known).
        agents_alive: agents registered and not declared dead.
        committed, aborted, diverged, skipped: plan counts so far (``skipped``: no gain).
        bytes_moved, experts_moved: cross-rank traffic of the committed plans.
        busy: a plan in flight, batches waiting, or the policy running.
        plan_id, plan_phase: the plan in flight (``None`` when there is none).
    """

    epoch: int
    agents_alive: int
    committed: int
    aborted: int
    diverged: int
    skipped: int
    bytes_moved: int
    experts_moved: int
    busy: bool
    plan_id: int | None
    plan_phase: str | None


def progress_of(registry: Registry, book: PlacementBook, plans: PlanRunner) -> CoordinatorProgress:
    plan = plans.plan
    counts = plans.counts
    return CoordinatorProgress(
        epoch=book.epoch,
        agents_alive=len(registry.alive),
        committed=counts["committed"],
        aborted=counts["aborted"],
        diverged=counts["diverged"],
        skipped=counts["skipped"],
        bytes_moved=plans.bytes_moved_total,
        experts_moved=plans.experts_moved_total,
        busy=plan is not None or bool(plans.pending_batches) or plans.planning,
        plan_id=None if plan is None else plan.plan_id,
        plan_phase=None if plan is None else plan.phase.value,
    )
