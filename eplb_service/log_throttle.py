"""Lines that would repeat once per heartbeat, report or retry, summarised.

At 64-256 ranks a fault that lasts (a coordinator down for a minute, an agent sending malformed
reports, a rank stuck retrying) made every process write one line per heartbeat or report:
thousands of lines a minute that bury the one saying what went wrong. A :class:`LogThrottle`
keeps, per condition (a ``key``, e.g. ``("bad_load_report", rank)``):

- the first occurrence, at its own level, as it was;
- then at most one line per ``interval_s``: the latest occurrence at its level, with how many
  were left out since the line before;
- one line when the condition clears (:meth:`clear`), with how long it lasted and how many
  occurrences it had; or, when occurrences just stop, one summary from :meth:`tick` of those
  left out, after which the next occurrence counts as a first again.

It only decides which lines are written: nothing the caller does (replies, counters, metrics)
depends on it. Not thread-safe; each owner calls it from its one thread (the agent's thread,
the coordinator's event loop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Hashable

DEFAULT_INTERVAL_S = 60.0
"""At most one line per condition per minute after its first: at 256 ranks, ~4 lines a second
across a deployment whose every rank has the fault, instead of one per heartbeat per rank."""


@dataclass
class _Condition:
    since: float
    """When its first occurrence (of this episode) was logged."""
    last_line: float
    """When a line for it was last written."""
    last_seen: float
    """When it last occurred."""
    level: int
    msg: str
    args: tuple
    """The latest occurrence, for :meth:`LogThrottle.tick`'s summary."""
    total: int = 1
    """Occurrences this episode."""
    left_out: int = 0
    """Occurrences not written since ``last_line``."""


class LogThrottle:
    """Per-key rate limit over a logger (or a :class:`~eplb_service.logutil.RankAdapter`, whose tag
    every line keeps). ``clock`` is injectable for tests."""

    def __init__(
        self,
        log: logging.Logger | logging.LoggerAdapter,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r}: expected a positive number of seconds")
        self.log, self.interval_s, self.clock = log, interval_s, clock
        self._conditions: dict[Hashable, _Condition] = {}

    def active(self, key: Hashable) -> bool:
        """Whether ``key`` occurred and has not cleared (nor gone quiet and been summarised)."""
        return key in self._conditions

    def report(self, key: Hashable, level: int, msg: str, *args: object) -> bool:
        """One occurrence of ``key``; ``msg % args`` is its line. Returns whether a line was written."""
        now = self.clock()
        cond = self._conditions.get(key)
        if cond is None:
            self._conditions[key] = _Condition(now, now, now, level, msg, args)
            self.log.log(level, msg, *args)
            return True
        cond.total += 1
        cond.last_seen, cond.level, cond.msg, cond.args = now, level, msg, args
        if now - cond.last_line < self.interval_s:
            cond.left_out += 1
            return False
        self.log.log(level, msg + " (%s)", *args, self._repeats(cond, now))
        cond.last_line, cond.left_out = now, 0
        return True

    def clear(self, key: Hashable, msg: str, *args: object, level: int = logging.INFO) -> bool:
        """The condition ``key`` is over: writes ``msg % args`` with its duration and count, if it was
        active (returns whether it was). A caller with a line of its own for the recovery logs that
        when this returns False, so the recovery is said once."""
        cond = self._conditions.pop(key, None)
        if cond is None:
            return False
        now = self.clock()
        lasted = f"after {cond.total} occurrence{'s' if cond.total != 1 else ''} over {now - cond.since:.0f}s"
        if cond.left_out:
            lasted += f", {cond.left_out} of them not logged"
        self.log.log(level, msg + " (%s)", *args, lasted)
        return True

    def settle(self, key: Hashable) -> None:
        """The condition ``key`` is over and the caller's own line says so (a rank registered): only
        the occurrences left out since its last line are written, if any, so none goes uncounted."""
        cond = self._conditions.pop(key, None)
        if cond is not None and cond.left_out:
            self.log.log(cond.level, cond.msg + " (%s; over now)", *cond.args, self._repeats(cond, self.clock()))

    def settle_where(self, belongs: Callable[[Hashable], bool]) -> None:
        """:meth:`settle` every active condition whose key ``belongs`` (e.g. all of one rank's)."""
        for key in [key for key in self._conditions if belongs(key)]:
            self.settle(key)

    def tick(self) -> None:
        """Summarise conditions that went quiet: one whose left-out occurrences are older than
        ``interval_s`` gets its line now (it may never occur again to carry it), and one quiet for
        ``interval_s`` with nothing left out is forgotten, so that its next occurrence is a first."""
        now = self.clock()
        for key, cond in list(self._conditions.items()):
            if now - cond.last_line < self.interval_s:
                continue
            if cond.left_out:
                self.log.log(cond.level, cond.msg + " (%s)", *cond.args, self._repeats(cond, now))
                cond.last_line, cond.left_out = now, 0
            elif now - cond.last_seen >= self.interval_s:
                del self._conditions[key]

    def _repeats(self, cond: _Condition, now: float) -> str:
        return (
            f"{cond.left_out} more like this not logged in the last {now - cond.last_line:.0f}s; "
            f"{cond.total} since it began {now - cond.since:.0f}s ago"
        )
