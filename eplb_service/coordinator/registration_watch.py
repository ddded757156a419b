"""Which ranks a partly registered deployment is waiting for, said in the log while it waits.

No plan starts until every one of the ``--dp x --tp`` ranks is registered and alive. A
deployment where some never register (a worker that did not load the plugin, another
``EPLB_SERVICE_ENDPOINT``, a coordinator started with a larger ``--dp``) used to say nothing
at all: the coordinator logged the ranks that came and then stayed silent, and only a status
query, read rank by rank, showed who was missing. Pure: the shell feeds it the live ranks on
its tick and logs what it returns.
"""

from __future__ import annotations

from typing import Iterable

WAIT_BEFORE_WARNING_S = 30.0
"""How long some, not all, ranks may be registered before the first warning: vLLM starts its
workers within seconds of each other, and a rank that restarts is back within a few."""
REPEAT_S = 300.0
"""While the wait lasts, the warning again this often; after ``WAIT_BEFORE_WARNING_S`` when the
missing ranks changed (ranks arriving one by one write a line per 30 s, not per rank)."""


def rank_spans(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``: 200 missing ranks of 256 stay one short line."""
    spans: list[str] = []
    ordered = sorted(set(ranks))
    start = prev = None
    for rank in ordered + [None]:
        if prev is not None and (rank is None or rank != prev + 1):
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = rank
        elif start is None:
            start = rank
        prev = rank
    return ", ".join(spans)


class RegistrationWatch:
    """The ranks missing from a deployment that has some registered, over time."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._since: float | None = None
        """When the current wait began (some ranks alive, not all); None while none or all are."""
        self._warned_at: float | None = None
        self._warned_missing: frozenset[int] = frozenset()

    def missing(self, alive: Iterable[int]) -> list[int]:
        """Ranks of ``[0, world_size)`` without a live agent."""
        return sorted(set(range(self.world_size)) - set(alive))

    def tick(self, now: float, alive: Iterable[int]) -> tuple[str, bool] | None:
        """A line to log now, and whether it is a warning (else it says the wait is over), or None."""
        alive = set(alive)
        missing = self.missing(alive)
        if not alive or not missing:
            ended = self._warned_at is not None and not missing
            waited = now - self._since if self._since is not None else 0.0
            self._since, self._warned_at, self._warned_missing = None, None, frozenset()
            if ended:
                return f"every rank of {self.world_size} is registered, after waiting {waited:.0f}s", False
            return None
        if self._since is None:
            self._since = now
        waited = now - self._since
        if waited < WAIT_BEFORE_WARNING_S:
            return None
        if self._warned_at is not None:
            changed = frozenset(missing) != self._warned_missing
            if now - self._warned_at < (WAIT_BEFORE_WARNING_S if changed else REPEAT_S):
                return None
        self._warned_at, self._warned_missing = now, frozenset(missing)
        return (
            f"waiting for rank{'s' if len(missing) > 1 else ''} {rank_spans(missing)} to register: "
            f"{len(alive)} of {self.world_size} EP ranks "
            f"(--dp x --tp) registered, {waited:.0f}s since the wait began; no plan starts until every rank is "
            "registered (is each worker's agent pointed at this coordinator, and is --dp x --tp the deployment's?)"
        ), True
