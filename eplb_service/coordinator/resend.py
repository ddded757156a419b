"""When the coordinator sends a plan's message again to the ranks that have not answered it.

ZeroMQ loses messages: a connection an agent reopens after a silence drops what was in
flight, so do a coordinator restart and a full high-water mark. A plan whose ``Plan`` or
``VoteNow`` must reach every one of N ranks, sent once, is lost with the first lost copy: at
8 ranks and 3 % loss about one plan in two aborted. The messages are idempotent at the agent
(keyed by plan id: a ``Plan`` seen already is answered again with the answer it got, a
``VoteNow`` seen already is answered with the ``Voted`` of a decided vote or else ignored, an
``AbortPlan`` only ever asks for ``abort``), so sending them again to the ranks still missing is
always safe, and turns one lost copy into a delay of one interval.

Pure: the plan runner asks which ranks are due and does the sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

PLAN_FIRST_S = 0.25
"""First re-send of a ``Plan`` to a rank with no ``Staged``/``Failed`` yet: well inside the transport
timeout its peers wait in the exchange for it (seconds), so a lost copy joins the same exchange."""
PLAN_MAX_S = 2.0
"""The re-send interval doubles up to this. A rank whose heartbeat says it stages the plan gets
no copy (a large plan stages for many seconds); one that staged it and whose ``Staged`` was lost
gets one, answered with its ``Staged`` again."""
VOTE_FIRST_S = 0.25
"""First re-send of a ``VoteNow`` (at most a quarter of the fence timeout): the ranks already in
the vote wait at their fence for the missing one, serving paused, until it joins or the fence
timeout makes the plan abort."""
VOTE_MAX_S = 0.5
ABORT_FIRST_S = 0.25
"""First re-send of an ``AbortPlan`` asked for in the vote, to the ranks with no outcome yet: a rank
that never got its ``VoteNow`` holds its staged plan until its own ``staged_timeout_s`` otherwise,
and the plan cannot settle before every rank has answered."""
ABORT_MAX_S = 2.0


@dataclass
class ResendSchedule:
    """Per rank, when its copy is due again: ``first_s`` after ``since``, then at doubling
    intervals up to ``max_s``."""

    since: float
    first_s: float
    max_s: float
    _due: dict[int, tuple[float, float]] = field(default_factory=dict)
    """rank -> (next due time, the interval after it)."""

    def due(self, now: float, waiting: Iterable[int]) -> list[int]:
        """The ranks of ``waiting`` whose copy is due at ``now`` (each then scheduled again)."""
        ranks = []
        for rank in waiting:
            at, interval = self._due.get(rank, (self.since + self.first_s, self.first_s))
            if now < at:
                continue
            interval = min(2 * interval, self.max_s)
            self._due[rank] = (now + interval, interval)
            ranks.append(rank)
        return ranks

    def due_now(self, rank: int, now: float) -> None:
        """``rank``'s copy is due at ``now``, its interval back to the first: what went to it was
        lost with the socket it reopened, so waiting out its back-off would only delay the plan."""
        self._due[rank] = (now, self.first_s)
