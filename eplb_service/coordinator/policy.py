"""Placement policies behind one entry point: :func:`plan_rebalance`.

A policy proposes a new ``phy2log [L, P]`` for the load; this module turns the proposal into a
:class:`RebalancePlan` the same way for every policy:

- layers whose balancedness gain (under the new load) is not positive (above the float
  rounding of :data:`MEASURABLE_GAIN`), or is below ``min_layer_gain``, keep their current row,
  unless that row spreads a group over nodes under the policy's hierarchy (``forced_layers``);
  so ``"deepseek"``'s plan is DeepSeek's placement only in the layers it changes;
- the remaining layers are ordered by gain per byte and cut, in that order, into batches whose
  staging need fits ``staging_budget_bytes`` on every rank.

Byte accounting (per slot whose logical expert changes):

- **staging**: every changed slot needs one staging row of ``bytes_per_expert`` on its rank,
  even when its source is a local replica (the copy cannot overwrite a live row before the
  commit). A batch fits when ``changed_slots_on_rank * bytes_per_expert <= budget`` on every
  rank.
- **bytes_moved**: ``bytes_per_expert`` when the slot's new expert has no replica on the same
  rank in the current placement (its bytes cross ranks), **0** when the rank already holds one
  (a device-local copy, no link traffic). ``experts_moved`` counts every changed slot.

The caller may pass the load's ``persistence`` (:mod:`.load_forecast`: how much of the
imbalance lasted from the previous window to this one; the coordinator measures it on its load
window). ``"migration"`` then plans for the forecast next window and prices moves by it.

Policies (``POLICIES``): ``"migration"`` (default, :mod:`.policy_migration`; layers of ranks of 2
slots without redundant ones, given the law of surges the coordinator reads from its windows,
planned a few windows ahead by :mod:`.policy_lookahead`, for surges where the load lasts and for
the hottest expert's hops where it fades; other layers small enough to weigh every
layout, with redundant slots or a load whose imbalance mostly fades, planned exactly by
:mod:`.policy_exact`; held to
DeepSeek's node hierarchy by :mod:`.policy_hierarchy` under ``num_groups``/``num_nodes``) and
``"deepseek"`` (parity with DeepSeek's / vLLM's algorithm, :mod:`.policy_deepseek`; its
proposal is then permuted within each rank so experts already on a rank keep their slot, as
vLLM does, which changes no load figure). Other rebalancers register themselves under a name
(:func:`register_policy`): benchmarks drive the coordinator with synthetic plans that way,
through the same entry point, and a deployment can run its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from eplb_service.coordinator.load_forecast import forecast_load, planning_persistence
from eplb_service.coordinator.policy_deepseek import deepseek_phy2log
from eplb_service.coordinator.policy_exact import small_layer_phy2log
from eplb_service.coordinator.policy_hierarchy import (
    check_divisors,
    hierarchical_migration_phy2log,
    node_purity,
    uses_hierarchy,
)
from eplb_service.coordinator.policy_lookahead import lookahead_phy2log
from eplb_service.coordinator.policy_migration import migration_phy2log
from eplb_service.coordinator.spend_control import price_factor_problem, room_slots, scales_problem, spend_options
from eplb_service.coordinator.surge_model import SurgeModel
from eplb_service.placement import (
    PlacementError,
    PlacementShape,
    PolicySettingsError,
    keep_slots_within_ranks,
    layer_balancedness,
    local_source_slots,
    model_balancedness,
    rank_loads,
    validate_phy2log,
)
from eplb_service.trace import as_float_loads, real_dtype

POLICIES = ("migration", "deepseek")
DEFAULT_POLICY = "migration"
PROGRESS_BLOCK_SLOTS = 2**18
"""The built-in policies run on blocks of layers of about this many slots in all (128 layers of
2048 slots), and a ``progress`` callback hears after each: both treat every layer on its own, so
the blocks give the same placement as one call over all layers. Blocks are also somewhat faster,
the swap search's per-round gathers staying within a block's arrays: 1000 layers x 2048 slots,
migration policy, on a shared 2-core box, 256 ranks and log-normal sigma 2 took 13.9-22.3 s in one
call, 12.3-15.8 s in blocks; 2048 ranks 0.43-0.46 s, 0.29-0.31 s."""

INT64_MAX = 2**63 - 1
"""Byte counts are int64: ``bytes_per_expert`` times every slot of the model must fit (a larger
value wrapped around to negative ``bytes_moved`` without a word)."""
MEASURABLE_GAIN = 1e-9
"""A layer's balancedness gain counts only above this. Balancedness is a ratio of float sums,
so a layer holding the same experts on every rank (balanced under any load) scores 1.0 in one
packing and 1.0000000000000002 in another: rounding alone is a "gain" of ~1e-16, and plans moved
slots for it. A real gain is many orders of magnitude larger (one token in 1e8 is 1e-8)."""

LayerProgress = Callable[[int, int], None]
"""``progress(layers_done, num_layers)``, called as the policy advances through the layers."""


class Rebalancer(Protocol):
    """What :func:`plan_rebalance` runs for a registered policy (the same arguments, no name)."""

    def __call__(
        self, current_phy2log: np.ndarray, logical_load: np.ndarray, shape: PlacementShape, **options: Any
    ) -> "RebalancePlan": ...


_REGISTERED: dict[str, Rebalancer] = {}


def register_policy(name: str, rebalancer: Rebalancer) -> None:
    """Make ``name`` a policy :func:`plan_rebalance` (and the coordinator's ``policy`` setting) accepts."""
    if name in POLICIES:
        raise ValueError(f"policy name {name!r} is taken by a built-in policy ({', '.join(POLICIES)})")
    _REGISTERED[name] = rebalancer


def unregister_policy(name: str) -> None:
    _REGISTERED.pop(name, None)


def policy_names() -> tuple[str, ...]:
    """Every policy name accepted now: the built-ins, then the registered ones."""
    return POLICIES + tuple(sorted(_REGISTERED))


@dataclass(frozen=True)
class LayerBatch:
    """Layers whose new rows are staged and committed together.

    Attributes:
        layers: layer indices, ascending.
        phy2log: ``[len(layers), P]`` int64, the new rows of those layers, in ``layers`` order.
        bytes_moved: bytes that cross ranks for this batch (see the module docstring).
        gain: sum over its layers of the per-layer balancedness gain (after - before, under
            the load the plan was made for).
    """

    layers: tuple[int, ...]
    phy2log: np.ndarray
    bytes_moved: int
    gain: float


@dataclass(frozen=True)
class RebalancePlan:
    """A proposed rebalance.

    Attributes:
        target_phy2log: ``[L, P]`` int64, the full placement once every batch is applied
            (skipped layers keep their current rows).
        batches: in commit order (best gain per byte first); each fits the staging budget on
            every rank. Empty when nothing is worth moving.
        balancedness_before: model balancedness of the current placement under the load.
        balancedness_after: the same for ``target_phy2log``.
        experts_moved: slots whose logical expert changes.
        bytes_moved: sum of the batches' ``bytes_moved``.
        over_budget_layers: layers left at their current rows because alone they need more
            staging on some rank than the budget (only with ``skip_over_budget``), ascending.
        over_budget_need_bytes: the most staging bytes one of those layers needs on one rank
            (0 when there are none): the budget that would let every one of them move.
        forced_layers: layers in the batches whatever their gain, because their current row
            broke the policy's node hierarchy (``--groups``/``--nodes``): a group's
            replicas on several nodes, as in vLLM's initial layout; ascending. A plan with any
            is worth starting even below the coordinator's ``min_gain``.
    """

    target_phy2log: np.ndarray
    batches: tuple[LayerBatch, ...]
    balancedness_before: float
    balancedness_after: float
    experts_moved: int
    bytes_moved: int
    over_budget_layers: tuple[int, ...] = ()
    over_budget_need_bytes: int = 0
    forced_layers: tuple[int, ...] = ()


def validate_load(logical_load: np.ndarray, shape: PlacementShape) -> np.ndarray:
    """Return ``logical_load`` as ``[L, N_log]`` float64, or raise naming the bad value.

    Only integers and floats are loads: a cast to float64 would drop a complex load's imaginary
    part (a numpy warning, then a plan), read ``True`` as 1, and fail on a Python integer beyond
    float64 (an ``OverflowError`` naming nothing)."""
    expected = (shape.num_layers, shape.num_logical)
    try:
        arr = np.asarray(logical_load)
    except ValueError:
        raise PlacementError(
            f"logical_load is not a 2-D array of numbers (rows of unequal length?), expected shape {expected} "
            "[layers, logical experts]"
        ) from None
    if arr.shape != expected:
        raise PlacementError(f"logical_load has shape {arr.shape}, expected {expected} [layers, logical experts]")
    if not real_dtype(arr):
        raise PlacementError(f"logical_load has dtype {arr.dtype}, expected real numbers (integers or floats)")
    load, bad = as_float_loads(arr)  # a long double beyond float64 becomes inf, named here
    if bad is not None:
        layer, expert = bad
        raise PlacementError(
            f"logical_load[{layer}, {expert}] = {float(load[layer, expert])}: loads must be finite and >= 0"
        )
    overflow = load_total_overflow(load)
    if overflow is not None:
        raise PlacementError(f"logical_load {overflow}")
    return load


def load_total_overflow(load: np.ndarray) -> str | None:
    """Why finite, non-negative ``load`` cannot be planned for, or None: its total must be a
    finite float64. Each rank's load, each layer's and the model's balancedness are sums of
    loads; entries near 1e308 summed to inf, and every balancedness figure came out NaN."""
    with np.errstate(over="ignore"):
        total = float(load.sum())
    if np.isfinite(total):
        return None
    layer, expert = (int(i) for i in np.unravel_index(int(load.argmax()), load.shape))
    return (
        f"sums to {total} (its largest entry is [{layer}, {expert}] = {float(load[layer, expert])}): "
        "expected loads whose total is a finite float64 (below about 1.8e308)"
    )


def check_groups_and_nodes(shape: PlacementShape, num_groups: int, num_nodes: int) -> None:
    """Raise :class:`PolicySettingsError` naming the value unless ``num_groups`` is a positive
    divisor of the logical experts and ``num_nodes`` one of the ranks.

    Both policies check both, whether or not they keep a hierarchy with them (``num_groups`` not
    a multiple of ``num_nodes``, or one node): the counts describe the model's routing groups and
    the deployment's nodes, and a count that divides neither is a wrong description, as a policy
    that kept the hierarchy would find. The migration policy used to ignore such a count where it
    kept no hierarchy, while the deepseek policy refused it."""
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PolicySettingsError(f"{name} must be a positive integer, got {value!r}")
    check_divisors(shape.num_logical, shape.num_ranks, num_groups, num_nodes)


def propose_phy2log(
    policy: str,
    current_phy2log: np.ndarray,
    load: np.ndarray,
    shape: PlacementShape,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    persistence: float = 1.0,
    spend_scale: float = 1.0,
    price_scale: float = 1.0,
    exact_price_scale: float = 1.0,
    fresh: bool = False,
    surges: SurgeModel | None = None,
) -> np.ndarray:
    """The policy's raw proposal ``[L, P]`` (no gain filter, no batching); inputs validated.

    ``persistence``, ``spend_scale``, ``price_scale``, ``exact_price_scale``, ``fresh``, ``surges``
    (``"migration"`` only): see :func:`plan_rebalance`;
    ``load`` is then the forecast already."""
    check_groups_and_nodes(shape, num_groups, num_nodes)
    if policy == "migration" and not uses_hierarchy(num_groups, num_nodes):
        # Small layers: without redundant slots on 2-slot ranks, a roomy first plan, then planned
        # ahead under the surge law (surges where the load lasts, hops where it fades); else (with
        # redundant slots, or a fading load whose hottest expert does not hop) every layout, or
        # every two-slot change, weighed.
        small = lookahead_phy2log(
            current_phy2log,
            load,
            shape.num_ranks,
            surges,
            spend_scale=spend_scale,
            persistence=persistence,
            fresh=fresh,
            price_scale=price_scale,
        )
        if small is None:
            small = small_layer_phy2log(
                current_phy2log,
                load,
                shape.num_ranks,
                spend_scale=spend_scale,
                fresh=fresh,
                persistence=persistence,
                price_scale=exact_price_scale,
            )
        if small is not None:
            return small
    if policy == "deepseek" or (policy == "migration" and fresh):
        packed = deepseek_phy2log(load, shape.num_physical, num_groups, num_nodes, shape.num_ranks)
        return keep_slots_within_ranks(packed, current_phy2log, shape.num_ranks)
    if policy == "migration":
        spend = spend_options(spend_scale, room_slots(shape.num_physical, num_groups, num_nodes), price_scale)
        if uses_hierarchy(num_groups, num_nodes):
            return hierarchical_migration_phy2log(
                current_phy2log,
                load,
                shape.num_ranks,
                num_groups,
                num_nodes,
                persistence=persistence,
                move_price=spend.move_price,
                fine_move_share=spend.fine_move_share,
                price_floor=spend.price_floor,
            )
        return migration_phy2log(
            current_phy2log,
            load,
            shape.num_ranks,
            persistence=persistence,
            move_price=spend.move_price,
            fine_move_share=spend.fine_move_share,
            price_floor=spend.price_floor,
        )
    raise ValueError(f"unknown policy {policy!r}; choices: {', '.join(POLICIES)}")


def plan_rebalance(
    policy: str,
    current_phy2log: np.ndarray,
    logical_load: np.ndarray,
    shape: PlacementShape,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    bytes_per_expert: int = 1,
    staging_budget_bytes: int | None = None,
    min_layer_gain: float = 0.0,
    persistence: float = 1.0,
    spend_scale: float = 1.0,
    price_scale: float = 1.0,
    exact_price_scale: float = 1.0,
    fresh: bool = False,
    surges: SurgeModel | None = None,
    progress: LayerProgress | None = None,
    skip_over_budget: bool = False,
) -> RebalancePlan:
    """Plan a rebalance of ``current_phy2log`` for ``logical_load`` with ``policy``.

    Args:
        policy: one of :data:`POLICIES`.
        current_phy2log: ``[L, P]`` int current placement.
        logical_load: ``[L, N_log]`` load per logical expert, finite and >= 0, with a finite total.
        shape: the deployment's placement shape.
        num_groups, num_nodes: expert groups and server nodes. Both built-in policies keep
            DeepSeek's hierarchy (each group's replicas on one node) when ``num_nodes > 1`` and
            ``num_groups % num_nodes == 0``; otherwise both place experts on any node (DeepSeek's
            global policy; the coordinator warns at start). Under the hierarchy both make a
            layer whose current row spreads a group over nodes node-pure whatever its gain
            (``RebalancePlan.forced_layers``). Either way ``num_groups`` must divide the logical
            experts and ``num_nodes`` the ranks (:func:`check_groups_and_nodes`).
        bytes_per_expert: bytes of one expert's weights on one rank (> 0).
        staging_budget_bytes: staging bytes per rank per batch; ``None`` = unbounded.
        min_layer_gain: layers whose balancedness gain is below this keep their rows.
        persistence: how much of the load's imbalance lasts into the next window, in
            ``[0, 1]`` (:func:`~eplb_service.coordinator.load_forecast.persistence` of the last
            two windows; 1 = plan for ``logical_load`` as it is). ``"migration"`` prices each
            moved slot by it and, where most of the imbalance fades (below 0.6), plans for the
            forecast :func:`~eplb_service.coordinator.load_forecast.forecast_load` with the
            share :func:`~eplb_service.coordinator.load_forecast.planning_persistence` keeps;
            the plan's gains and balancedness are then under that forecast. ``"deepseek"``
            ignores it (it is DeepSeek's policy: the last window only), and so do registered
            policies. Layers :mod:`.policy_exact` plans take the forecast but price a slot
            without it.
        spend_scale: in ``(0, MAX_SCALE]``, how much cheaper (below 1) or dearer (above 1)
            ``"migration"`` makes moves than its defaults (below 1 step 6's price times it;
            step 4's room divided by it; see :mod:`.spend_control`, whose state the coordinator
            keeps between plans); 1 = the defaults. Layers :mod:`.policy_exact` plans take it
            only below 1, on their own price. Other policies ignore it.
        price_scale: in ``[1, MAX_PRICE_SCALE]``, a further factor on ``"migration"``'s step-6
            price (:attr:`.spend_control.SpendState.price_scale`: the coordinator raises it while
            its placements lead DeepSeek's balance close to the slot budget); 1 = none. Layers
            :mod:`.policy_exact` plans ignore it, and so do other policies.
        exact_price_scale: in ``[1, MAX_PRICE_SCALE]``, the factor on the price per slot of
            layers with redundant slots that :mod:`.policy_exact` plans
            (:func:`.spend_control.exact_price_scale`: ``price_scale`` only while the deployment
            is clearly ahead of DeepSeek's balance); 1 = none. Other layers and policies ignore it.
        fresh: ``current_phy2log`` is the placement the deployment started with (no plan
            committed since: vLLM's own layout, which no plan chose). ``"migration"`` then lays
            DeepSeek's packing, as ``"deepseek"`` does, instead of repairing that layout: every
            later plan repairs what this one leaves, and a packing is a better base than a
            repaired arbitrary layout (see the module docstring of :mod:`.policy_migration`).
            The packing is of the load the migration policy plans for (the forecast where most
            of the imbalance fades, see ``persistence``). A layer whose packing would stage more
            than ``staging_budget_bytes`` on some rank is repaired instead. Layers whose every
            layout :mod:`.policy_exact` weighs take their best layout instead of the packing.
            Other policies ignore it.
        surges: the law of surges read from the load windows so far
            (:class:`.surge_model.SurgeModel`, which the coordinator keeps), or None.
            ``"migration"`` then plans small layers without redundant slots whose load lasts a
            few rebalances ahead (:mod:`.policy_lookahead`). Other policies ignore it.
        progress: called with ``(layers_done, num_layers)`` after each block of layers the
            built-in policies finish (:data:`PROGRESS_BLOCK_SLOTS`); registered policies do not
            call it.
        skip_over_budget: see :func:`build_plan` (registered policies do not get it).

    Raises:
        ValueError: unknown policy, or (without ``skip_over_budget``) a layer that alone needs
            more staging than the budget.
        PlacementError (a ValueError): invalid placement, load, or sizes; names the value.
        PolicySettingsError (a PlacementError): ``num_groups`` or ``num_nodes`` that do not fit
            the shape (the coordinator halts once on it: every plan would fail alike).
    """
    registered = _REGISTERED.get(policy)
    if registered is not None:
        return registered(
            current_phy2log,
            logical_load,
            shape,
            num_groups=num_groups,
            num_nodes=num_nodes,
            bytes_per_expert=bytes_per_expert,
            staging_budget_bytes=staging_budget_bytes,
            min_layer_gain=min_layer_gain,
        )
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choices: {', '.join(policy_names())}")
    if not isinstance(bytes_per_expert, (int, np.integer)) or bytes_per_expert <= 0:
        raise PlacementError(f"bytes_per_expert must be a positive integer, got {bytes_per_expert!r}")
    model_slots = max(1, shape.num_layers * shape.num_physical)
    if int(bytes_per_expert) * model_slots > INT64_MAX:
        raise PlacementError(
            f"bytes_per_expert={bytes_per_expert} is too large: {shape.num_layers} layers x {shape.num_physical} "
            f"slots of it would overflow the plan's int64 byte counts (at most {INT64_MAX // model_slots})"
        )
    if staging_budget_bytes is not None and (
        not isinstance(staging_budget_bytes, (int, np.integer)) or staging_budget_bytes < 0
    ):
        raise PlacementError(f"staging_budget_bytes must be None or an integer >= 0, got {staging_budget_bytes!r}")
    if (
        isinstance(min_layer_gain, bool)
        or not isinstance(min_layer_gain, (int, float, np.integer, np.floating))
        or not np.isfinite(min_layer_gain)
    ):
        raise PlacementError(f"min_layer_gain must be a finite number, got {min_layer_gain!r}")
    if not (isinstance(persistence, (int, float, np.floating)) and 0.0 <= persistence <= 1.0):
        raise PlacementError(f"persistence must be a number in [0, 1], got {persistence!r}")
    if not isinstance(fresh, (bool, np.bool_)):
        raise PlacementError(f"fresh must be True or False, got {fresh!r}")
    _check_spend_scales(spend_scale, price_scale, exact_price_scale)
    validate_phy2log(current_phy2log, shape)
    current = np.asarray(current_phy2log, dtype=np.int64)
    load = validate_load(logical_load, shape)
    if policy == "migration":
        load = forecast_load(load, planning_persistence(persistence))

    options: dict[str, Any] = {"num_groups": num_groups, "num_nodes": num_nodes, "persistence": float(persistence)}
    if policy == "migration":
        options["spend_scale"] = float(spend_scale)
        options["price_scale"] = float(price_scale)
        options["exact_price_scale"] = float(exact_price_scale)
        options["fresh"] = bool(fresh)
        if surges is not None and surges.level.shape != load.shape:
            raise PlacementError(
                f"surges: a model of {surges.level.shape[0]} layers x {surges.level.shape[1]} experts for a "
                f"load of {load.shape[0]} x {load.shape[1]}"
            )
        options["surges"] = surges
    proposed = _propose_in_blocks(policy, current, load, shape, progress, **options)
    if options.get("fresh") and staging_budget_bytes is not None:
        # A packing changes most of a layer's slots; where that is more than one batch can stage
        # on some rank, the layer is repaired instead (else it could never move at all: every
        # first plan would skip it and the next would be fresh again).
        staging = rank_staging_bytes(current, proposed, shape, bytes_per_expert)
        too_big = np.any(staging > staging_budget_bytes, axis=1)
        if too_big.any():  # each layer is planned on its own: repair only those
            layers = np.flatnonzero(too_big)
            part = PlacementShape(layers.size, shape.num_logical, shape.num_physical, shape.num_ranks)
            proposed = proposed.copy()
            surges_there = None if surges is None else surges.select(layers)
            proposed[layers] = propose_phy2log(
                policy, current[layers], load[layers], part, **{**options, "fresh": False, "surges": surges_there}
            )
    required = None
    if uses_hierarchy(num_groups, num_nodes):
        required = ~node_purity(current, shape.num_logical, num_groups, num_nodes)
    return build_plan(
        current,
        proposed,
        load,
        shape,
        bytes_per_expert=bytes_per_expert,
        staging_budget_bytes=staging_budget_bytes,
        min_layer_gain=min_layer_gain,
        skip_over_budget=skip_over_budget,
        required_layers=required,
    )


def _check_spend_scales(spend_scale: float, price_scale: float, exact_price_scale: float) -> None:
    """The spend controller's factors (:mod:`.spend_control`), each naming the bad value."""
    problem = scales_problem(spend_scale, price_scale) or price_factor_problem(exact_price_scale, "exact_price_scale")
    if problem is not None:
        raise PlacementError(problem)


def _propose_in_blocks(
    policy: str,
    current: np.ndarray,
    load: np.ndarray,
    shape: PlacementShape,
    progress: LayerProgress | None,
    **options: Any,
) -> np.ndarray:
    """:func:`propose_phy2log` over blocks of layers (one block up to :data:`PROGRESS_BLOCK_SLOTS`),
    calling ``progress`` (if any) after each block."""
    block = max(1, PROGRESS_BLOCK_SLOTS // shape.num_physical)
    rows = []
    for start in range(0, shape.num_layers, block):
        stop = min(start + block, shape.num_layers)
        part = PlacementShape(stop - start, shape.num_logical, shape.num_physical, shape.num_ranks)
        here = dict(options)
        if here.get("surges") is not None:
            here["surges"] = here["surges"].select(slice(start, stop))
        rows.append(propose_phy2log(policy, current[start:stop], load[start:stop], part, **here))
        if progress is not None:
            progress(stop, shape.num_layers)
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def rank_staging_bytes(
    current: np.ndarray, target: np.ndarray, shape: PlacementShape, bytes_per_expert: int
) -> np.ndarray:
    """``[L, R]`` bytes each rank stages to move layer by layer from ``current`` to ``target``: its
    slots whose expert changes, times ``bytes_per_expert``."""
    changed = (current != target).reshape(shape.num_layers, shape.num_ranks, shape.slots_per_rank)
    return changed.sum(axis=2) * int(bytes_per_expert)


def build_plan(
    current: np.ndarray,
    proposed: np.ndarray,
    load: np.ndarray,
    shape: PlacementShape,
    *,
    bytes_per_expert: int = 1,
    staging_budget_bytes: int | None = None,
    min_layer_gain: float = 0.0,
    require_gain: bool = True,
    skip_over_budget: bool = False,
    required_layers: np.ndarray | None = None,
) -> RebalancePlan:
    """Gain filter, byte accounting and batching of a proposal (see the module docstring).

    Args:
        current: ``[L, P]`` current placement; proposed: ``[L, P]`` valid proposal.
        load: ``[L, N_log]`` validated load.
        require_gain: ``False`` takes every changed layer whatever its gain (moving to a
            placement chosen offline, e.g. the coordinator's ``--initial-placement``).
        skip_over_budget: a layer that alone needs more staging than ``staging_budget_bytes``
            on some rank keeps its current row (listed in the plan's ``over_budget_layers``)
            instead of failing the whole plan: the coordinator plans every interval, and one
            such layer used to cost every other layer its rebalance, each time.
        required_layers: ``[L]`` bool, layers whose proposal is taken whatever its gain (their
            current row breaks the policy's node hierarchy: a group spread over nodes); the
            plan lists the changed ones in ``forced_layers``.

    Raises:
        ValueError: without ``skip_over_budget``, a layer that alone needs more staging than
            the budget (named, with its need and rank).
    """
    num_ranks = shape.num_ranks
    before_ranks = rank_loads(current, load, num_ranks)
    after_ranks = rank_loads(proposed, load, num_ranks)
    gain = layer_balancedness(after_ranks) - layer_balancedness(before_ranks)
    changed = current != proposed
    accept = changed.any(axis=1)
    required = np.zeros_like(accept) if required_layers is None else np.asarray(required_layers, dtype=bool)
    if require_gain:
        accept &= ((gain > MEASURABLE_GAIN) & (gain >= min_layer_gain)) | required
    target = np.where(accept[:, None], proposed, current)
    changed &= accept[:, None]
    staging = rank_staging_bytes(current, target, shape, bytes_per_expert)

    over_budget = np.zeros(0, dtype=np.int64)
    if staging_budget_bytes is not None and accept.any():
        over = accept[:, None] & (staging > staging_budget_bytes)
        if over.any() and not skip_over_budget:
            layer, rank = (int(i) for i in np.argwhere(over)[0])
            raise ValueError(
                f"layer {layer} alone needs {int(staging[layer, rank])} staging bytes on rank {rank}, "
                f"more than staging_budget_bytes={staging_budget_bytes}"
            )
        over_budget = np.flatnonzero(over.any(axis=1))
        accept[over_budget] = False
        target[over_budget] = current[over_budget]
        changed[over_budget] = False
    layers = np.flatnonzero(accept)
    remote = changed & ~local_source_slots(current, target, num_ranks)
    layer_bytes = remote.sum(axis=1).astype(np.int64) * int(bytes_per_expert)
    # Gain per byte, best first; a layer with only local copies costs no link bytes.
    ratio = gain[layers] / np.maximum(layer_bytes[layers], 1e-9 * bytes_per_expert)
    layers = layers[np.lexsort((layers, -gain[layers], -ratio))]

    groups: list[list[int]] = []
    used = np.zeros(num_ranks, dtype=np.int64)
    for layer in layers.tolist():
        need = staging[layer]
        if groups and (staging_budget_bytes is None or bool(np.all(used + need <= staging_budget_bytes))):
            groups[-1].append(layer)
            used += need
        else:
            groups.append([layer])
            used = need.copy()
    batches = []
    for group in groups:
        rows = np.array(sorted(group), dtype=np.int64)
        batches.append(
            LayerBatch(
                layers=tuple(int(i) for i in rows),
                phy2log=target[rows].copy(),
                bytes_moved=int(layer_bytes[rows].sum()),
                gain=float(gain[rows].sum()),
            )
        )
    batches.sort(key=lambda b: -b.gain / max(b.bytes_moved, 1e-9 * bytes_per_expert))

    return RebalancePlan(
        target_phy2log=target,
        batches=tuple(batches),
        balancedness_before=model_balancedness(before_ranks),
        balancedness_after=model_balancedness(rank_loads(target, load, num_ranks)),
        experts_moved=int(changed.sum()),
        bytes_moved=int(layer_bytes.sum()),
        over_budget_layers=tuple(int(i) for i in over_budget),
        over_budget_need_bytes=int(staging[over_budget].max(initial=0)),
        forced_layers=tuple(int(i) for i in np.flatnonzero(accept & required)),
    )
