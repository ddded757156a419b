"""The coordinator's open-file limit (``ulimit -n``): fitted at start, watched while it runs.

Every rank holds one connection (one file descriptor) to the coordinator, and a rank that
reopens its connection holds a second one until the first is gone; status clients, HTTP
scrapes and ``--record`` take a few more. At the limit, ZeroMQ cannot accept a connection:
its I/O thread retries the accept in a busy loop (a core at 100%), ranks that reconnect and
``eplb-coordinator status`` get no answer, and nothing says why. So:

- at start the soft limit is raised toward the hard one when it is below what ``--dp`` needs
  (as any server may, without privileges), and a hard limit that cannot hold one connection
  per rank refuses the start, naming both limits and the need;
- while running, the descriptors in use are counted every few seconds (``/proc/self/fd``;
  elsewhere the watch is off) and a count near the limit is logged as an error naming it,
  once per episode.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from dataclasses import dataclass

PER_RANK_FDS = 2
"""A rank's connection, and the one it opens while its old one is still closing."""
HEADROOM_FDS = 16
"""Status clients, HTTP scrapes, the ``--record`` file, the policy's executor."""
MIN_FDS_BEYOND_RANKS = 8
"""Below one connection per rank plus this, the coordinator cannot serve ``--dp`` ranks at all."""
CHECK_EVERY_S = 2.0
NEAR_LIMIT = 0.9
"""Share of the limit in use at which the error is logged."""
CLEAR_BELOW = 0.8
"""Share under which the episode ends (so a count hovering at the threshold logs once)."""
FD_DIR = "/proc/self/fd"


class OpenFileLimitError(RuntimeError):
    """The hard open-file limit cannot hold one connection per rank; the message names both."""


def open_fds(limit: int | None = None) -> int | None:
    """File descriptors this process holds now, or ``None`` where ``/proc`` does not say.

    Listing the directory takes a descriptor itself: at the limit it fails with ``EMFILE``,
    which says the count is ``limit``."""
    try:
        return len(os.listdir(FD_DIR))
    except OSError as exc:
        return limit if exc.errno == errno.EMFILE else None


@dataclass(frozen=True)
class OpenFileBudget:
    soft: int
    """The soft limit in force after :func:`fit_open_file_limit` (``RLIM_INFINITY`` as is)."""
    raised_from: int | None
    """The soft limit before, when it was raised."""
    needed: int
    """Descriptors in use at start plus ``PER_RANK_FDS`` per rank plus ``HEADROOM_FDS``."""


DAEMON_SOFT_LIMIT = 65536
"""The soft open-file limit the ``eplb-coordinator`` daemon raises itself to (never past the hard limit)."""


def raise_soft_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted``, within the hard limit;
    returns (before, after).

    Every agent, status client, HTTP client and connection still in its ZeroMQ handshake holds a
    descriptor. systemd and most shells give 1024 soft (with a hard limit far above), so a few
    hundred idle connections from the network left none for agents; the hard limit is what the
    administrator allows, and the soft one is for the process to raise (as nginx and Go do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a sandbox that refuses it: serve with what there is
            return soft, soft
        return soft, target
    return soft, soft


def fit_open_file_limit(world_size: int, in_use: int | None = None, wanted: int = 0) -> OpenFileBudget:
    """Raise the soft ``RLIMIT_NOFILE`` to what ``world_size`` ranks need, or to ``wanted`` where
    that is more (up to the hard limit).

    Raises :class:`OpenFileLimitError` when the soft limit in force after that (the hard limit at
    most; the old soft limit where raising it was refused) is below one connection per rank plus
    ``MIN_FDS_BEYOND_RANKS``; a limit between that and the comfortable need is kept (the caller
    warns: it works until ranks reconnect all at once)."""
    in_use = open_fds() if in_use is None else in_use
    base = in_use if in_use is not None else 32
    needed = base + PER_RANK_FDS * world_size + HEADROOM_FDS
    before, soft = raise_soft_limit(max(needed, wanted))
    raised_from = before if soft != before else None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    minimum = base + world_size + MIN_FDS_BEYOND_RANKS
    if soft != resource.RLIM_INFINITY and soft < minimum:
        raise OpenFileLimitError(
            f"open-file limit (ulimit -n) {soft} (hard limit {_limit(hard)}) is too low for --dp {world_size}: "
            f"{base} descriptors are open already and every rank needs one connection, so at least {minimum} "
            f"(better {needed}); raise it (ulimit -n, LimitNOFILE= in systemd, --ulimit nofile= in docker)"
        )
    return OpenFileBudget(soft=soft, raised_from=raised_from, needed=needed)


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class OpenFileWatch:
    """Logs an error when the descriptors in use come near the soft limit; once per episode."""

    def __init__(self, budget: OpenFileBudget, log: logging.LoggerAdapter) -> None:
        self.budget = budget
        self._log = log
        self._next_check = 0.0
        self.near_limit = False
        self.in_use: int | None = None

    def tick(self, now: float) -> None:
        limit = self.budget.soft
        if now < self._next_check or limit == resource.RLIM_INFINITY:
            return
        self._next_check = now + CHECK_EVERY_S
        self.in_use = in_use = open_fds(limit)
        if in_use is None:
            return
        if not self.near_limit and in_use >= NEAR_LIMIT * limit:
            self.near_limit = True
            self._log.error(
                "%d of %d open files in use (ulimit -n): at the limit, connections from ranks and status "
                "clients are refused (ZeroMQ retries the accept in a busy loop); raise the open-file limit",
                in_use,
                limit,
            )
        elif self.near_limit and in_use < CLEAR_BELOW * limit:
            self.near_limit = False
            self._log.info("%d of %d open files in use (ulimit -n): below the limit again", in_use, limit)
