"""Rank 0 deletes the rendezvous-store keys that no rank can need any more.

Every plan leaves its decision record (``eplb/decision/<plan_id>``) and every side
communicator generation its rendezvous keys (``eplb/<nonce>/gen<G>/...``, listed by
``Transport.store_keys``) in the store rank 0's worker hosts. Nothing else deletes them,
and a deployment runs for weeks: without this the store grows by a few keys per plan and
per rebuild, for ever.

Rank 0 tracks, in the order it received them, the plans and the generations it was sent.
When a vote on plan ``P`` over generation ``G`` returns every rank ready, every rank has
finished every earlier ticket and is connected on ``G``, so the records of the plans
received before ``P`` and the keys of the generations received before ``G`` are garbage
(the argument is in PROTOCOL.md, "Store keys: what is deleted and why it is safe"). The
deletes run on a thread of their own: a store call must never delay the agent thread or a
decision.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Protocol

from eplb_service import protocol
from eplb_service.logutil import rank_logger
from eplb_service.worker_agent.decision import StoreDecisionRecord

MAX_TRACKED = 4096
"""Plans (and generations) tracked at most while no vote proves every rank past them. Only a
deployment where 4096 plans in a row fail before their vote reaches it; the oldest are then
forgotten (their keys stay), rather than this list growing."""


class KeyStore(Protocol):
    """The part of a torch ``Store`` the janitor uses."""

    def delete_key(self, key: str) -> bool: ...


class StoreJanitor:
    """Rank 0's bookkeeping of the keys in the store it hosts, and the thread that deletes them.

    ``saw_plan``, ``saw_generation`` and ``everyone_past`` are called on the agent thread;
    the deletes happen on the janitor's thread, started on first use.
    """

    def __init__(self, store: KeyStore, store_port: int, rank: int = 0) -> None:
        self.store = store
        self.store_port = store_port
        """Only generations rendezvousing at this port are this store's (a ``CommInit`` could
        name another store, e.g. one hosted by an earlier rank-0 process)."""
        self.log = rank_logger(__name__, rank)
        self._plans: collections.deque[int] = collections.deque(maxlen=MAX_TRACKED)
        self._generations: collections.deque[tuple[protocol.CommInit, tuple[str, ...]]] = collections.deque(
            maxlen=MAX_TRACKED
        )
        self._jobs: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.deleted_keys = 0
        """Keys the store held and this janitor deleted (a missing key is not counted)."""

    def saw_plan(self, plan_id: int) -> None:
        """A ``Plan`` reached rank 0: its decision record may be written from now on."""
        if plan_id not in self._plans:
            self._plans.append(plan_id)

    def saw_generation(self, comm: protocol.CommInit, keys: list[str]) -> None:
        """A ``CommInit`` reached rank 0; ``keys``: what its rendezvous writes, on every rank."""
        if comm.store_port != self.store_port or any(seen == comm for seen, _ in self._generations):
            return
        self._generations.append((comm, tuple(keys)))

    def everyone_past(self, plan_id: int, comm: protocol.CommInit | None) -> int:
        """Every rank entered the vote on ``plan_id`` ready, over ``comm``'s communicator.

        Queues the deletion of the decision records of the plans rank 0 received before
        ``plan_id`` and of the keys of the generations it received before ``comm``; returns
        how many keys were queued. ``plan_id`` and ``comm`` themselves stay (a late rank may
        still read the record; the communicator is in use): a later vote deletes them.
        """
        keys: list[str] = []
        if plan_id in self._plans:
            while self._plans[0] != plan_id:
                keys.append(StoreDecisionRecord.KEY.format(plan_id=self._plans.popleft()))
        if comm is not None and any(seen == comm for seen, _ in self._generations):
            while self._generations[0][0] != comm:
                keys.extend(self._generations.popleft()[1])
        if keys:
            self._start()
            self._jobs.put(keys)
        return len(keys)

    def stop(self) -> None:
        """End the thread once the deletes queued so far are done."""
        if self._thread is not None:
            self._jobs.put(None)

    def join(self, timeout_s: float) -> None:
        """Wait for the queued deletes (tests, shutdown)."""
        if self._thread is not None:
            self.stop()
            self._thread.join(timeout_s)
            self._thread = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eplb-store-janitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            keys = self._jobs.get()
            if keys is None:
                return
            deleted = 0
            for key in keys:
                try:
                    deleted += bool(self.store.delete_key(key))
                except Exception as exc:  # the store is this process's own: only at shutdown
                    self.log.warning("could not delete store key %r: %s; it stays", key, exc)
            self.deleted_keys += deleted
            self.log.debug("deleted %d of %d rendezvous-store keys no rank needs any more", deleted, len(keys))
