"""``eplb-plan``'s progress lines on stderr.

A plan for 1000 layers of 2048 slots takes seconds to minutes of CPU, reading and writing tens
of MB of JSON included; without a word on the terminal a user cannot tell a slow run from a hung
one. Each phase gets one line, and the policy's pass over the layers one line per block of layers
at most every ``interval_s``, each with the time since the start. Lines, not a redrawn line: the
same text reads well on a terminal, in a log file and in CI output; under ``--log-format json``
each line is a JSON object like every other line of the service's commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

from eplb_service import logutil

PLAN_TAG = "plan"
"""The ``tag`` of ``eplb-plan``'s JSON lines (the coordinator's commands tag theirs ``coordinator``,
``status``, ``keygen``)."""
PROGRESS_INTERVAL_S = 1.0
"""Least time between two layer-count lines (the first and the last are always shown)."""


class PlanProgress:
    """Progress of one ``eplb-plan`` run, written to ``stream`` when ``enabled``.

    Attributes:
        stream: where the lines go (stderr: stdout may carry the plan itself).
        enabled: ``False`` makes every method a no-op.
        interval_s: least seconds between two layer-count lines.
        fmt: ``text`` (``eplb-plan: ... (1.2 s)``) or ``json`` (one JSON object per line, tag ``plan``).
    """

    def __init__(
        self,
        stream: TextIO,
        enabled: bool,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        fmt: str = "text",
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval_s = interval_s
        self.fmt = fmt
        self._clock = clock
        self._start = clock()
        self._last_layers_at: float | None = None

    def _line(self, text: str) -> None:
        message = f"{text} ({self._clock() - self._start:.1f} s)"
        logutil.command_line("eplb-plan", logging.INFO, message, message, self.fmt, PLAN_TAG, self.stream)

    def phase(self, text: str) -> None:
        """One line for a phase starting (``reading --load x.npz``, ``writing --out y.json``)."""
        if self.enabled:
            self._line(text)

    def layers(self, done: int, total: int) -> None:
        """``planning: layers done/total``, at most every ``interval_s`` but always at 0 and at the end."""
        if not self.enabled:
            return
        now = self._clock()
        last = self._last_layers_at
        if done not in (0, total) and last is not None and now - last < self.interval_s:
            return
        self._last_layers_at = now
        self._line(f"planning: layers {done}/{total}")
