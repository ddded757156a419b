"""Surges: a cold expert that turns hot from one window to the next, then fades back.

Why: in a layer of few experts without redundant slots (Mixtral-8x7B on 4 GPUs: 2 experts per
rank) a new hot expert can only be answered by re-pairing ranks, and every answer costs slots.
A planner that sees only the last window answers every surge and then every step of its fade;
one that knows surges fade, and that new ones keep coming, answers the ones worth answering and
waits out the rest (``bench/online_bound.py``: on the workload matrix's Mixtral 8+0 abrupt cells
such a planner, given the load's law, met both of issue 16's targets where the swap search
spends two to two and a half times the slot budget). This module estimates that law from the
windows the coordinator has seen; :mod:`.policy_lookahead` plans with it.

The model, per layer, on *centred log shares* (each expert's log share of the layer's load minus
the layer's mean log share, so a layer's total drops out):

- every expert has a **level**, the mean of its centred log shares over the windows seen;
- an expert's excess over its level fades by a share ``reversion`` per window;
- in each window, with chance ``rate``, one expert of the colder half (at or below the layer's
  median) **surges**: it lands ``jump`` above the layer's hottest expert.

Estimated from consecutive windows, pooled over the layers (one deployment's layers see the
same traffic, so they share a law, and pooling gives tens of samples from two windows):

- a surge is seen where a layer's hottest expert was at or below the layer's median the window
  before and rose by more than :data:`SURGE_RISE`;
- ``rate``: surges seen per layer and window;
- ``jump``: the mean height of a seen surge above the hottest of the other experts in its window
  (not against the layer's mean: a surge lifts the mean it would be measured from);
- ``reversion``: one minus the least-squares slope of a surged expert's excess over the level it
  had before its surge, window on window, until its layer's next surge. The excess is large
  against sampling noise, so this reads a fade of a few percent per window from a handful of
  windows, where a regression over every expert is swamped by noise and by the level's own
  error. Until a surge has been followed for a window it is :data:`PRIOR_REVERSION`.

A second kind of change, **hops**: a layer's hottest expert trades places with another expert,
and the new arrangement lasts (a workload whose popular topic moves from expert to expert). A
surge fades back; after a hop there is nothing to fade back to, and most of the old hot expert's
lead is simply gone a window later. The model's ``hop`` is that share, pooled over layers: the
least-squares slope of how far each layer's hottest expert fell on how far it led the mean of
the others, window on window. It reads what fraction of a lead a planner chasing the hottest
expert should expect to lose: on the workload matrix's Mixtral 8+0 cells 0.84-0.92 where the
hottest expert trades places every window (7 in 8 windows), 0.10-0.14 where surges come and fade
(their reversion), 0.00 under slow drift, whatever the sampling noise (seeds 0-2).
:mod:`.policy_lookahead` plans a hopping layer as one whose hottest expert trades places with any
other with chance ``hop``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SURGE_RISE = float(np.log(2.0))
"""Rise in centred log share (a doubling of the expert's share against the rest) that, with a
climb from the colder half to the top, counts as a surge."""
PRIOR_REVERSION = 0.1
"""Reversion taken before any surge has been followed: a surge's excess halving in about seven
windows."""
ABSENT_TOKENS = 0.5
"""Routed tokens an expert with none in a window is taken to have had, to take a log."""


def centred_log_shares(load: np.ndarray) -> np.ndarray:
    """``[L, N]`` each expert's log share of its layer's load minus the layer's mean log share
    (an expert without tokens counted at :data:`ABSENT_TOKENS`)."""
    logs = np.log(np.maximum(np.asarray(load, dtype=np.float64), ABSENT_TOKENS))
    return logs - logs.mean(axis=1, keepdims=True)


def seen_surges(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``[L]`` the expert that surged in each layer between two windows' centred log shares, or -1."""
    top = after.argmax(axis=1)
    rows = np.arange(len(after))
    was_cold = before[rows, top] <= np.median(before, axis=1)
    rose = after[rows, top] - before[rows, top] > SURGE_RISE
    return np.where(was_cold & rose, top, -1)


@dataclass(frozen=True)
class SurgeModel:
    """The law :mod:`.policy_lookahead` plans with (module docstring).

    Attributes:
        level: ``[L, N]`` each expert's long-run centred log share.
        rate: chance of a new surge per layer and window, in ``[0, 1]``.
        reversion: share of an expert's excess over its level that fades per window, in ``[0, 1]``.
        jump: how far above the other experts' hottest a surge lands, in log share.
        windows: windows the estimate rests on.
        hop: share of the hottest expert's lead over the others that is gone a window later, in
            ``[0, 1]`` (module docstring).
    """

    level: np.ndarray
    rate: float
    reversion: float
    jump: float
    windows: int
    hop: float = 0.0

    def select(self, layers: slice | np.ndarray) -> SurgeModel:
        """The same law for some of the layers only (a plan made in blocks, or a part re-planned)."""
        return replace(self, level=self.level[layers])  # every other field is per deployment, kept


class SurgeTracker:
    """Folds complete load windows, one at a time, into the sums :class:`SurgeModel` is read from.

    Memory is a few ``[L, N]`` arrays whatever the number of windows; :meth:`add` is ``O(L N)``.
    """

    def __init__(self) -> None:
        self.windows = 0
        self.level_sum: np.ndarray | None = None
        self.last: np.ndarray | None = None  # the previous window's centred log shares
        self.followed = np.zeros(0, dtype=np.int64)  # per layer: the expert of its latest surge, or -1
        self.before = np.zeros(0)  # per layer: that expert's centred log share before its surge
        self.pairs = 0  # consecutive window pairs seen
        self.surges = 0
        self.jump_sum = 0.0
        self.fade_xx = 0.0
        self.fade_xy = 0.0
        self.lead_xx = 0.0  # the hottest expert's lead over the others' mean, squared
        self.lead_xy = 0.0  # that lead times how far the expert fell a window later

    def add(self, load: np.ndarray, *, follows: bool = True) -> None:
        """Fold one complete window ``[L, N]`` of routed tokens. ``follows=False`` where it does not
        directly follow the last one folded (a gap: no surge is read across it). A window of
        another shape starts the tracker over."""
        logs = centred_log_shares(load)
        if self.level_sum is not None and self.level_sum.shape != logs.shape:
            self.__init__()  # type: ignore[misc]
        if self.level_sum is None:
            self.level_sum = np.zeros_like(logs)
            self.followed = np.full(len(logs), -1, dtype=np.int64)
            self.before = np.zeros(len(logs))
        if self.last is not None and follows:
            self._fold_pair(self.last, logs)
        elif self.last is not None:
            self.followed[:] = -1
        self.level_sum += logs
        self.windows += 1
        self.last = logs

    def _fold_pair(self, before: np.ndarray, after: np.ndarray) -> None:
        rows = np.arange(len(after))
        top = before.argmax(axis=1)
        peak = before[rows, top]
        num = before.shape[1]
        if num > 1:
            lead = peak - (before.sum(axis=1) - peak) / (num - 1)
            self.lead_xx += float(lead @ lead)
            self.lead_xy += float(lead @ (peak - after[rows, top]))
        new = seen_surges(before, after)
        fading = (new < 0) & (self.followed >= 0)
        if fading.any():
            expert = self.followed[fading]
            x = before[rows[fading], expert] - self.before[fading]
            y = after[rows[fading], expert] - self.before[fading]
            self.fade_xx += float(x @ x)
            self.fade_xy += float(x @ y)
        hit = new >= 0
        if hit.any():
            others = after[hit].copy()
            others[np.arange(len(others)), new[hit]] = -np.inf
            self.jump_sum += float((after[rows[hit], new[hit]] - others.max(axis=1)).sum())
            self.before[hit] = before[rows[hit], new[hit]]
        self.followed = np.where(hit, new, self.followed)
        self.surges += int(hit.sum())
        self.pairs += len(after)

    def model(self) -> SurgeModel | None:
        """The law read from the windows so far; None before two consecutive windows."""
        if self.level_sum is None or self.pairs == 0:
            return None
        reversion = PRIOR_REVERSION
        if self.fade_xx > 0:
            reversion = float(np.clip(1.0 - self.fade_xy / self.fade_xx, 0.0, 1.0))
        jump = self.jump_sum / self.surges if self.surges else SURGE_RISE
        hop = float(np.clip(self.lead_xy / self.lead_xx, 0.0, 1.0)) if self.lead_xx > 0 else 0.0
        return SurgeModel(
            level=self.level_sum / self.windows,
            rate=self.surges / self.pairs,
            reversion=reversion,
            jump=max(jump, 0.0),
            windows=self.windows,
            hop=hop,
        )
