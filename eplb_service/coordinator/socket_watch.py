"""Keeps a running coordinator reachable at its ``ipc://`` socket file.

The file is the only way in: an agent that reopens its connection (after 4 silent heartbeats),
a new vLLM worker, ``eplb-coordinator status``. Something that removes it while the coordinator
runs (``rm -rf`` of the run directory, ``systemd-tmpfiles`` cleaning ``/tmp``) leaves the
connections already open working and everything else refused, with no error anywhere, and the
next coordinator started on that endpoint finds it free: two coordinators, each with part of the
deployment. So the file is checked once a second and bound again when it is gone; one that
another process bound in its place (another inode) is not ours to take back, and is reported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import zmq

from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory, ipc_socket_identity, prepare_ipc_dir

CHECK_EVERY_S = 1.0
"""How often the socket file is looked at: one ``stat``, and the longest an agent is kept out."""

MAX_LISTENERS = 4
"""Listeners kept on the endpoint at most. A bind after a removal adds one, and the listener of
the removed file cannot simply be closed: ZeroMQ closes the connections it accepted with it, and
the agents' reconnect loses what was in flight (measured, 2 ranks with the file removed every
1.5 s: 2 of 9 plans aborted, against 0 of 14 while the old listeners stayed). So they stay while
agents are registered, one descriptor each, up to this many; at the cap (a file removed again and
again, a cleaner on a timer) or with no agent registered, they are all closed at the next bind."""


class SocketFileWatch:
    """Binds ``endpoint`` again on ``sock`` whenever the socket file this coordinator bound is gone.

    ``agents_registered``: whether closing the old listeners would cut registered agents off
    (see :data:`MAX_LISTENERS`); with none, every bind after a removal releases the old ones.
    """

    def __init__(
        self,
        endpoint: str,
        sock: zmq.Socket,
        agents_registered: Callable[[], bool],
        log: logging.LoggerAdapter,
    ) -> None:
        self.endpoint = endpoint
        self.identity = ipc_socket_identity(endpoint)
        """``(device, inode)`` of the socket file bound last; ``None`` for ``tcp://`` (nothing to watch)."""
        self._sock = sock
        self._agents_registered = agents_registered
        self._log = log
        self._next_check = 0.0
        self._replaced_by: tuple[int, int] | None = None
        self.rebinds = 0
        self.listeners = 1
        """Listeners ``sock`` holds on the endpoint: the one bound last, and those of removed files
        kept for the connections they accepted."""

    def tick(self, now: float) -> None:
        if self.identity is None or now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        found = ipc_socket_identity(self.endpoint)
        if found == self.identity:
            return
        if found is not None:
            if found != self._replaced_by:
                self._replaced_by = found
                self._log.error(
                    "the socket file of %s was replaced by another process's socket (inode %d, this coordinator "
                    "bound inode %d): agents that connect from now on reach that process, not this coordinator; "
                    "stop one of the two",
                    self.endpoint,
                    found[1],
                    self.identity[1],
                )
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
        self.rebinds += 1
        if released and self._agents_registered():
            self._log.warning(
                "the socket file of %s was removed while this coordinator ran, %d times since the last release: "
                "bound it again and closed the listeners of the removed files with the connections they held "
                "(at most %d are kept); agents reconnect within seconds, a plan in flight may abort",
                self.endpoint,
                MAX_LISTENERS,
                MAX_LISTENERS,
            )
            return
        self._log.warning(
            "the socket file of %s was removed while this coordinator ran; bound it again (%s; agents and "
            "status clients reach this coordinator again)",
            self.endpoint,
            "no agent was registered" if released else "open connections were kept",
        )

    def _bind_again(self) -> bool:
        """Bind a new listener; returns whether the old ones were closed first (see :data:`MAX_LISTENERS`)."""
        release = self.listeners >= MAX_LISTENERS or not self._agents_registered()
        if release:
            with contextlib.suppress(zmq.ZMQError):  # ENOENT: none left, a bind after the last release failed
                self._sock.unbind(self.endpoint)  # every listener of this endpoint, and what each accepted
            self.listeners = 0
        self._sock.bind(self.endpoint)
        self.listeners += 1
        return release
