"""Checking that every rank counts the same steps: the step clock the commit relies on.

Plans commit "at the boundary before step S" on every rank, so step ``k`` must be the same
forward pass everywhere. Serving keeps the ranks in lockstep (every MoE layer's all-to-all
needs all of them), so the same forward pass ends at (nearly) the same moment on every rank.
A rank that counts one extra step (a dummy or warm-up step counted on it alone) ends its
step ``k + 1`` when the others end step ``k``: at every commit it would apply the plan one
forward pass apart from them, and the outputs of that pass would be wrong.

Each heartbeat carries probes (``protocol.StepClock``): the end times of the steps
``k - R .. k + R`` around probe steps ``k`` (multiples of ``PROBE_EVERY``). For a rank and a
reference rank sharing a probe, the offset ``d`` is the shift that lines their end times
up: ``other[k + d] ~ ref[k]``. A probe is *decisive* when one shift fits within a third of a
step and every other shift misses by more than two thirds; probes taken while the ranks do
not step together (idle, or jitter as large as a step) decide nothing.

Times are compared as wall time (each agent sends ``wall - monotonic``); on one host that
is exact, across hosts it relies on NTP being well inside one step. A host clock off by a
step or more reads as its rank counting apart; the halt that causes lifts once the probes
agree again (:meth:`StepClockWatch.aligned_again`), while a rank that really counts apart
never does.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np

from eplb_service import protocol

PROBE_EVERY = protocol.CLOCK_PROBE_EVERY
"""Probe steps are the multiples of this (the wire protocol refuses others)."""
PROBE_RADIUS = protocol.CLOCK_PROBE_RADIUS
"""Each probe carries the end times of ``2 * PROBE_RADIUS + 1`` steps around it."""


def probe_offset(ref: np.ndarray, other: np.ndarray, fit: float = 1 / 3, miss: float = 2 / 3) -> int | None:
    """The shift ``d`` with ``other[m + d] ~ ref[m]`` for two probes of the same step, or ``None``.

    ``ref``, ``other``: ``[2R + 1]`` end times of steps ``k - R .. k + R`` on two ranks.
    Decisive when the best shift's median gap is under ``fit`` of a typical step and every
    other shift's over ``miss`` of it; a probe with a time that is not finite decides nothing.
    Plain Python lists, not numpy: seven medians of a few numbers each, once per probe and
    rank, cost numpy's per-call overhead many times over (9x slower at 256 ranks).
    """
    a_list, b_list = np.asarray(ref, dtype=np.float64).tolist(), np.asarray(other, dtype=np.float64).tolist()
    n = len(a_list)
    if len(b_list) != n or n < 3 or not (all(map(math.isfinite, a_list)) and all(map(math.isfinite, b_list))):
        return None
    delta = _median([a_list[i + 1] - a_list[i] for i in range(n - 1)])
    if not delta > 0:
        return None
    radius = (n - 1) // 2
    errors: dict[int, float] = {}
    for d in range(-radius, radius + 1):
        a = a_list[max(0, -d) : n - max(0, d)]
        b = b_list[max(0, d) : n - max(0, -d)]
        if len(a) >= 3:
            errors[d] = _median([abs(y - x) for x, y in zip(a, b)])
    if len(errors) < 2:
        return None
    ranked = sorted(errors, key=lambda d: errors[d])
    best, runner_up = ranked[0], ranked[1]
    if errors[best] < fit * delta and errors[runner_up] > miss * delta:
        return best
    return None


def _median(values: list[float]) -> float:
    """``np.median`` of a short list of finite floats, to the bit (the mean of the middle two when even)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class RankClock:
    probes: dict[int, np.ndarray] = field(default_factory=dict)
    """Probe step -> ``[2R + 1]`` wall end times (the newest ``keep`` probes)."""
    verdicts: collections.deque[tuple[int, int]] = field(default_factory=lambda: collections.deque(maxlen=8))
    """``(probe step, offset)`` of the decisive comparisons with the reference rank, oldest first."""
    compared: set[int] = field(default_factory=set)
    version: int = 0
    """Bumped whenever ``probes`` change: a verdict computed at the same versions still holds."""


@dataclass(frozen=True)
class ClockState:
    """What is known of one rank's clock against the reference rank."""

    rank: int
    reference: int
    offset: int | None
    """Steps this rank counts ahead of the reference (0: aligned), ``None`` while unverified."""
    probes: tuple[int, ...] = ()
    """The probe steps the verdict rests on."""


class StepClockWatch:
    """Collects the ranks' probes and tells, per rank, whether its clock matches rank ``reference``'s."""

    def __init__(self, keep: int = 64, confirm: int = 2) -> None:
        self.keep = keep
        self.confirm = confirm
        """Decisive probes in a row that must agree before an offset is declared."""
        self.clocks: dict[int, RankClock] = {}
        self._states: dict[int, tuple[tuple[int, int, int], ClockState]] = {}
        """Rank -> ((reference, its version, the rank's version), verdict): every heartbeat asks for
        every rank's verdict, and only a rank whose or whose reference's probes changed has anything
        new to compare (without this, a heartbeat cost O(ranks) comparisons: O(ranks**2) a second)."""

    def forget(self, rank: int) -> None:
        """A rank re-registered (a new process may count from anywhere): start over."""
        self.clocks.pop(rank, None)
        self._states.clear()
        for clock in self.clocks.values():
            clock.compared.clear()

    def observe(self, rank: int, probe_steps: list[int], times: list[list[float]], wall_minus_mono: float) -> None:
        clock = self.clocks.setdefault(rank, RankClock())
        clock.version += 1
        for step, row in zip(probe_steps, times):
            clock.probes[step] = np.asarray(row, dtype=np.float64) + wall_minus_mono
        for old in sorted(clock.probes)[: -self.keep]:
            del clock.probes[old]
            clock.compared.discard(old)

    def states(self, ranks: list[int]) -> dict[int, ClockState]:
        """The verdict for every rank in ``ranks`` against the lowest of them."""
        if not ranks:
            return {}
        reference = min(ranks)
        ref = self.clocks.get(reference)
        out = {reference: ClockState(reference, reference, 0)}
        for rank in ranks:
            if rank == reference:
                continue
            clock = self.clocks.get(rank)
            if ref is None or clock is None:
                out[rank] = ClockState(rank, reference, None)
                continue
            key = (reference, ref.version, clock.version)
            cached = self._states.get(rank)
            if cached is not None and cached[0] == key:
                out[rank] = cached[1]
                continue
            for step in sorted(set(ref.probes) & set(clock.probes) - clock.compared):
                clock.compared.add(step)
                offset = probe_offset(ref.probes[step], clock.probes[step])
                if offset is not None:
                    clock.verdicts.append((step, offset))
            out[rank] = self._verdict(rank, reference, clock)
            self._states[rank] = (key, out[rank])
        return out

    def aligned_again(self, ranks: list[int]) -> bool:
        """Every rank's latest ``confirm`` decisive probes put it at offset 0 against the lowest rank:
        the evidence an offset needs to be declared, the other way round (see :meth:`states`)."""
        if len(ranks) < 2:
            return False
        self.states(ranks)  # compare the probes that came since
        for rank in ranks[1:]:
            latest = list(self.clocks[rank].verdicts)[-self.confirm :] if rank in self.clocks else []
            if len(latest) < self.confirm or any(offset for _, offset in latest):
                return False
        return True

    def _verdict(self, rank: int, reference: int, clock: RankClock) -> ClockState:
        if not clock.verdicts:
            return ClockState(rank, reference, None)
        latest = list(clock.verdicts)[-self.confirm :]
        offsets = {offset for _, offset in latest}
        steps = tuple(step for step, _ in latest)
        if latest[-1][1] == 0:
            return ClockState(rank, reference, 0, steps[-1:])
        if len(latest) == self.confirm and len(offsets) == 1:
            return ClockState(rank, reference, latest[-1][1], steps)
        return ClockState(rank, reference, None, steps)


def probes_from_ring(
    end_times: np.ndarray, steps_done: int, every: int = PROBE_EVERY, radius: int = PROBE_RADIUS
) -> tuple[list[int], list[list[float]]]:
    """The probes a rank can send: every probe step whose whole window is in the ring.

    ``end_times[k % len]`` is when step ``k`` ended; steps ``< steps_done`` have ended. The
    serving thread keeps writing while this reads: the newest step is left out, and windows
    reaching back further than the ring (less one lap of margin) are skipped.
    """
    size = end_times.size
    newest = steps_done - 2  # the step being recorded right now may be half written
    oldest = max(radius, steps_done - size + every)
    first = -(-oldest // every) * every
    steps, rows = [], []
    for k in range(first, newest - radius + 1, every):
        if k - radius < 0:
            continue
        idx = np.arange(k - radius, k + radius + 1) % size
        steps.append(k)
        rows.append(end_times[idx].tolist())
    return steps, rows
