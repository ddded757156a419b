"""The agent's connection to the coordinator: one DEALER socket, messages decoded at the edge.

Every socket gets a fresh random identity, so a reopened agent never collides with its own
old pipe, and nobody can guess a live agent's route. Sends never block (a full queue drops
the message and counts it); every frame received refreshes ``last_heard``, which the agent
watches to reopen a connection that went silent. Silence counts only the time the agent
listened (:meth:`CoordinatorLink.silent_s`): while its thread was not scheduled it heard
nothing, and sent nothing for the coordinator to answer.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time

import zmq

from eplb_service import protocol
from eplb_service.log_throttle import LogThrottle
from eplb_service.loop_stalls import LoopStalls
from eplb_service.security import ClientCurve
from eplb_service.zmq_tcp import allow_ipv6

LISTEN_SLACK_S = 0.25
"""Lateness of the agent's listening (a poll returning past its timeout, a gap between two polls)
that is ordinary: more is a stall, left out of the coordinator's silence. Generous, since a gap
may also be the agent's own work (what waited meanwhile is read at the next poll); a silence
counted short only delays a reopen."""


class CoordinatorLink:
    def __init__(
        self,
        rank: int,
        endpoint: str,
        curve: ClientCurve | None,
        stats: collections.Counter,
        log: logging.LoggerAdapter | LogThrottle,
    ) -> None:
        self.rank, self.endpoint, self.curve, self.stats = rank, endpoint, curve, stats
        self.throttle = log if isinstance(log, LogThrottle) else LogThrottle(log)
        """Bad frames come one per message while the coordinator sends them: first one, then a count."""
        self._ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.last_heard = 0.0
        self.stalls = LoopStalls(LISTEN_SLACK_S)
        """When the agent did not listen (its thread not scheduled, or busy past the slack)."""
        self._listened_at = time.monotonic()
        """When the last :meth:`receive` returned."""

    def open(self) -> None:
        """A fresh DEALER with a fresh identity (closing the old one first)."""
        if self._ctx is None:
            self._ctx = zmq.Context()
        if self.sock is not None:
            self.sock.close(linger=0)
        sock = allow_ipv6(self._ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.IDENTITY, f"rank-{self.rank}-{secrets.token_hex(6)}".encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoint)
        self.sock = sock
        self.last_heard = time.monotonic()

    def send(self, message: protocol.Message) -> None:
        try:
            self.sock.send(protocol.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["send_dropped"] += 1

    def receive(self, poll_ms: int) -> list[protocol.Message]:
        """Everything that arrived within ``poll_ms`` (0: what is there now), decoded; bad frames are
        counted and dropped."""
        sock = self.sock
        start = time.monotonic()
        self.stalls.ran(self._listened_at, start)
        try:
            if not sock.poll(poll_ms, zmq.POLLIN):
                return []
            return self._drain(sock)
        finally:
            self._listened_at = time.monotonic()
            self.stalls.ran(start + poll_ms / 1000, self._listened_at)

    def silent_s(self, now: float, since: float | None = None) -> float:
        """Seconds without a frame from the coordinator, counting only the time this agent listened
        (``since``: from then on, if later than the last frame heard).

        A process not scheduled for seconds (a starved host, SIGSTOP, its GIL held through a long
        call) found that silence on waking and took it for the coordinator's: every agent reopened
        at once, before reading what waited in its socket, and a plan staging was aborted. Part of
        the wall-time silence always counts (:meth:`LoopStalls.silence_s`): a thread late on every
        poll (starved for good) would otherwise excuse nearly all of a dead coordinator's silence.

        The time since the last :meth:`receive` returned is listening time only up to the slack:
        a thread stopped between reading the socket and this check (SIGSTOP landing there) woke
        to a silence that no poll had yet measured as its own stall, and reopened its connection."""
        self.stalls.ran(self._listened_at, now)
        return self.stalls.silence_s(self.last_heard if since is None else max(since, self.last_heard), now)

    def _drain(self, sock: zmq.Socket) -> list[protocol.Message]:
        messages: list[protocol.Message] = []
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            self.last_heard = time.monotonic()
            try:
                messages.append(protocol.decode(frame))
            except protocol.ProtocolError as exc:
                self.stats["bad_messages"] += 1
                self.throttle.report("bad_frame", logging.ERROR, "dropped a bad message from the coordinator: %s", exc)

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.sock.close(linger=200)
        finally:
            if self._ctx is not None:
                self._ctx.term()
