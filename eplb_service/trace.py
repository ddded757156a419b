"""Load traces: what a coordinator saw, recorded to replay or to plan from offline.

Format (``.npz``, numpy's zip of arrays; version 1):

| array | shape, dtype | meaning |
|---|---|---|
| ``format_version`` | ``[]`` int64 | 1 |
| ``loads`` | ``[W, L, N_log]`` float64 | tokens per logical expert in window ``w``, summed over ranks |
| ``step_begin``, ``step_end`` | ``[W]`` int64 | the deployment steps ``[begin, end)`` of the window |
| ``epoch`` | ``[W]`` int64 | placement epoch the counts were made under |
| ``ranks_reported`` | ``[W]`` int64 | ranks whose reports the window holds (== world size when complete) |
| ``unix_time_s`` | ``[W]`` float64 | when the window was closed |

Windows are closed in step order; a window is closed when a report for a later window
arrives from every rank or when the recorder is flushed.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1


class TraceError(ValueError):
    """A trace file that is not what this module writes; the message says what is off."""


@dataclass(frozen=True)
class Trace:
    loads: np.ndarray
    step_begin: np.ndarray
    step_end: np.ndarray
    epoch: np.ndarray
    ranks_reported: np.ndarray
    unix_time_s: np.ndarray

    @property
    def num_windows(self) -> int:
        return int(self.loads.shape[0])

    def aggregate(self) -> np.ndarray:
        """``[L, N_log]``: the load summed over every window (for a static placement)."""
        return self.loads.sum(axis=0)

    def window_at(self, step: int) -> int:
        """Index of the window covering ``step``, cycling over the trace's steps."""
        span = int(self.step_end[-1] - self.step_begin[0])
        offset = self.step_begin[0] + (step % span if span > 0 else 0)
        return int(min(np.searchsorted(self.step_end, offset, side="right"), self.num_windows - 1))


def load_trace(path: str) -> Trace:
    """Read and check a trace; raises :class:`TraceError` naming the file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise TraceError(f"cannot read trace {path!r}: {exc}") from None
    required = ("format_version", "loads", "step_begin", "step_end", "epoch", "ranks_reported", "unix_time_s")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise TraceError(f"trace {path!r} lacks arrays {missing}")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise TraceError(
            f"trace {path!r} has format_version {int(arrays['format_version'])}, this reader knows {FORMAT_VERSION}"
        )
    loads = arrays["loads"]
    if loads.ndim != 3 or loads.shape[0] == 0:
        raise TraceError(f"trace {path!r}: loads has shape {loads.shape}, expected [windows > 0, layers, experts]")
    for key in required[2:]:
        if arrays[key].shape != (loads.shape[0],):
            raise TraceError(f"trace {path!r}: {key} has shape {arrays[key].shape}, expected ({loads.shape[0]},)")
    if (loads < 0).any() or not np.isfinite(loads).all():
        raise TraceError(f"trace {path!r}: loads must be finite and >= 0")
    return Trace(loads.astype(np.float64), *(arrays[k] for k in required[2:]))


class TraceRecorder:
    """Accumulates per-window logical loads from load reports and writes the trace."""

    def __init__(self, path: str, num_layers: int, num_logical: int, world_size: int) -> None:
        self.path = path
        self.world_size = world_size
        self.shape = (num_layers, num_logical)
        self._open: dict[tuple[int, int], dict] = {}
        self._closed: list[dict] = []
        self._write_lock = threading.Lock()
        """One writer at a time: the coordinator's periodic flush runs in an executor thread, and
        the shutdown's final flush could start while it still wrote the same temporary file
        (seen: a truncated trace that ``np.load`` refused, Bad magic number for central directory)."""

    def add(self, logical_load: np.ndarray, step_begin: int, step_end: int, epoch: int, rank: int) -> None:
        window = self._open.setdefault(
            (step_begin, step_end), {"loads": np.zeros(self.shape), "epoch": epoch, "ranks": set()}
        )
        window["loads"] += logical_load
        window["ranks"].add(rank)
        # close older windows once every rank has moved past them
        if len(window["ranks"]) == self.world_size:
            for key in sorted(k for k in self._open if k[1] <= step_begin):
                self._close(key)

    def _close(self, key: tuple[int, int]) -> None:
        window = self._open.pop(key)
        self._closed.append(
            {
                "step_begin": key[0],
                "step_end": key[1],
                "loads": window["loads"],
                "epoch": window["epoch"],
                "ranks": len(window["ranks"]),
                "time": time.time(),
            }
        )

    @property
    def windows(self) -> int:
        return len(self._closed)

    def flush(self, close_all: bool = False) -> None:
        """Write every closed window (and the open ones if ``close_all``) atomically."""
        if close_all:
            for key in sorted(self._open):
                self._close(key)
        with self._write_lock:
            self._write()

    def _write(self) -> None:
        if not self._closed:
            return
        rows = sorted(self._closed, key=lambda w: (w["step_begin"], w["step_end"]))
        tmp = f"{self.path}.tmp.npz"
        np.savez_compressed(
            tmp,
            format_version=np.int64(FORMAT_VERSION),
            loads=np.stack([w["loads"] for w in rows]),
            step_begin=np.array([w["step_begin"] for w in rows], dtype=np.int64),
            step_end=np.array([w["step_end"] for w in rows], dtype=np.int64),
            epoch=np.array([w["epoch"] for w in rows], dtype=np.int64),
            ranks_reported=np.array([w["ranks"] for w in rows], dtype=np.int64),
            unix_time_s=np.array([w["time"] for w in rows], dtype=np.float64),
        )
        os.replace(tmp, self.path)
