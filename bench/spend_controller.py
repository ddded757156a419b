"""Prototype (issue 16): an online controller that finds a cell's move price from the slots it spends.

Why: ``bench/oracle_pairs.py`` shows that the exact price-per-slot rule meets more Mixtral 8+0
cells with its price chosen per cell (in hindsight) than at one price for all, and many of the
migration policy's misses are balance misses where it spends far below the slot budget (a fifth
of DeepSeek's slots). A coordinator can see how much it spends against that budget while it
runs: besides the policy's plan it can plan DeepSeek's from a *shadow* placement (DeepSeek's own
previous plan, a few ms per rebalance; exactly the sequence the matrix compares against), or from
the current placement (``reference="fresh"``). The controller keeps the two tallies and scales the
policy's spending levers by one factor ``scale``: below ``low`` of DeepSeek's tally it spends more
(``scale *= down``), above ``high`` less (``scale *= up``), within ``[min_scale, max_scale]``.

What ``scale`` multiplies (:func:`policy_options`; the policy's own keyword parameters, defaults
at ``scale = 1``): ``"price"`` step 6's ``move_price``; ``"gate"`` step 3's ``min_swap_share``;
``"tolerance"`` step 3's tolerance (``tolerance``, ``replica_share`` and ``noise_sigmas`` alike);
``"room"`` divides step 4's ``fine_move_share`` (more room when cheaper). Where the load's
persistence is 0.8 or more step 6's price is nearly 0 already, so there only the tolerance, the
gate and the room change what a layer spends.

Each cell runs DeepSeek's sequence, the migration policy's as ``bench/planner.py --matrix`` does
(the baseline, same run) and the controlled one, on the same loads; printed: the counts of cells
meeting both targets, misses, worst cells, and the cells that flipped either way.

Usage: ``PYTHONPATH=. python bench/spend_controller.py [--shapes Mixtral] [--seed 0] [--levers price,room]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from bench.planner import (
    BALANCE_TARGET_PP,
    MATRIX_SHAPES,
    MOVED_TARGET,
    WORKLOADS,
    MatrixShape,
    SequenceResult,
    Workload,
    cell_loads,
    matrix_cells,
    run_sequence,
)
from eplb_service.coordinator.load_forecast import forecast_load, persistence, planning_persistence
from eplb_service.coordinator.policy import RebalancePlan, build_plan, plan_rebalance
from eplb_service.coordinator.policy_hierarchy import hierarchical_migration_phy2log, node_purity, uses_hierarchy
from eplb_service.coordinator.policy_migration import (
    DEFAULT_MIN_SWAP_SHARE,
    DEFAULT_MOVE_PRICE,
    DEFAULT_NOISE_SIGMAS,
    DEFAULT_REPLICA_SHARE,
    DEFAULT_TOLERANCE,
    migration_phy2log,
)
from eplb_service.coordinator.spend_control import room_follows_scale, scaled_room
from eplb_service.placement import PlacementShape, initial_phy2log, model_balancedness, rank_loads

LEVERS = ("price", "gate", "tolerance", "room")


@dataclass(frozen=True)
class SpendController:
    """The update rule's settings (see the module docstring).

    Attributes:
        low, high: the share of DeepSeek's tally below which moves get cheaper, above which dearer.
        down, up: the factors ``scale`` is multiplied by then (``down < 1 < up``).
        min_scale, max_scale: ``scale``'s range.
        memory: each rebalance the tallies are multiplied by this before the new slots are added
            (1: the whole sequence, as the matrix's target counts).
        levers: which of :data:`LEVERS` ``scale`` acts on.
        behind_pp: if set, moves get cheaper only while the policy's placements have been, on
            the windows they served, more than this many pp of balancedness behind DeepSeek's
            shadow placements (mean over the tallied windows): spending more is for balance.
    """

    low: float = 0.12
    high: float = 0.16
    down: float = 0.5
    up: float = 2.0
    min_scale: float = 1 / 16
    max_scale: float = 1.0
    memory: float = 1.0
    levers: tuple[str, ...] = ("price", "room")
    behind_pp: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"need 0 <= low <= high, got low={self.low}, high={self.high}")
        if not 0 < self.down <= 1 <= self.up:
            raise ValueError(f"need 0 < down <= 1 <= up, got down={self.down}, up={self.up}")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not 0 < self.memory <= 1:
            raise ValueError(f"memory must be in (0, 1], got {self.memory}")
        unknown = set(self.levers) - set(LEVERS)
        if unknown:
            raise ValueError(f"unknown levers {sorted(unknown)}; choices: {', '.join(LEVERS)}")


@dataclass(frozen=True)
class SpendState:
    """The controller's state between rebalances: the two tallies (slots) and the current scale."""

    spent: float = 0.0
    reference: float = 0.0
    scale: float = 1.0
    gap_sum: float = 0.0
    gap_weight: float = 0.0

    @property
    def gap_pp(self) -> float | None:
        """Mean pp of balancedness the policy's placements were ahead of DeepSeek's (None: none seen)."""
        return self.gap_sum / self.gap_weight if self.gap_weight > 0 else None


def update_spend(
    state: SpendState, spent: int, reference: int, ctl: SpendController, gap_pp: float | None = None
) -> SpendState:
    """The state after a rebalance that moved ``spent`` slots where DeepSeek's plan moved ``reference``.

    ``gap_pp``: how far the policy's placement was ahead of DeepSeek's (pp of balancedness) on the
    window just seen, if known. Pure. The share is of the tallies; with no DeepSeek slots yet the
    scale stays.
    """
    tally = state.spent * ctl.memory + spent
    ref = state.reference * ctl.memory + reference
    gap_sum, gap_weight = state.gap_sum * ctl.memory, state.gap_weight * ctl.memory
    if gap_pp is not None:
        gap_sum, gap_weight = gap_sum + gap_pp, gap_weight + 1.0
    gap = gap_sum / gap_weight if gap_weight > 0 else None
    behind = ctl.behind_pp is None or (gap is not None and gap < -ctl.behind_pp)
    scale = state.scale
    if ref > 0:
        share = tally / ref
        if share < ctl.low and behind:
            scale *= ctl.down
        elif share > ctl.high:
            scale *= ctl.up
    return SpendState(tally, ref, float(np.clip(scale, ctl.min_scale, ctl.max_scale)), gap_sum, gap_weight)


def policy_options(scale: float, levers: tuple[str, ...], num_physical: int | None = None) -> dict[str, float]:
    """The migration policy's keyword arguments for ``scale`` (empty at ``scale = 1``: its defaults).

    ``"room"`` is the coordinator's rule (:func:`~eplb_service.coordinator.spend_control.scaled_room`,
    at most ``MAX_FINE_MOVE_SHARE``), in layers of ``num_physical`` slots only where
    :func:`~eplb_service.coordinator.spend_control.room_follows_scale` (every layer if ``None``)."""
    if scale == 1.0:
        return {}
    out: dict[str, float] = {}
    if "price" in levers:
        out["move_price"] = DEFAULT_MOVE_PRICE * scale
    if "gate" in levers:
        out["min_swap_share"] = DEFAULT_MIN_SWAP_SHARE * scale
    if "tolerance" in levers:
        out["tolerance"] = DEFAULT_TOLERANCE * scale
        out["replica_share"] = DEFAULT_REPLICA_SHARE * scale
        out["noise_sigmas"] = DEFAULT_NOISE_SIGMAS * scale
    if "room" in levers and (num_physical is None or room_follows_scale(num_physical)):
        out["fine_move_share"] = scaled_room(scale)
    return out


def migration_plan(
    current: np.ndarray, load: np.ndarray, shape: MatrixShape, lasting: float, options: dict[str, float]
) -> RebalancePlan:
    """``plan_rebalance("migration", ...)`` with the policy's keyword ``options`` (same steps:
    the planning forecast, the policy, the node-purity requirement, the gain filter)."""
    pshape = PlacementShape(current.shape[0], shape.experts, shape.slots, shape.ranks)
    planned = forecast_load(load, planning_persistence(lasting))
    required = None
    if uses_hierarchy(shape.groups, shape.nodes):
        proposed = hierarchical_migration_phy2log(
            current, planned, shape.ranks, shape.groups, shape.nodes, persistence=lasting, **options
        )
        required = ~node_purity(current, shape.experts, shape.groups, shape.nodes)
    else:
        proposed = migration_phy2log(current, planned, shape.ranks, persistence=lasting, **options)
    return build_plan(current, proposed, planned, pshape, required_layers=required)


@dataclass(frozen=True)
class ControlledResult:
    """The controlled migration sequence: the matrix's figures, the scale used at each rebalance
    (warm-up first) and the reference tally the controller saw over the measured rebalances."""

    sequence: SequenceResult
    scales: list[float] = field(default_factory=list)
    reference_moved: int = 0


def controlled_sequence(
    shape: MatrixShape, loads: list[np.ndarray], ctl: SpendController, *, reference: str = "shadow", warmup: int = 1
) -> ControlledResult:
    """:func:`bench.planner.run_sequence` for the migration policy with the controller between plans.

    ``reference``: ``"shadow"`` tallies DeepSeek's plan from its own previous plan (the matrix's
    DeepSeek sequence), ``"fresh"`` DeepSeek's plan from the migration policy's current placement.
    The warm-up plans run at scale 1 and are not tallied (the matrix does not count them).
    """
    if reference not in ("shadow", "fresh"):
        raise ValueError(f"reference must be 'shadow' or 'fresh', got {reference!r}")
    layers = loads[0].shape[0]
    pshape = PlacementShape(layers, shape.experts, shape.slots, shape.ranks)
    current = shadow = initial_phy2log(pshape)
    state = SpendState()
    planned, realized, times, scales = [], [], [], []
    moved = sent = warm = ref_total = 0
    last_moved = last_reference = 0
    for i in range(len(loads) - 1):
        lasting = persistence(loads[i - 1] if i else None, loads[i])
        if i > warmup:  # the last plan's slots, and how its placement did on the window it served
            ours = model_balancedness(rank_loads(current, loads[i], shape.ranks))
            gap = 100 * (ours - model_balancedness(rank_loads(shadow, loads[i], shape.ranks)))
            state = update_spend(state, last_moved, last_reference, ctl, gap)
        scales.append(state.scale)
        start = time.perf_counter()
        ds = plan_rebalance("deepseek", shadow, loads[i], pshape, num_groups=shape.groups, num_nodes=shape.nodes)
        if i == 0:  # the first plan, from the initial placement: DeepSeek's (plan_rebalance(fresh=True)), timed as such
            plan = ds
        else:
            start = time.perf_counter()
            plan = migration_plan(
                current, loads[i], shape, lasting, policy_options(state.scale, ctl.levers, shape.slots)
            )
        times.append((time.perf_counter() - start) * 1e3)
        if reference == "fresh":
            ds_moved = plan_rebalance(
                "deepseek", current, loads[i], pshape, num_groups=shape.groups, num_nodes=shape.nodes
            ).experts_moved
        else:
            ds_moved = ds.experts_moved
        shadow = ds.target_phy2log
        current = plan.target_phy2log
        if i < warmup:
            warm += plan.experts_moved
            continue
        last_moved, last_reference = plan.experts_moved, ds_moved
        ref_total += ds_moved
        planned.append(plan.balancedness_after)
        realized.append(model_balancedness(rank_loads(current, loads[i + 1], shape.ranks)))
        moved += plan.experts_moved
        sent += plan.bytes_moved
    result = SequenceResult(
        float(np.mean(planned)), float(np.mean(realized)), moved, sent, warm, statistics.median(times)
    )
    return ControlledResult(result, scales, ref_total)


@dataclass(frozen=True)
class ControlledCell:
    """One matrix cell: DeepSeek, the migration policy as the matrix runs it, and the controlled one."""

    shape: MatrixShape
    workload: Workload
    deepseek: SequenceResult
    baseline: SequenceResult
    controlled: ControlledResult

    def pp(self, seq: SequenceResult) -> float:
        return 100 * (seq.next_window - self.deepseek.next_window)

    def share(self, seq: SequenceResult) -> float:
        return seq.moved / max(self.deepseek.moved, 1)

    def meets(self, seq: SequenceResult) -> bool:
        return self.pp(seq) >= BALANCE_TARGET_PP and self.share(seq) <= MOVED_TARGET


def controlled_cell(
    shape: MatrixShape,
    workload: Workload,
    ctl: SpendController,
    *,
    rebalances: int = 10,
    seed: int = 0,
    layers: int | None = None,
    reference: str = "shadow",
) -> ControlledCell:
    """One cell on the matrix's loads (:func:`bench.planner.cell_loads`)."""
    loads = cell_loads(shape, workload, rebalances + 2, seed, layers)
    deepseek = run_sequence("deepseek", shape, loads)
    baseline = run_sequence("migration", shape, loads, spend_control=False)
    controlled = controlled_sequence(shape, loads, ctl, reference=reference)
    return ControlledCell(shape, workload, deepseek, baseline, controlled)


def summary(cells: list[ControlledCell]) -> str:
    """Counts, misses and worst cells for the baseline and the controlled policy, and the flips."""
    lines = []
    for name, pick in (("baseline", lambda c: c.baseline), ("controlled", lambda c: c.controlled.sequence)):
        met = sum(c.meets(pick(c)) for c in cells)
        bal = sum(c.pp(pick(c)) < BALANCE_TARGET_PP for c in cells)
        mov = sum(c.share(pick(c)) > MOVED_TARGET for c in cells)
        worst_bal = min(cells, key=lambda c: c.pp(pick(c)))
        worst_mov = max(cells, key=lambda c: c.share(pick(c)))
        lines.append(
            f"{name}: {met} of {len(cells)} meet both; {bal} balance / {mov} slots misses; "
            f"worst {worst_bal.pp(pick(worst_bal)):+.2f} pp ({worst_bal.shape.label}, {worst_bal.workload.label}); "
            f"most slots {100 * worst_mov.share(pick(worst_mov)):.1f}% "
            f"({worst_mov.shape.label}, {worst_mov.workload.label})"
        )
    for verb, flip in (
        ("gained", lambda c: c.meets(c.controlled.sequence) and not c.meets(c.baseline)),
        ("lost", lambda c: c.meets(c.baseline) and not c.meets(c.controlled.sequence)),
    ):
        for c in filter(flip, cells):
            lines.append(
                f"  {verb}: {c.shape.label} | {c.workload.label}: "
                f"{c.pp(c.baseline):+.2f} pp at {100 * c.share(c.baseline):.1f}% -> "
                f"{c.pp(c.controlled.sequence):+.2f} pp at {100 * c.share(c.controlled.sequence):.1f}% "
                f"(scales {' '.join(f'{s:g}' for s in c.controlled.scales)})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma-separated parts of shape labels (default: all)")
    parser.add_argument("--workloads", default=None, help="comma-separated parts of workload labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebalances", type=int, default=10)
    parser.add_argument("--levers", default=",".join(SpendController().levers), help=f"of {', '.join(LEVERS)}")
    parser.add_argument("--low", type=float, default=SpendController.low)
    parser.add_argument("--high", type=float, default=SpendController.high)
    parser.add_argument("--min-scale", type=float, default=SpendController.min_scale)
    parser.add_argument("--max-scale", type=float, default=SpendController.max_scale)
    parser.add_argument("--behind-pp", type=float, default=None, help="cheaper only while this far behind")
    parser.add_argument("--down", type=float, default=SpendController.down)
    parser.add_argument("--up", type=float, default=SpendController.up)
    parser.add_argument("--reference", default="shadow", choices=("shadow", "fresh"))
    parser.add_argument("--progress", action="store_true", help="print each cell to stderr as it ends")
    args = parser.parse_args()
    ctl = replace(
        SpendController(),
        levers=tuple(args.levers.split(",")),
        low=args.low,
        high=args.high,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        behind_pp=args.behind_pp,
        down=args.down,
        up=args.up,
    )
    shapes = [s for s in MATRIX_SHAPES if not args.shapes or any(k in s.label for k in args.shapes.split(","))]
    workloads = [w for w in WORKLOADS if not args.workloads or any(k in w.label for k in args.workloads.split(","))]
    start = time.perf_counter()
    cells = []
    for shape, workload in matrix_cells(shapes, workloads):
        cells.append(
            controlled_cell(shape, workload, ctl, rebalances=args.rebalances, seed=args.seed, reference=args.reference)
        )
        if args.progress:
            c = cells[-1]
            print(f"{shape.label} | {workload.label}: {c.pp(c.controlled.sequence):+.2f} pp", file=sys.stderr)
    print(f"seed {args.seed}; {ctl}; reference {args.reference}; {time.perf_counter() - start:.0f} s")
    print(summary(cells))


if __name__ == "__main__":
    main()
