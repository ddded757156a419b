"""Keeps a running coordinator reachable at its ``ipc://`` socket file.

The file is the only way in: an agent that reopens its connection (after 4 silent heartbeats),
a new vLLM worker, ``eplb-coordinator status``. Something that removes it while the coordinator
runs (``rm -rf`` of the run directory, ``systemd-tmpfiles`` cleaning ``/tmp``) leaves the
connections already open working and everything else refused, with no error anywhere, and the
next coordinator started on that endpoint finds it free: two coordinators, each with part of the
deployment. So the file is checked once a second and bound again when it is gone (the listeners of
removed files are bounded: :data:`MAX_LISTENERS`). One that another process bound in its place
(another inode) is not ours to take back while something listens on it: it is reported, naming
the listener, and the coordinator says it is unreachable (``/readyz``, the status document).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import zmq

from eplb_service.coordinator.socket_dir import (
    EndpointUnavailable,
    UnsafeSocketDirectory,
    ipc_socket_identity,
    prepare_ipc_dir,
    socket_file_path,
    unix_socket_listening,
)
from eplb_service.coordinator.socket_owner import describe_pid, other_listeners

CHECK_EVERY_S = 1.0
"""How often the socket file is looked at: one ``stat``, and the longest an agent is kept out."""

MAX_LISTENERS = 16
"""Listeners kept on the endpoint before they are released. A bind after a removal adds one, and
the listener of the removed file cannot simply be closed: ZeroMQ closes the connections it
accepted with it, and the agents' reconnect loses what was in flight (measured, 2 ranks with the
file removed every 1.5 s: 2 of 9 plans aborted, against 0 of 14 while the old listeners stayed).
So they stay while agents are registered, one descriptor each, up to this many; at the cap (a
file removed again and again, a cleaner on a timer) they are all closed at the next bind made
while no plan is in flight (the agents reconnect between plans), and with no agent registered at
every bind."""


class SocketFileWatch:
    """Binds ``endpoint`` again on ``sock`` whenever the socket file this coordinator bound is gone.

    ``agents_registered``: whether closing the old listeners would cut registered agents off
    (see :data:`MAX_LISTENERS`); with none, every bind after a removal releases the old ones.
    ``plan_in_flight``: whether a plan is between its proposal and its outcome; the listeners at
    the cap are not released then (the reconnect could abort it), but at the next bind after.
    """

    def __init__(
        self,
        endpoint: str,
        sock: zmq.Socket,
        agents_registered: Callable[[], bool],
        log: logging.LoggerAdapter,
        plan_in_flight: Callable[[], bool] = lambda: False,
    ) -> None:
        self.endpoint = endpoint
        self.identity = ipc_socket_identity(endpoint)
        """``(device, inode)`` of the socket file bound last; ``None`` for ``tcp://`` (nothing to watch)."""
        self._sock = sock
        self._agents_registered = agents_registered
        self._plan_in_flight = plan_in_flight
        self._log = log
        self._next_check = 0.0
        self._replaced_by: tuple[int, int] | None = None
        self.rebinds = 0
        self.listeners = 1
        """Listeners ``sock`` holds on the endpoint: the one bound last, and those of removed files
        kept for the connections they accepted."""
        self.unreachable: str | None = None
        """Why what connects now cannot reach this coordinator (its socket file replaced); ``None`` when it can."""

    def tick(self, now: float) -> None:
        if self.identity is None or now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        found = ipc_socket_identity(self.endpoint)
        if found == self.identity:
            return
        if found is not None and not self._stale_replacement(found):
            self._report_replaced(found)
            return
        try:
            prepare_ipc_dir(self.endpoint)
            released = self._bind_again()
        except (UnsafeSocketDirectory, zmq.ZMQError) as exc:
            self._log.error(
                "the socket file of %s was removed and binding it again failed (%s); retrying in %.0fs",
                self.endpoint,
                exc,
                CHECK_EVERY_S,
            )
            return
        # Removed again already (a cleaner still at work): keeping the old identity, the next check binds again,
        # where None would have stopped the watch for good.
        self.identity = ipc_socket_identity(self.endpoint) or self.identity
        self._replaced_by = None
        self.unreachable = None
        self.rebinds += 1
        if released and self._agents_registered():
            self._log.warning(
                "the socket file of %s was removed while this coordinator ran, %d times since the last release: "
                "bound it again and closed the listeners of the removed files with the connections they held "
                "(at most %d are kept, released between plans); agents reconnect within seconds",
                self.endpoint,
                released,
                MAX_LISTENERS,
            )
            return
        self._log.warning(
            "the socket file of %s was removed while this coordinator ran; bound it again (%s; agents and "
            "status clients reach this coordinator again)",
            self.endpoint,
            "no agent was registered" if released else "open connections were kept",
        )

    def _stale_replacement(self, found: tuple[int, int]) -> bool:
        """Whether the file another process put at the path is left by one that stopped (nobody
        listens): then it is removed, and the caller binds the path again. A live listener's file
        is never taken: whichever of the two an operator keeps, agents must not flip between them."""
        path = socket_file_path(self.endpoint)
        try:
            if path is None or unix_socket_listening(path):
                return False
            os.unlink(path)
        except FileNotFoundError:
            pass
        except (EndpointUnavailable, OSError):  # cannot tell: a live listener, for all we know
            return False
        self._log.warning(
            "the socket file of %s that another process bound (inode %d) has no listener any more: "
            "removed it to bind the endpoint again",
            self.endpoint,
            found[1],
        )
        return True

    def _report_replaced(self, found: tuple[int, int]) -> None:
        """One error per replacing file, naming its listener when ``/proc`` shows it; ``unreachable``
        says it to ``/readyz`` and the status document until the endpoint is this coordinator's again."""
        if found == self._replaced_by:
            return
        self._replaced_by = found
        path = socket_file_path(self.endpoint) or self.endpoint
        pids = other_listeners(path)
        who = f"listened on by {', '.join(map(describe_pid, pids))}" if pids else "its listener's pid could not be read"
        stop = f"stop pid {pids[0]}" if len(pids) == 1 else "stop the process listening there"
        mine = self.identity[1] if self.identity is not None else "?"
        self.unreachable = (
            f"socket file {path} was replaced by another process's socket (inode {found[1]}, this coordinator bound "
            f"inode {mine}; {who})"
        )
        self._log.error(
            "%s: agents, new workers and status clients that connect from now on reach that process, not this "
            "coordinator (pid %d), which is no longer reachable at %s and does not take the path back from a live "
            "listener; keep one of the two: %s (this coordinator binds the path again within %.0fs of it being "
            "free), or stop this coordinator",
            self.unreachable,
            os.getpid(),
            self.endpoint,
            stop,
            CHECK_EVERY_S,
        )

    def _bind_again(self) -> int:
        """Bind a new listener; returns how many old ones were closed first (see :data:`MAX_LISTENERS`)."""
        at_cap = self.listeners >= MAX_LISTENERS and not self._plan_in_flight()
        released = 0
        if at_cap or not self._agents_registered():
            with contextlib.suppress(zmq.ZMQError):  # ENOENT: none left, a bind after the last release failed
                self._sock.unbind(self.endpoint)  # every listener of this endpoint, and what each accepted
            released, self.listeners = self.listeners, 0
        self._sock.bind(self.endpoint)
        self.listeners += 1
        return released
