"""How much of a load window's imbalance will still be there in the next one.

Every policy plans for the load it is given, but serving sees the *next* window. Where the load
drifts slowly the two are alike; where hot experts come and go (a hot expert's traffic moving
to another expert every few windows) a placement tuned to the last window's hot expert is tuned
to an expert that is no longer hot. DeepSeek's policy cannot tell the two apart, so it spends
slots on both alike.

**Persistence** ``a`` is the least-squares slope of one window's per-layer load shares on the
window before, pooled over every layer and expert, after taking out each layer's mean share:
how much of an expert's deviation from the mean it keeps from one window to the next. It is 1
for a load that keeps its shape, lower where sampling noise or experts trading popularity
reshuffle it (about 0.15-0.3 when the hottest of 8 experts changes every window, 0.75 when a
quarter of the layers gain a new hot expert each window, 0.9-1.0 under slow drift; measured on
``bench/planner.py --matrix``). Pooling over all layers makes it a stable statistic from two
windows, and the slope is what a least-squares forecast of the next share from the last one
uses.

The **forecast** keeps each layer's total and mean and scales every expert's deviation from the
mean by ``a``. A plan made for it expects only the part of today's imbalance that tends to
last. :mod:`.policy_migration` also uses ``a`` to price a move: a gain that fades by ``a`` per
window is worth about ``1 / (1 - a)`` windows of it, so a layer changes only where that
amortised gain pays for the slots it moves.

**Which load the plan is made for** (:func:`planning_persistence`). The forecast is the expected
next window, but a plan minimises the *largest* rank, and the two kinds of error are not alike:
an expert planned below the load it gets puts its ranks above the rest, one planned above it
only takes a replica the others could have used. Where most of the imbalance lasts (``a`` at
least 0.6: slow drift, or a new hot expert that fades over a few windows), the shrunk forecast
plans every lasting hot expert below its load, so the plan is made for the load as it is and
``a`` only prices the moves. Where most of it fades (``a`` at most 0.4: the hottest expert
hopping to another every window) no placement of the last window's hot expert holds, and the
plan for the expected window (a flatter one) is the one that does. In between, the share kept
rises linearly, so the plan does not jump when ``a`` crosses a line. On the workload matrix
(``bench/planner.py --matrix``) planning for the load as it is above 0.6 met 382 cells against
380 with the forecast everywhere, cells missing on balance 26 to 18: the abrupt cells gained up
to 0.7 pp; some high-noise swap cells lost up to 0.4 pp, where shrinking also smoothed noise.
"""

from __future__ import annotations

import numpy as np

PLAN_AS_IS_FROM = 0.6
"""At this persistence and above, the plan is made for the load as it is (see the module docstring)."""
FORECAST_UP_TO = 0.4
"""At this persistence and below, the plan is made for the forecast with the persistence itself."""


def load_shares(load: np.ndarray) -> np.ndarray:
    """``[L, N]`` each expert's share of its layer's load (a layer without load: all 0)."""
    load = np.asarray(load, dtype=np.float64)
    totals = load.sum(axis=1, keepdims=True)
    return load / np.where(totals > 0, totals, 1.0)


def replica_shares(load: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[L, N]`` the load one replica of each expert carries, as a share of its layer's load
    (an expert's load split evenly over its ``counts`` replicas; 0 for an expert with none)."""
    return load_shares(load) / np.maximum(counts, 1)


def persistence(previous: np.ndarray | None, latest: np.ndarray) -> float:
    """The pooled slope of ``latest``'s centred shares on ``previous``'s, clipped to ``[0, 1]``.

    ``1.0`` (trust the last window as it is) without a previous window, when the shapes differ,
    or when the previous window is flat (no deviation to regress on).
    """
    if previous is None:
        return 1.0
    prev = np.asarray(previous, dtype=np.float64)
    last = np.asarray(latest, dtype=np.float64)
    if prev.shape != last.shape or prev.ndim != 2:
        return 1.0
    both = (prev.sum(axis=1) > 0) & (last.sum(axis=1) > 0)
    if not both.any():
        return 1.0
    x = load_shares(prev[both])
    y = load_shares(last[both])
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    spread = float((x * x).sum())
    if not np.isfinite(spread) or spread <= 1e-24:
        return 1.0
    return float(np.clip((x * y).sum() / spread, 0.0, 1.0))


def forecast_load(load: np.ndarray, persistence_now: float) -> np.ndarray:
    """``[L, N]`` the expected next window: each layer's mean plus ``persistence_now`` of each
    expert's deviation from it (totals kept; loads stay >= 0 for ``persistence_now`` in [0, 1])."""
    load = np.asarray(load, dtype=np.float64)
    if persistence_now >= 1.0:
        return load
    mean = load.mean(axis=1, keepdims=True)
    return mean + persistence_now * (load - mean)


def planning_persistence(persistence_now: float) -> float:
    """The share of each deviation the plan keeps (the ``persistence_now`` given to
    :func:`forecast_load` for planning): ``persistence_now`` up to :data:`FORECAST_UP_TO`, 1 from
    :data:`PLAN_AS_IS_FROM`, linear in between (continuous and non-decreasing)."""
    a = float(persistence_now)
    if a <= FORECAST_UP_TO:
        return a
    if a >= PLAN_AS_IS_FROM:
        return 1.0
    return a + (1.0 - a) * (a - FORECAST_UP_TO) / (PLAN_AS_IS_FROM - FORECAST_UP_TO)
