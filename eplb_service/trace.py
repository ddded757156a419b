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
arrives from every rank or when the recorder is flushed. They are written sorted by
``(step_begin, step_end)``, each with ``step_begin <= step_end`` (the coordinator refuses a
report whose steps run backwards); a reader refuses a trace that breaks either. Windows may
overlap: ranks whose report boundaries differ (``report_interval_steps`` takes effect at each
rank's ``Welcome``) give windows of their own, each with fewer ``ranks_reported``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

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


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"
_WINDOW_INTS = ("step_begin", "step_end", "epoch", "ranks_reported")
_REQUIRED = ("format_version", "loads", *_WINDOW_INTS, "unix_time_s")


class UnreadableFile(ValueError):
    """A ``.npy``/``.npz`` file numpy cannot read as asked; the message says why, without the path
    (callers put their flag or role and the path in front)."""


_WHAT = {"npy": "a .npy array", "npz": "an .npz archive"}


def file_format(f: BinaryIO) -> str:
    """``"empty"``, ``"npy"``, ``"npz"`` or ``"other"``, from the first bytes of ``f`` (rewound).

    ``np.load`` guesses the same way but reports anything that is neither as "pickled data"
    (and an empty file as ``EOFError``); knowing the format first lets the message say what the
    file is."""
    head = f.read(len(NPY_MAGIC))
    f.seek(0)
    if not head:
        return "empty"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(ZIP_MAGIC):
        return "npz"
    return "other"


def read_numpy(path: str, want: str) -> np.ndarray | dict[str, object]:
    """The array of the ``.npy`` (``want="npy"``) or the members of the ``.npz`` (``"npz"``) at
    ``path``; never a pickle. Raises :class:`UnreadableFile` for anything else.

    The file is opened here, not by ``np.load``: given a path, ``np.load`` leaks the handle when
    a damaged zip's directory fails to parse."""
    try:
        with open(path, "rb") as f:
            kind = file_format(f)
            if kind != want:
                raise UnreadableFile(_wrong_format(kind, want))
            try:
                loaded = np.load(f, allow_pickle=False)
                if isinstance(loaded, np.ndarray):
                    return loaded
                with loaded:
                    return {k: loaded[k] for k in loaded.files}
            except Exception as exc:  # noqa: BLE001 - damaged bytes raise many types, see describe_read_error
                if "allow_pickle" in str(exc):
                    raise UnreadableFile("it holds pickled Python objects, which are never loaded") from None
                raise UnreadableFile(f"damaged .{want} file ({describe_read_error(exc)})") from None
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None


def _wrong_format(kind: str, want: str) -> str:
    if kind == "empty":
        return f"the file is empty, expected {_WHAT[want]}"
    if kind in _WHAT:
        return f"it is {_WHAT[kind]}, expected {_WHAT[want]}"
    return f"it is not {_WHAT[want]} (no {'zip signature' if want == 'npz' else 'numpy header'} at its start)"


def describe_read_error(exc: BaseException) -> str:
    """One line saying why numpy could not read a file, for an error message.

    Damaged ``.npy``/``.npz`` bytes raise many types (measured by fuzzing truncations and
    flipped bytes: ``BadZipFile``, ``zlib.error``, ``EOFError``, ``ValueError``,
    ``NotImplementedError``, ``RuntimeError``, ``OSError``, ``tokenize.TokenError``); each
    says what is wrong in its text, but some only in their type name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, EOFError):
        return "the file ends early (truncated)"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def real_dtype(arr: np.ndarray) -> bool:
    """Whether ``arr`` holds real numbers (integers or floats): not bool, complex, strings,
    dates or records, which ``astype(float64)`` would coerce, warn about, or fail on."""
    return arr.dtype.kind in "iuf"


def first_bad_load(loads: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first entry of float64 ``loads`` that is not finite or is < 0, else None."""
    bad = ~np.isfinite(loads) | (loads < 0)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def as_float_loads(arr: np.ndarray) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """Real-typed ``arr`` as float64, and the index of its first entry that is not finite or is < 0."""
    with np.errstate(over="ignore"):  # a long double beyond float64 becomes inf, reported as bad
        loads = arr.astype(np.float64)
    return loads, first_bad_load(loads)


def _read_arrays(path: str) -> dict[str, object]:
    """Every member of the ``.npz`` at ``path``, or :class:`TraceError` saying why not."""
    try:
        arrays = read_numpy(path, "npz")
    except UnreadableFile as exc:
        raise TraceError(f"cannot read trace {path!r}: {exc}") from None
    assert isinstance(arrays, dict)  # read_numpy(..., "npz") returns the members
    return arrays


def _check_format_version(path: str, value: np.ndarray) -> None:
    if value.shape != () or value.dtype.kind not in "iu":
        raise TraceError(
            f"trace {path!r}: format_version has shape {value.shape} dtype {value.dtype}, expected a scalar integer"
        )
    if int(value) != FORMAT_VERSION:
        raise TraceError(f"trace {path!r} has format_version {int(value)}, this reader knows {FORMAT_VERSION}")


def _check_loads(path: str, loads: np.ndarray) -> np.ndarray:
    """``loads`` as float64 ``[W, L, N]``: real numbers, finite, >= 0, no empty axis."""
    if loads.ndim != 3 or 0 in loads.shape:
        raise TraceError(
            f"trace {path!r}: loads has shape {loads.shape}, expected [windows > 0, layers > 0, experts > 0]"
        )
    if not real_dtype(loads):
        raise TraceError(f"trace {path!r}: loads has dtype {loads.dtype}, expected real numbers (integers or floats)")
    as_float, bad = as_float_loads(loads)
    if bad is not None:
        raise TraceError(
            f"trace {path!r}: loads[{', '.join(map(str, bad))}] = {as_float[bad]}, expected a finite number >= 0"
        )
    with np.errstate(over="ignore"):
        totals = as_float.sum(axis=(1, 2))
    overflowing = np.flatnonzero(~np.isfinite(totals))
    if overflowing.size:  # replay divides by each layer's total: an inf one drew from all-zero shares
        w = int(overflowing[0])
        raise TraceError(
            f"trace {path!r}: window {w}'s loads sum to inf (its largest entry is {float(as_float[w].max())}): "
            "expected windows whose total load is a finite float64 (below about 1.8e308)"
        )
    return as_float


def _check_window_array(path: str, key: str, value: np.ndarray, windows: int) -> np.ndarray:
    """A per-window array: shape ``(windows,)``; integers (steps, epochs, ranks) or real times."""
    if value.shape != (windows,):
        raise TraceError(f"trace {path!r}: {key} has shape {value.shape}, expected ({windows},)")
    expected_kinds, what = ("iu", "integers") if key in _WINDOW_INTS else ("iuf", "real numbers")
    if value.dtype.kind not in expected_kinds:
        raise TraceError(f"trace {path!r}: {key} has dtype {value.dtype}, expected {what}")
    return value


def _check_step_order(path: str, step_begin: np.ndarray, step_end: np.ndarray) -> None:
    """Steps ``>= 0``, every window ``[begin, end)`` forwards, windows sorted as the recorder
    writes them; the first window that is not is named. The simulation's ``window_at`` searches
    the steps, and a trace whose steps run backwards was not written by the recorder."""
    for key, steps in (("step_begin", step_begin), ("step_end", step_end)):
        # compared as Python ints: a uint64 beyond int64 must not wrap to a negative step
        bad = [w for w, step in enumerate(steps.tolist()) if not 0 <= step < 2**63]
        if bad:
            raise TraceError(f"trace {path!r}: {key}[{bad[0]}] = {int(steps[bad[0]])}, expected a step in [0, 2**63)")
    begin, end = step_begin.astype(np.int64), step_end.astype(np.int64)
    backwards = np.flatnonzero(begin > end)
    if backwards.size:
        w = int(backwards[0])
        raise TraceError(
            f"trace {path!r}: window {w} covers steps [{begin[w]}, {end[w]}), which runs backwards: "
            "expected step_begin <= step_end"
        )
    out_of_order = np.flatnonzero((begin[1:] < begin[:-1]) | ((begin[1:] == begin[:-1]) & (end[1:] < end[:-1])))
    if out_of_order.size:
        w = int(out_of_order[0]) + 1
        raise TraceError(
            f"trace {path!r}: window {w} covers steps [{begin[w]}, {end[w]}) after window {w - 1} at "
            f"[{begin[w - 1]}, {end[w - 1]}): expected windows in step order (sorted by step_begin, then step_end)"
        )


def load_trace(path: str) -> Trace:
    """Read and check a trace; raises :class:`TraceError` naming the file and the problem.

    Every way a file can be unreadable or ill-typed ends here as a ``TraceError`` (a
    ``ValueError``), never as numpy's or zipfile's own exception: callers (``eplb-plan``,
    ``eplb-coordinator --trace``) print it as one line. Pickles are never loaded."""
    arrays = _read_arrays(path)
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise TraceError(f"trace {path!r} lacks arrays {missing}")
    checked = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
    raw = [k for k in _REQUIRED if k not in checked]
    if raw:  # a zip member not named *.npy: np.load hands back its bytes
        raise TraceError(f"trace {path!r}: members {raw} are not .npy arrays")
    _check_format_version(path, checked["format_version"])
    loads = _check_loads(path, checked["loads"])
    windows = [_check_window_array(path, k, checked[k], loads.shape[0]) for k in _REQUIRED[2:]]
    _check_step_order(path, windows[0], windows[1])
    return Trace(loads, *windows)


OPEN_WINDOW_STEPS = 256
"""Steps past a recorded window's end after which it is closed with the ranks it got."""

PART_BYTES = 64 * 2**20
"""Window loads one trace file holds before the recorder goes on in the next part.

The recorder keeps the windows of the file it writes in memory and rewrites that file at
every flush (a trace is one ``.npz``, written whole and atomically). One file for the whole
deployment grew without bound: about 245 KB a window for 60 layers of 512 experts, a window
per 10 steps, tens of GB a day, and every flush compressing all of it again. Parts keep both
the memory and a flush's work to this size, however long the deployment runs."""


def part_path(path: str, part: int) -> str:
    """``--record``'s ``part``-th file: ``t.npz`` first, then ``t.part1.npz``, ``t.part2.npz``..."""
    if part == 0:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.part{part}{ext}"


class TraceRecorder:
    """Accumulates per-window logical loads from load reports and writes the trace, in parts
    of at most ``part_bytes`` of window loads (:data:`PART_BYTES`): ``path`` holds the first
    windows, :func:`part_path` names the next files, each a trace of its own."""

    def __init__(
        self, path: str, num_layers: int, num_logical: int, world_size: int, part_bytes: int = PART_BYTES
    ) -> None:
        self.first_path = path
        self.world_size = world_size
        self.shape = (num_layers, num_logical)
        self.part_bytes = part_bytes
        self.part = 0
        self._windows_in_full_parts = 0
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
        # close older windows once every rank has moved past them, or once reports begin
        # OPEN_WINDOW_STEPS past their end (a rank that left, or report boundaries that differ
        # between ranks, would keep them open, in memory and out of every flush, for good)
        stale = step_begin - OPEN_WINDOW_STEPS
        complete = len(window["ranks"]) == self.world_size
        if complete or any(k[1] <= stale for k in self._open):
            for key in sorted(k for k in self._open if k[1] <= (step_begin if complete else stale)):
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
    def path(self) -> str:
        """The file the next flush writes (the current part)."""
        return part_path(self.first_path, self.part)

    @property
    def files(self) -> list[str]:
        """Every file written so far, first to current."""
        return [part_path(self.first_path, k) for k in range(self.part + (1 if self._closed else 0))]

    @property
    def windows(self) -> int:
        return self._windows_in_full_parts + len(self._closed)

    def flush(self, close_all: bool = False) -> None:
        """Write every closed window (and the open ones if ``close_all``) atomically."""
        if close_all:
            for key in sorted(self._open):
                self._close(key)
        with self._write_lock:
            self._write()

    def _write(self) -> None:
        """Write the current part; once it holds ``part_bytes`` of loads, start the next one.

        Runs in an executor thread while the event loop appends closed windows: it writes a
        snapshot and, at a part's end, drops exactly the windows that snapshot held."""
        snapshot = list(self._closed)
        if not snapshot:
            return
        self._write_part(self.path, snapshot)
        if sum(w["loads"].nbytes for w in snapshot) >= self.part_bytes:
            del self._closed[: len(snapshot)]
            self._windows_in_full_parts += len(snapshot)
            self.part += 1

    def _write_part(self, path: str, windows: list[dict]) -> None:
        rows = sorted(windows, key=lambda w: (w["step_begin"], w["step_end"]))
        tmp = f"{path}.tmp.npz"
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
        os.replace(tmp, path)
