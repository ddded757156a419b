"""Joining the side communicator a ``CommInit`` names, without stalling the agent thread.

Building a communicator is a rendezvous of every rank and can take up to the transport
timeout when a peer is gone; the agent thread must keep talking to the coordinator in the
meantime or it would be declared dead itself, so the build runs on a helper thread. A
``CommInit`` that arrives during a build waits for it to end, unless it is the very
rendezvous being attempted (a duplicate): retrying that alone would leave this rank one
attempt behind. A rendezvous is attempted once: a copy of a ``CommInit`` whose build already
ran (the coordinator sends it again to ranks that seem to miss it) is ignored, since joining
the same keys again after the others left could only fail; a failed generation is replaced
by the coordinator's next. The decision record lives in the same store, so it is (re)opened
here too.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from eplb_service import protocol
from eplb_service.worker_agent.decision import DecisionRecord, StoreDecisionRecord
from eplb_service.worker_agent.transport import Transport, TransportError


class SideLink:
    def __init__(self, rank: int, transport: Transport, log: logging.LoggerAdapter) -> None:
        self.rank, self.transport, self.log = rank, transport, log
        self.record_factory: Callable[[str, int, float], DecisionRecord] = StoreDecisionRecord
        """Builds the decision record from a ``CommInit``'s store address (tests swap in their own)."""
        self.record: DecisionRecord | None = None
        """The decision record in the current rendezvous store."""
        self.connecting: threading.Thread | None = None
        self._tried: collections.deque = collections.deque(maxlen=16)
        """The rendezvous this link has attempted (built or failed), newest last."""
        self._pending: protocol.CommInit | None = None
        self._attempted: protocol.CommInit | None = None
        self._built: protocol.CommInit | None = None

    @property
    def ready(self) -> bool:
        return self.transport.connected and not (self.connecting is not None and self.connecting.is_alive())

    @property
    def built(self) -> protocol.CommInit | None:
        """The rendezvous of the communicator built last (``None`` before any)."""
        return self._built

    def is_current(self, comm: protocol.CommInit) -> bool:
        """Already built from this very rendezvous (a repeated ``CommInit``)."""
        return comm == self._built and self.ready

    def is_stale(self, comm: protocol.CommInit) -> bool:
        """An older ``CommInit`` than one this link attempted or queued (same coordinator, lower
        generation), or a rendezvous attempted already: a late, duplicated or reordered copy.
        Acting on it would tear down the newer communicator and join a rendezvous its peers left."""
        if comm in self._tried:
            return True
        newer = [c for c in (*self._tried, self._pending) if c is not None and c.nonce == comm.nonce]
        return any(c.generation > comm.generation for c in newer)

    def connect(self, comm: protocol.CommInit, timeout_s: float) -> None:
        """Start building ``comm``'s communicator (or queue it behind the build in progress)."""
        if self.record is None or self.record.address != f"{comm.store_host}:{comm.store_port}":
            self.record = self.record_factory(comm.store_host, comm.store_port, timeout_s)
        if self.connecting is not None and self.connecting.is_alive():
            if comm != self._attempted:
                self._pending = comm
            return
        if comm in self._tried:  # a generation is one rendezvous: built, failed or torn down, never rejoined
            self.log.debug(
                "ignored a second copy of side communicator generation %d (attempted already)", comm.generation
            )
            return
        self.transport.abort()

        def build() -> None:
            t0 = time.monotonic()
            try:
                self.transport.connect(comm, self.rank, timeout_s)
            except TransportError as exc:
                self.log.error("could not build the side communicator: %s", exc)
                return
            self._built = comm
            self.log.info(
                "side communicator generation %d ready (%s, %.2fs)",
                comm.generation,
                self.transport.name,
                time.monotonic() - t0,
            )

        self._attempted = comm
        self._tried.append(comm)
        self.connecting = threading.Thread(target=build, name=f"eplb-connect-{self.rank}", daemon=True)
        self.connecting.start()

    def take_pending(self) -> protocol.CommInit | None:
        """A ``CommInit`` that waited for the previous build, once that build has ended."""
        if self._pending is not None and not (self.connecting and self.connecting.is_alive()):
            comm, self._pending = self._pending, None
            return comm
        return None
