"""Generations of the agents' side communicator, and the ``CommInit`` that builds each.

Every teardown (an aborted batch, a rank that came back) needs a fresh generation, so a
rebuilt communicator never reads a dead one's keys. The rendezvous store is rank 0's, and
outlives coordinator restarts whose generations count from 1 again: a random nonce per
coordinator process names the keys too.
"""

from __future__ import annotations

import secrets
import time

from eplb_service import protocol


class SideComm:
    def __init__(self, world_size: int, transport_timeout_s: float) -> None:
        self.world_size = world_size
        self.transport_timeout_s = transport_timeout_s
        self.generation = 0
        self.sent_generation = -1
        """The generation whose ``CommInit`` went out last (-1: none since the ranks changed)."""
        self.sent_at = 0.0
        self._resent_at = 0.0
        self.nonce = secrets.token_hex(4)

    def next(self, store: tuple[str, int]) -> protocol.CommInit:
        """A new generation on rank 0's ``store``; the caller sends it to every rank."""
        self.generation += 1
        self.sent_generation = self.generation
        self.sent_at = time.monotonic()
        return self.current(store)

    def current(self, store: tuple[str, int]) -> protocol.CommInit:
        host, port = store
        return protocol.CommInit(
            generation=self.generation, store_host=host, store_port=port, world_size=self.world_size, nonce=self.nonce
        )

    @property
    def current_was_sent(self) -> bool:
        return self.sent_generation == self.generation

    def invalidate(self) -> None:
        """The ranks changed: the next complete registry gets a new generation."""
        self.sent_generation = -1

    def resend_due(self, now: float, every_s: float = 0.5) -> bool:
        """Time to send the current ``CommInit`` again to the ranks that have not built it.

        Only while the others still wait in the rendezvous (the transport timeout): a rank
        whose copy was lost then joins the same generation instead of failing it for all.
        """
        if not self.current_was_sent or now - self.sent_at > self.transport_timeout_s:
            return False
        if now - max(self.sent_at, self._resent_at) < every_s:
            return False
        self._resent_at = now
        return True

    def retry_due(self, now: float) -> bool:
        """Time for another generation when the last one was not built everywhere.

        2 x the transport timeout: a rank still in its previous (failing) attempt is free
        again before the next generation, so no rank stays one attempt behind.
        """
        return now - self.sent_at > 2 * self.transport_timeout_s + 2.0
