"""What is placed where: the model, the epoch every rank agrees on, each recent epoch's placement, the load.

Agents are the source of truth: a placement enters the book from a rank's ``Hello`` or from
a plan every rank committed, and the deployment's epoch is the one every registered rank
reports, never one rank's word alone. Pure bookkeeping: no sockets, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eplb_service import protocol
from eplb_service.coordinator.load_window import LoadWindow
from eplb_service.placement import (
    PlacementShape,
    fold_slot_load,
    layer_balancedness,
    logical_fold_index,
    model_balancedness,
    rank_loads,
)

HISTORY_EPOCHS = 16
"""Placements kept: load reports counted under an older epoch are dropped."""
MAX_SLOT_COUNT = float(2**53)
"""Most tokens one slot may count in one load report: far above any real count, and low enough
that the load window's sums over reports, replicas and ranks stay finite."""


class LoadRejected(ValueError):
    """A load report the book cannot use; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class PlacementBook:
    world_size: int
    load_half_life_steps: float
    model: protocol.ModelShape | None = None
    shape: PlacementShape | None = None
    epoch: int = -1
    """The epoch every registered rank reports; -1 until they first agree."""
    placements: dict[int, np.ndarray] = field(default_factory=dict)
    """Epoch -> ``[L, P]`` placement."""
    window: LoadWindow | None = None
    max_step_seen: int = 0
    _fold_index: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    """Epoch -> (its placement, the placement's fold index): computed on the first report of an
    epoch, not on every report; dropped with the placement."""

    def adopt(self, model: protocol.ModelShape, shape: PlacementShape, phy2log: np.ndarray, epoch: int) -> bool:
        """The first rank of a deployment (or the first back when none is alive) seeds the table.

        Returns True the first time the model becomes known (the caller then fits its frame
        limit and starts recording)."""
        first = self.model is None
        if first:
            self.model, self.shape = model, shape
            self.window = LoadWindow(shape.num_layers, shape.num_logical, self.load_half_life_steps)
        self.placements = {epoch: phy2log}
        return first

    def reset(self) -> None:
        """Forget the deployment: the next ``adopt`` starts from its Hello as a fresh coordinator would."""
        self.model = self.shape = self.window = None
        self.epoch, self.placements, self.max_step_seen = -1, {}, 0
        self._fold_index = {}

    @property
    def agreed_epoch(self) -> int | None:
        """The agreed epoch, or None before the ranks first agree on a placement: what an operator
        is shown (status, metrics), where -1 would read as a real epoch."""
        return self.epoch if self.epoch >= 0 else None

    def learn(self, epoch: int, phy2log: np.ndarray) -> None:
        self.placements.setdefault(epoch, phy2log)

    def conflicts(self, epoch: int, phy2log: np.ndarray) -> bool:
        known = self.placements.get(epoch)
        return known is not None and not np.array_equal(phy2log, known)

    def agree(self, epochs: list[int]) -> int | None:
        """Given every registered rank's epoch, the newly agreed epoch, or None when nothing changed."""
        if len(epochs) != self.world_size or len(set(epochs)) != 1:
            return None
        epoch = epochs[0]
        if epoch == self.epoch or epoch not in self.placements:
            return None
        self.epoch = epoch
        return epoch

    def unknown(self, epoch: int, planned_next: int | None) -> bool:
        """An epoch whose placement this book never saw, and that no plan in flight leads to."""
        return epoch not in self.placements and epoch != planned_next

    def commit(self, base_epoch: int, layers: list[int], rows: np.ndarray) -> int:
        """A plan every rank committed: the new epoch's placement; returns the slots that changed."""
        old = self.placements[base_epoch]
        new = old.copy()
        new[layers] = rows
        self.epoch = base_epoch + 1
        self.placements[self.epoch] = new
        for stale in [e for e in self.placements if e <= self.epoch - HISTORY_EPOCHS]:
            del self.placements[stale]
        return int((old != new).sum())

    def add_load(self, report: protocol.LoadReport) -> np.ndarray:
        """Fold a report's slot counts into the window as logical load ``[L, N_log]`` (returned)."""
        placement = self.placements.get(report.epoch)
        if placement is None:
            raise LoadRejected("unknown_epoch")
        try:
            counts = report.slot_load.to_numpy("slot_load", copy=False)  # read-only: only folded below
        except protocol.ProtocolError as exc:
            raise LoadRejected("bad_array", str(exc)) from None
        if counts.shape != placement.shape:
            raise LoadRejected("bad_shape", f"load report shape {counts.shape}, expected {placement.shape}")
        # One NaN or inf never decays out of the window: every later plan would fail. A finite count
        # past MAX_SLOT_COUNT (1e308, say) does the same: summed over replicas and ranks it overflows
        # to inf, and balancedness reads NaN in the metrics and in the status document. Two reductions
        # tell whether any entry is bad (a NaN fails both comparisons); the mask only to name it.
        low, high = counts.min(), counts.max()
        if not (low >= 0 and high <= MAX_SLOT_COUNT):
            bad = ~np.isfinite(counts) | (counts < 0) | (counts > MAX_SLOT_COUNT)
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise LoadRejected(
                "bad_values",
                f"slot_load{list(where)} = {counts[where].item()!r}; expected finite token counts from 0 to 2**53",
            )
        if not report.step_begin <= report.step_end:
            raise LoadRejected(
                "bad_steps", f"steps {report.step_begin}..{report.step_end}: step_begin must not exceed step_end"
            )
        logical = fold_slot_load(
            self._index_of(report.epoch, placement), counts, self.shape.num_layers, self.shape.num_logical
        )
        self.window.add(logical, report.step_begin, report.step_end)
        self.max_step_seen = max(self.max_step_seen, report.step_end)
        return logical

    def _index_of(self, epoch: int, placement: np.ndarray) -> np.ndarray:
        cached = self._fold_index.get(epoch)
        if cached is None or cached[0] is not placement:
            for stale in [e for e in self._fold_index if e not in self.placements]:
                del self._fold_index[stale]
            cached = self._fold_index[epoch] = (placement, logical_fold_index(placement, self.shape.num_logical))
        return cached[1]

    def balancedness(self) -> tuple[float, np.ndarray] | None:
        """Model and per-layer balancedness of the load window under the agreed placement."""
        if self.window is None or self.epoch not in self.placements or not self.window.load.any():
            return None
        loads = rank_loads(self.placements[self.epoch], self.window.load, self.world_size)
        return model_balancedness(loads), layer_balancedness(loads)
