"""The deployment's load window: per layer, per logical expert, summed over ranks.

Agents report counts per *physical slot* under the placement epoch they were counted
in; the window folds them to logical experts with that epoch's map, so a report that
straddles a commit is never attributed to the wrong expert. The window decays
exponentially in deployment steps (half-life configurable), so it follows drift.
"""

from __future__ import annotations

import numpy as np

from eplb_service.placement import physical_to_logical_load


class LoadWindow:
    def __init__(self, num_layers: int, num_logical: int, half_life_steps: float) -> None:
        self.load = np.zeros((num_layers, num_logical), dtype=np.float64)
        self.half_life_steps = half_life_steps
        self.decayed_to_step = 0
        self.first_step: int | None = None
        self.reports = 0

    def add(self, logical_load: np.ndarray, step_begin: int, step_end: int) -> None:
        """Fold one rank's ``[L, N_log]`` load for ``[step_begin, step_end)`` into the window."""
        if step_end > self.decayed_to_step:
            self.load *= 0.5 ** ((step_end - self.decayed_to_step) / self.half_life_steps)
            self.decayed_to_step = step_end
        if self.first_step is None:
            self.first_step = step_begin
        self.load += logical_load
        self.reports += 1

    @staticmethod
    def to_logical(slot_load: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
        """``[L, P]`` counts under placement ``phy2log`` → ``[L, N_log]``."""
        return physical_to_logical_load(phy2log, slot_load, num_logical)

    def steps_covered(self) -> int:
        return 0 if self.first_step is None else self.decayed_to_step - self.first_step
