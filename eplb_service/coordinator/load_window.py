"""The deployment's load window: per layer, per logical expert, summed over ranks.

Agents report counts per *physical slot* under the placement epoch they were counted
in; the window folds them to logical experts with that epoch's map, so a report that
straddles a commit is never attributed to the wrong expert. The window decays
exponentially in deployment steps (half-life configurable), so it follows drift.

Beside the decayed sum it keeps the raw load of the last few *segments* of one half-life
each (steps ``[k * h, (k + 1) * h)``, by a report's first step), so the planner can measure how
much of the imbalance lasts from one segment to the next
(:func:`~eplb_service.coordinator.load_forecast.persistence`), and folds every complete segment
into a :class:`~eplb_service.coordinator.surge_model.SurgeTracker`, whose law of surges the
migration policy plans small layers ahead with (:mod:`.policy_lookahead`).
"""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.surge_model import SurgeModel, SurgeTracker
from eplb_service.placement import physical_to_logical_load

SEGMENTS_KEPT = 3
"""The newest segment (still filling) and the two complete ones before it."""


class LoadWindow:
    def __init__(self, num_layers: int, num_logical: int, half_life_steps: float) -> None:
        self.load = np.zeros((num_layers, num_logical), dtype=np.float64)
        self.half_life_steps = half_life_steps
        self.decayed_to_step = 0
        self.first_step: int | None = None
        self.reports = 0
        self.segments: dict[int, np.ndarray] = {}
        self.surges = SurgeTracker()
        self.folded: int | None = None  # the newest segment folded into ``surges``

    def add(self, logical_load: np.ndarray, step_begin: int, step_end: int) -> None:
        """Fold one rank's ``[L, N_log]`` load for ``[step_begin, step_end)`` into the window."""
        if step_end > self.decayed_to_step:
            self.load *= 0.5 ** ((step_end - self.decayed_to_step) / self.half_life_steps)
            self.decayed_to_step = step_end
        if self.first_step is None:
            self.first_step = step_begin
        self.load += logical_load
        self.reports += 1
        segment = int(step_begin // self.half_life_steps)
        if segment not in self.segments:
            self.segments[segment] = np.zeros_like(self.load)
            self._fold_done()
            for old in sorted(self.segments)[:-SEGMENTS_KEPT]:
                del self.segments[old]
        if segment in self.segments:
            self.segments[segment] += logical_load

    def persistence(self) -> float:
        """Persistence from the two newest complete segments (the newest one may still be
        filling); 1.0 (plan for the window as it is) until two adjacent ones exist."""
        done = sorted(self.segments)[:-1]
        if len(done) < 2 or done[-1] != done[-2] + 1:
            return 1.0
        return persistence(self.segments[done[-2]], self.segments[done[-1]])

    def _fold_done(self) -> None:
        """Fold each complete segment (all but the newest) not folded yet, oldest first; a report
        that arrives for a segment after it was folded still counts in the window, not in the law."""
        for segment in sorted(self.segments)[:-1]:
            if self.folded is not None and segment <= self.folded:
                continue
            follows = self.folded is not None and segment == self.folded + 1
            self.surges.add(self.segments[segment], follows=follows)
            self.folded = segment

    def surge_model(self) -> SurgeModel | None:
        """The law of surges read from the complete segments so far (None before two in a row)."""
        return self.surges.model()

    @staticmethod
    def to_logical(slot_load: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
        """``[L, P]`` counts under placement ``phy2log`` → ``[L, N_log]``."""
        return physical_to_logical_load(phy2log, slot_load, num_logical)

    def steps_covered(self) -> int:
        return 0 if self.first_step is None else self.decayed_to_step - self.first_step
