"""When a loop was not scheduled: silence from a peer is measured in the time the loop ran.

A process that is not scheduled for seconds (a host whose CPUs vLLM keeps busy, a paused VM,
SIGSTOP, a thread whose GIL another holds through a long C call) hears nothing in that time,
and its peer often said nothing either: the peer answers what this process sends, and it sent
nothing. Measured on the wall clock, that silence read as the peer's: agents reopened their
connection on waking, a coordinator declared every rank dead. So each loop notes when it ran
late (:meth:`LoopStalls.ran`), and silence is the time between two moments minus the stalls in
between (:meth:`LoopStalls.scheduled_s`). A peer that is really gone is still found, later by
at most the stalls' length.

Pure: the caller passes the clock's readings.
"""

from __future__ import annotations

import collections

STALLS_EXCUSED_UP_TO = 4
"""At least ``1 / STALLS_EXCUSED_UP_TO`` of a wall-time silence counts whatever the stalls
(:meth:`LoopStalls.silence_s`): a loop late on every tick (a host starved for good, ticks 0.3 s
late every 0.32 s) would otherwise excuse nearly all of it, and find a peer that is really gone
many times later than its limit."""

STALLS_KEPT = 256
"""Stalls remembered; an older one no longer shortens any silence (a silence longer than 256
stalls of its loop is counted a little long, never short)."""


class LoopStalls:
    """Intervals in which a loop ran later than it meant to by more than ``slack_s``."""

    def __init__(self, slack_s: float) -> None:
        if not slack_s >= 0:
            raise ValueError(f"slack_s must be >= 0 seconds, got {slack_s!r}")
        self.slack_s = slack_s
        """Lateness up to this is ordinary scheduling jitter and counts as time the loop ran."""
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=STALLS_KEPT)
        self.total_s = 0.0
        """Seconds of stalls seen so far (a counter for metrics and logs)."""

    def ran(self, meant_at: float, now: float) -> float:
        """The loop meant to run at ``meant_at`` and runs at ``now``; returns the stall noted (0: none)."""
        late = now - meant_at
        if late <= self.slack_s:
            return 0.0
        if self._stalls and meant_at < self._stalls[-1][1]:  # overlapping reports of one stall
            meant_at = self._stalls[-1][1]
            late = now - meant_at
            if late <= 0:
                return 0.0
        self._stalls.append((meant_at, now))
        self.total_s += late
        return late

    def scheduled_s(self, since: float, now: float) -> float:
        """Seconds from ``since`` to ``now`` in which the loop ran (stalls taken out), at least 0."""
        stalled = 0.0
        for begin, end in reversed(self._stalls):
            if end <= since:
                break
            stalled += min(end, now) - max(begin, since)
        return max(0.0, now - since - stalled)

    def silence_s(self, since: float, now: float) -> float:
        """A peer's silence from ``since`` to ``now``: the time the loop ran, and at least
        ``1 / STALLS_EXCUSED_UP_TO`` of the wall time (so it is never excused for good)."""
        return max(self.scheduled_s(since, now), (now - since) / STALLS_EXCUSED_UP_TO)
