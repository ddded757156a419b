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

import logging
from collections.abc import Callable

import zmq

from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory, ipc_socket_identity, prepare_ipc_dir

CHECK_EVERY_S = 1.0
"""How often the socket file is looked at: one ``stat``, and the longest an agent is kept out."""


class SocketFileWatch:
    """Binds ``endpoint`` again whenever the socket file this coordinator bound is gone.

    ``bind``: binds the coordinator's socket to the endpoint once more; ZeroMQ keeps the
    connections of the earlier bind, so the agents connected already see nothing.
    """

    def __init__(
        self, endpoint: str, identity: tuple[int, int] | None, bind: Callable[[], None], log: logging.LoggerAdapter
    ) -> None:
        self.endpoint = endpoint
        self.identity = identity
        """``(device, inode)`` of the socket file bound last; ``None`` for ``tcp://`` (nothing to watch)."""
        self._bind = bind
        self._log = log
        self._next_check = 0.0
        self._replaced_by: tuple[int, int] | None = None
        self.rebinds = 0

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
            self._bind()
        except (UnsafeSocketDirectory, zmq.ZMQError) as exc:
            self._log.error(
                "the socket file of %s was removed and binding it again failed (%s); retrying in %.0fs",
                self.endpoint,
                exc,
                CHECK_EVERY_S,
            )
            return
        self.identity = ipc_socket_identity(self.endpoint)
        self._replaced_by = None
        self.rebinds += 1
        self._log.warning(
            "the socket file of %s was removed while this coordinator ran; bound it again "
            "(open connections were kept; agents and status clients reach this coordinator again)",
            self.endpoint,
        )
