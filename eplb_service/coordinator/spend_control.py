"""Online spend control: the migration policy finds each deployment's move price from what it spends.

Why: the migration policy's fixed settings suit most workloads, but where it spends far below
the slot budget (a fifth of what DeepSeek's policy would move) it often gives up balance it
could have bought: hot experts that hop between experts every window price every move out of
2-slot ranks (step 6 of :mod:`.policy_migration`), and slowly drifting coarse layers need
more room than step 4's fine pass gets. Which price fits depends on the workload, and a
coordinator can measure it as it runs: besides each plan it plans DeepSeek's policy from a
*shadow* placement (DeepSeek's own previous plan, never applied; a few ms), so it knows how many
slots DeepSeek would have moved, and it tallies both.

The rule (:func:`update_spend`, pure): after each rebalance, where the policy's tally is below
:data:`SPEND_LOW` of DeepSeek's, moves get cheaper (``scale`` halves); above
:data:`SPEND_HIGH`, back toward the defaults (``scale`` doubles, up to 1); above
:data:`SPEND_CAP`, close under the budget of a fifth, dearer than the defaults (``scale``
doubles, up to :data:`MAX_SCALE`). ``scale`` stays within ``[MIN_SCALE, MAX_SCALE]``. The
tallies fade by :data:`SPEND_MEMORY` per rebalance, so a long-running coordinator follows a
workload that changes. Below 1, ``scale`` multiplies step 6's ``move_price`` and divides step
4's ``fine_move_share`` (:func:`spend_options`); in layers too large for step 4 at the defaults
(more than 384 slots), a room above the default turns it on there, and so it does in layers too
small for it, of :data:`ROOM_MIN_SLOTS` to 24 slots (:func:`room_follows_scale`). Above 1 it
only narrows step 4's room: the fine pass is what a layer spends where nothing forced a move,
while step 6's price also holds back the answer to a lasting new hot expert.

**The balance lead.** The slots are one of issue 16's targets; the other is next-window balance
within half a point of DeepSeek's. The coordinator measures that one too: at each tally, the load
the plan was made for on the placement that served it and on the shadow (both planned before the
newest of that load arrived; :func:`balance_lead`), faded by :data:`LEAD_MEMORY`. Where the tally
is over :data:`SPEND_CAP` while the faded lead is above 0, step 6's price doubles for the next plan
(``price_scale``, up to :data:`MAX_PRICE_SCALE`, in layers of every size but those
:mod:`.policy_exact` plans, which take a ``scale`` below 1 and, with redundant slots, the price
only while the faded lead is over :data:`EXACT_LEAD_MIN`: :func:`exact_price_scale`); it holds while the tally is
between :data:`SPEND_LOW` and the cap, and halves back toward 1 once the tally is below
:data:`SPEND_LOW` or the lead below :data:`LEAD_GIVEN_BACK`. A deployment ahead of DeepSeek's
balance then spends that lead instead of more slots, and gives it back as soon as it is behind.
``scale`` cannot do this in small layers: above 1 it only narrows step 4's room, which layers under
25 slots do not have, and a dearer price there for every deployment over the cap delays the
answers to a lasting hot expert in cells that are behind DeepSeek. The price holds down to
:data:`SPEND_LOW` instead of halving as soon as the tally is under the cap: since the tally
forgets old slots, a price that fell at once swung from plan to plan while the slots over the
whole run went past a fifth. While ``price_scale`` is above 1, step 6's ``(1 - persistence) ** 2``
also counts as at least :data:`LEAD_PRICE_FLOOR` (as it always does in layers under 25 slots):
where the load lasts (persistence about 0.9) the square is 0.01, and a price eight times the
default still bought nothing. Under a slowly drifting load (:data:`LASTING_PERSISTENCE`) in
layers where ``scale`` has no room to narrow (under 25 slots), the price also doubles over the
cap while the lead is merely above :data:`LEAD_GIVEN_BACK`: there nothing else holds back a plan
that chases each window's drift, which DeepSeek's packing mostly absorbs. Not in larger layers,
where a dearer ``scale`` already narrows step 4's room, and where a swap or a new hot expert among
hundreds of experts leaves the persistence as high as slow drift does.

**The brake on fading loads.** In layers planned ahead (:func:`brakes_fading_loads`: ranks of 2
slots without redundant ones) whose load mostly fades (``persistence`` below
:data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM`: the hottest expert hops to
another one from window to window), the price also doubles over the cap *whatever the lead*.
There :mod:`.policy_lookahead` plans the hops at a low price, and where a deployment cannot buy
DeepSeek's balance at any price it would go on spending while behind, where no other rule reins
it in (``scale`` stops at 1 in such layers, and the lead's rule needs a lead). Not in other small
layers: there the swap search's step 6 takes the same factor, and the brake cost balance far
beyond the half point.

**The brake while level.** In deployments without DeepSeek's hierarchy whose layers are not planned
ahead (:func:`brakes_while_level`), the price also doubles over the cap while the faded lead is
merely above :data:`LEAD_GIVEN_BACK` (within 0.2 points of DeepSeek's balance), whatever the
persistence, as the rule for slowly drifting small layers above does in every deployment: the target
allows half a point, and a deployment that close to DeepSeek's balance and over the slot cap should
spend that margin rather than more slots. It does not turn a deployment that is further behind away
from buying balance: below the line the price comes down as before. Not under the hierarchy, where
whole groups move between nodes and one seed's balance fell below the half point at the same slots
in cells that met both targets; not in layers planned ahead, which have the brake above and whose
answers to a new hot expert the lead's price already delays.

A plan counts every slot it would move (all its batches) when it is decided; the controller does
not wait for outcomes. So a plan that aborts later (its staging may have streamed some of those
bytes already), or whose later batches are dropped, counts in full: aborts are rare, and an
over-count only leans toward dearer moves. A plan skipped for too small a gain counts nothing.

What each rule bought on the workload matrix (``bench/planner.py --matrix``,
``bench/spend_controller.py``), and what was tried and not taken, is in ``bench/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from eplb_service.coordinator.load_forecast import PLAN_AS_IS_FROM
from eplb_service.coordinator.policy_hierarchy import uses_hierarchy
from eplb_service.coordinator.policy_lookahead import plans_ahead
from eplb_service.coordinator.policy_migration import (
    DEFAULT_FINE_MOVE_SHARE,
    DEFAULT_MOVE_PRICE,
    SMALL_LAYER_PRICE_FLOOR,
    fine_pass_fits,
)
from eplb_service.placement import model_balancedness, rank_loads

SPEND_LOW = 0.12
"""Below this share of DeepSeek's slots (the tallies), moves get cheaper."""
SPEND_HIGH = 0.16
"""Above this share, moves get dearer again (up to the policy's defaults): margin under a fifth."""
SPEND_CAP = 0.185
"""Above this share, moves get dearer than the defaults (``scale`` above 1): just under a fifth."""
SPEND_STEP = 2.0
"""``scale`` is divided (below the band) or multiplied (above it) by this after each rebalance."""
MIN_SCALE = 1 / 16
"""The cheapest moves get: ``move_price / 16``."""
MAX_SCALE = 4.0
"""The dearest moves get: step 4's room a quarter of its default."""
SPEND_MEMORY = 0.9
"""Both tallies are multiplied by this before each rebalance's slots are added (about the last
ten rebalances count)."""
MAX_FINE_MOVE_SHARE = 0.24
"""Step 4's room grows to at most this share of a layer's slots (3x its default)."""
LEAD_MEMORY = 0.7
"""The balance lead is multiplied by this before each rebalance's sample is weighed in (the
sample counts ``1 - LEAD_MEMORY``: about the last three rebalances count)."""
MAX_PRICE_SCALE = 8.0
"""Step 6's price rises to at most this many times its scaled value while the balance leads."""
LEAD_GIVEN_BACK = -0.002
"""A lead below this (0.2 points of balancedness behind DeepSeek's) takes the price back down."""
LASTING_PERSISTENCE = 0.95
"""A load at least this persistent from window to window is drifting slowly, in small layers: on
the matrix's workloads (seed 0) in layers under 25 slots, slow drift measures 0.95-1.0, hot
experts hopping (*swap*) or appearing (*abrupt*) a median 0.32 and 0.79, never 0.95. Among the
256-512 experts of DeepSeek-V3 and Qwen3.5 the same changes measure 0.90-0.99 and 0.78-0.98,
which is why the rule is kept to small layers (:func:`update_spend`)."""
LEAD_PRICE_FLOOR = SMALL_LAYER_PRICE_FLOOR
"""While the balance leads (``price_scale`` above 1), step 6's ``(1 - persistence) ** 2`` counts
as at least this, as in layers too small for step 4: where the load lasts the square is near 0
and a price times 8 was still nothing (:func:`spend_options`)."""
EXACT_LEAD_MIN = 0.005
"""The faded balance lead (half a point of balancedness) above which layers with redundant slots
that :mod:`.policy_exact` plans take ``price_scale`` too (:func:`exact_price_scale`). Small layers
off the matrix (``bench/planner.py --matrix --spare-layers``) stayed 1-3 points ahead of
DeepSeek's balance at 20-38% of its slots with the price unchanged there; taken at any lead, the
price cost a Mixtral 8+2 cell that is level with DeepSeek and answers a new hot expert late
(-0.50 -> -0.98 pp, seeds 0-2 pooled), where from half a point on it changes nothing."""
ROOM_MIN_SLOTS = 16
"""The smallest layer (or node's share of one) whose step-4 room a ``scale`` below 1 widens where
the default room holds no exchange: there one exchange is at most an eighth of its slots."""


@dataclass(frozen=True)
class SpendState:
    """The controller between rebalances.

    Attributes:
        spent: slots the policy's plans moved (faded tally); reference: slots DeepSeek's plans
            from the shadow placement moved (same fading).
        scale: the spending factor for the next plan, in ``[MIN_SCALE, MAX_SCALE]`` (1: the
            defaults; below 1 cheaper moves, above 1 dearer).
        lead: how much better the placement served did than DeepSeek's shadow, in balancedness
            of the same load windows (faded by :data:`LEAD_MEMORY`; 0.01 is one point ahead).
        price_scale: step 6's price factor for the next plan, in ``[1, MAX_PRICE_SCALE]``, above 1
            only while the tally is close under the budget and the balance leads (or, in layers
            planned ahead, the load fades: the brake on fading loads, module docstring).
    """

    spent: float = 0.0
    reference: float = 0.0
    scale: float = 1.0
    lead: float = 0.0
    price_scale: float = 1.0


def update_spend(
    state: SpendState,
    spent: int,
    reference: int,
    *,
    max_scale: float = MAX_SCALE,
    lead: float | None = None,
    persistence: float | None = None,
    fading_brake: bool = False,
    level_brake: bool = False,
) -> SpendState:
    """The state after a rebalance where the policy moved ``spent`` slots and DeepSeek ``reference``.

    With no DeepSeek slots tallied yet there is nothing to compare, and ``scale`` stays.
    ``max_scale``: :func:`scale_ceiling` of the slots step 4's room is a share of
    (:func:`room_slots`): 1 where a dearer scale would change nothing, 2 or 4 where it narrows
    the room, so it never has to come back down from where it changed nothing before moves get
    cheaper.

    ``lead``: the balancedness of the placement served minus the shadow's, on the load window this
    plan was made for (None: not measured, and the lead and ``price_scale`` stay). Over
    :data:`SPEND_CAP` of DeepSeek's slots with the faded lead above 0, step 6's price doubles
    (up to :data:`MAX_PRICE_SCALE`): the deployment is ahead of DeepSeek's balance and close to
    the slot budget, so it spends the lead rather than more slots. It holds while the tally is
    between :data:`SPEND_LOW` and the cap, and halves back toward 1 below :data:`SPEND_LOW` or
    with the lead below :data:`LEAD_GIVEN_BACK`.

    ``persistence``: the load's persistence the tallied plan was made with (None: not known).
    Where it is at least :data:`LASTING_PERSISTENCE` (slow drift) and ``max_scale`` is 1 (layers
    under 25 slots, where a dearer ``scale`` has no room to narrow), the price also doubles over
    the cap while the lead is merely above :data:`LEAD_GIVEN_BACK`: each plan there chases a
    drift that DeepSeek's packing mostly absorbs, and the half point of balance the target
    allows is worth more than those slots. With ``fading_brake`` (:func:`brakes_fading_loads` of
    the deployment) and the persistence below
    :data:`~eplb_service.coordinator.load_forecast.PLAN_AS_IS_FROM` (the load fades), the price
    doubles over the cap whatever the lead (the brake on fading loads, module docstring). With
    ``level_brake`` (:func:`brakes_while_level` of the deployment) the price doubles over the cap
    while the lead is merely above :data:`LEAD_GIVEN_BACK`, whatever the persistence (the brake
    while level, module docstring).
    """
    if spent < 0 or reference < 0:
        raise ValueError(f"slot counts must be >= 0, got spent={spent}, reference={reference}")
    if isinstance(max_scale, bool) or not 1.0 <= max_scale <= MAX_SCALE:
        raise ValueError(f"max_scale must be in [1, {MAX_SCALE:g}], got {max_scale!r}")
    if lead is not None and not (_is_number(lead) and math.isfinite(lead) and -1.0 <= lead <= 1.0):
        raise ValueError(f"lead must be None or a balancedness difference in [-1, 1], got {lead!r}")
    if persistence is not None and not (_is_number(persistence) and 0.0 <= persistence <= 1.0):
        raise ValueError(f"persistence must be None or a number in [0, 1], got {persistence!r}")
    tally = state.spent * SPEND_MEMORY + spent
    ref = state.reference * SPEND_MEMORY + reference
    scale = state.scale
    if ref > 0:
        if tally < SPEND_LOW * ref:
            scale /= SPEND_STEP
        elif tally > SPEND_CAP * ref:
            scale *= SPEND_STEP
        elif tally > SPEND_HIGH * ref:
            # Back toward the defaults, not past them; a scale already above 1 holds.
            scale = min(scale * SPEND_STEP, max(scale, 1.0))
    faded_lead, price = state.lead, state.price_scale
    if lead is not None:
        faded_lead = LEAD_MEMORY * faded_lead + (1.0 - LEAD_MEMORY) * lead
        over = ref > 0 and tally > SPEND_CAP * ref
        held = ref > 0 and tally >= SPEND_LOW * ref
        lasting = persistence is not None and persistence >= LASTING_PERSISTENCE and max_scale == 1.0
        fading = fading_brake and persistence is not None and persistence < PLAN_AS_IS_FROM
        level = (lasting or level_brake) and faded_lead > LEAD_GIVEN_BACK
        if over and (faded_lead > 0.0 or level or fading):
            price = min(price * SPEND_STEP, MAX_PRICE_SCALE)
        elif not held or faded_lead < LEAD_GIVEN_BACK:
            price = max(price / SPEND_STEP, 1.0)
    return SpendState(tally, ref, min(max(scale, MIN_SCALE), max_scale), faded_lead, price)


def brakes_fading_loads(num_logical: int, num_physical: int, num_ranks: int, num_groups: int, num_nodes: int) -> bool:
    """Whether :func:`update_spend` takes ``fading_brake`` for this deployment: its layers are
    planned ahead (:func:`.policy_lookahead.plans_ahead`, without DeepSeek's hierarchy), where a
    hopping load is planned at a price too low to hold the slots back by itself. Not in other small
    layers: there the same brake on step 6's price cost sixteen-expert models (Phi-3.5-MoE, DBRX)
    up to 2.7 points of balance in their swap cells (``bench/README.md``, thirteenth section)."""
    return not uses_hierarchy(num_groups, num_nodes) and plans_ahead(num_logical, num_physical, num_ranks)


def brakes_while_level(num_logical: int, num_physical: int, num_ranks: int, num_groups: int, num_nodes: int) -> bool:
    """Whether :func:`update_spend` takes ``level_brake`` for this deployment: it keeps no DeepSeek
    hierarchy and its layers are not planned ahead (the brake while level, module docstring)."""
    return not uses_hierarchy(num_groups, num_nodes) and not plans_ahead(num_logical, num_physical, num_ranks)


class ShapeTerms(TypedDict):
    """The keyword arguments of :func:`update_spend` that the deployment's shape fixes."""

    max_scale: float
    fading_brake: bool
    level_brake: bool


def shape_terms(num_logical: int, num_physical: int, num_ranks: int, num_groups: int, num_nodes: int) -> ShapeTerms:
    """:func:`update_spend`'s ``max_scale`` (:func:`scale_ceiling` of :func:`room_slots`),
    ``fading_brake`` (:func:`brakes_fading_loads`) and ``level_brake`` (:func:`brakes_while_level`)
    for one deployment. One place, so that the coordinator and the benchmark that replays it tally
    alike (as :func:`plan_factors` for the plan)."""
    return {
        "max_scale": scale_ceiling(room_slots(num_physical, num_groups, num_nodes)),
        "fading_brake": brakes_fading_loads(num_logical, num_physical, num_ranks, num_groups, num_nodes),
        "level_brake": brakes_while_level(num_logical, num_physical, num_ranks, num_groups, num_nodes),
    }


def _is_number(value: object) -> bool:
    """A real number, not a bool (``True`` is 1 to Python, never a factor a caller meant)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def exact_price_scale(state: SpendState) -> float:
    """The factor on the price of layers with redundant slots that :mod:`.policy_exact` plans
    (``plan_rebalance(exact_price_scale=)``): ``price_scale`` while the faded lead is above
    :data:`EXACT_LEAD_MIN`, else 1. There a dearer price delays the answer to a new hot expert,
    which a deployment merely level with DeepSeek cannot afford; one clearly ahead can."""
    return state.price_scale if state.lead > EXACT_LEAD_MIN else 1.0


def plan_factors(state: SpendState) -> dict[str, float]:
    """The keyword arguments of ``plan_rebalance`` that the controller's state sets for the next
    plan: ``spend_scale``, ``price_scale`` and :func:`exact_price_scale`. One place, so that the
    coordinator and the benchmark that replays it pass the same factors."""
    return {
        "spend_scale": state.scale,
        "price_scale": state.price_scale,
        "exact_price_scale": exact_price_scale(state),
    }


def scales_problem(spend_scale: float, price_scale: float) -> str | None:
    """What is wrong with the controller's two factors, naming the value, or None where both fit.

    One check for :func:`spend_options` and the policy's entry point (``plan_rebalance``), which
    raise it as their own error type: a caller outside the coordinator can pass either factor."""
    if not (_is_number(spend_scale) and 0.0 < spend_scale <= MAX_SCALE):
        return f"spend_scale must be a number in (0, {MAX_SCALE:g}], got {spend_scale!r}"
    return price_factor_problem(price_scale, "price_scale")


def price_factor_problem(factor: float, name: str) -> str | None:
    """What is wrong with a factor on a price (``price_scale``, or ``exact_price_scale``, which
    shares its range), naming it as ``name``, or None where it fits."""
    if not (_is_number(factor) and 1.0 <= factor <= MAX_PRICE_SCALE):
        return f"{name} must be a number in [1, {MAX_PRICE_SCALE:g}], got {factor!r}"
    return None


def balance_lead(served: np.ndarray, shadow: np.ndarray, load: np.ndarray, num_ranks: int) -> float:
    """How much better ``served`` (the placement the load was served on) balances ``load`` than
    ``shadow`` (DeepSeek's placement from the same history), in model balancedness: the sample
    :func:`update_spend` takes as ``lead``. It is issue 16's balance target measured as the
    deployment runs: both placements were planned before the newest of this load arrived (the
    coordinator's window also holds older, decayed load, alike for both)."""
    return model_balancedness(rank_loads(served, load, num_ranks)) - model_balancedness(
        rank_loads(shadow, load, num_ranks)
    )


@dataclass(frozen=True)
class SpendOptions:
    """The migration policy's settings for one plan: step 6's ``move_price``, step 4's
    ``fine_move_share``, and ``price_floor``, the least step 6's ``(1 - persistence) ** 2``
    counts as (:data:`LEAD_PRICE_FLOOR` while the balance leads, else 0)."""

    move_price: float = DEFAULT_MOVE_PRICE
    fine_move_share: float = DEFAULT_FINE_MOVE_SHARE
    price_floor: float = 0.0


def room_follows_scale(slots: int) -> bool:
    """Whether step 4's room changes with ``scale`` where it is a share of ``slots`` (a layer's,
    or a node's share of them: :func:`room_slots`).

    Where its default already holds an exchange (two slots: 25 slots on), both ways. In layers
    of :data:`ROOM_MIN_SLOTS` to 24 slots (16-expert models: Phi-3.5-MoE, DBRX) the default
    room holds none and a dearer scale would change nothing, but a cheaper one widens it to one
    or two exchanges: a slowly drifting DBRX layer (16 experts + 8 on 8 ranks of 3) otherwise
    stays 0.7-0.9 points under DeepSeek's next-window balance at 6-9% of its slots, the
    controller's scale at its floor with nothing to spend it on (``bench/planner.py --matrix
    --sixteen-experts``: 63 → 64 of 144 cells pooled over seeds 0-2, 51 → 53 under every seed;
    the matrix holds no such layer). Not in smaller layers (Mixtral's 8-12): one exchange per
    layer and rebalance is a sixth to a quarter of the slots, more than a whole cell's budget
    where DeepSeek itself moves a few percent (on the matrix that cost up to 78% of DeepSeek's
    slots).
    """
    return fine_pass_fits(slots) or slots >= ROOM_MIN_SLOTS


def room_slots(num_physical: int, num_groups: int = 1, num_nodes: int = 1) -> int:
    """The slots step 4's room is a share of: a layer's ``num_physical``, or under DeepSeek's
    group/node hierarchy a node's share of them (the migration policy runs its steps per node
    there, so DeepSeek-V3's 320 slots on 8 nodes give each node's fine pass a share of 40)."""
    return num_physical // num_nodes if uses_hierarchy(num_groups, num_nodes) else num_physical


def scale_ceiling(slots: int) -> float:
    """The dearest ``scale`` worth reaching where step 4's room is a share of ``slots``
    (:func:`room_slots`): the first doubling at which that room holds no exchange any more (the
    fine pass is off; a higher scale would change nothing and only delay cheaper moves once the
    tally drops), at most :data:`MAX_SCALE`; 1 where the room does not follow the scale at all
    (:func:`room_follows_scale`). 25-49 slots: 2; 50 or more: 4."""
    if not room_follows_scale(slots):
        return 1.0
    scale = 1.0
    while scale < MAX_SCALE and fine_pass_fits(slots, scaled_room(scale)):
        scale *= SPEND_STEP
    return min(scale, MAX_SCALE)


def scaled_room(scale: float) -> float:
    """Step 4's ``fine_move_share`` at ``scale``: its default divided by it (narrower above 1), at
    most :data:`MAX_FINE_MOVE_SHARE`."""
    return min(DEFAULT_FINE_MOVE_SHARE / scale, MAX_FINE_MOVE_SHARE)


def spend_options(scale: float, slots: int, price_scale: float = 1.0) -> SpendOptions:
    """The migration policy's settings for ``scale`` where step 4's room is a share of ``slots``
    (:func:`room_slots`; the defaults at ``scale = 1``; step 4's room only where
    :func:`room_follows_scale`; above 1 the price stays at its default) and ``price_scale``
    (step 6's price times it: :attr:`SpendState.price_scale`, and above 1 its fading floored
    at :data:`LEAD_PRICE_FLOOR`)."""
    problem = scales_problem(scale, price_scale)
    if problem is not None:
        raise ValueError(problem)
    room = scaled_room(scale) if room_follows_scale(slots) else DEFAULT_FINE_MOVE_SHARE
    floor = LEAD_PRICE_FLOOR if price_scale > 1.0 else 0.0
    return SpendOptions(DEFAULT_MOVE_PRICE * min(scale, 1.0) * price_scale, room, floor)
