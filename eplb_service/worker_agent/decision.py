"""The commit decision of one plan batch: a single record per plan, first writer wins.

A rank applies a plan if and only if the plan's record holds ``commit``. The vote's
all-reduce gathers every rank's entry step, readiness and row digests; a rank that sees
all of them good *proposes* ``commit S``, a rank that gives up (fence timeout, failed or
abandoned vote, an abort request) proposes ``abort``. The record keeps the first proposal
and answers every later one with it, so every rank reads the same decision whatever the
delays, and the all-reduce alone no longer decides anything (a gloo all-reduce can still
complete on a rank that joins after its peers gave up).

The record lives in the rendezvous store that rank 0's worker hosts (``rendezvous``): a
TCPStore server runs on a C++ thread of that process and needs no GIL, and if that process
is gone or frozen, serving on every rank is stalled on it already (its all-to-alls need
it). Store calls block without a bound while the server is frozen, so they run on a
:class:`Decider` thread of their own; the callers wait on the ticket with their own bounds.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from eplb_service.logutil import rank_logger


class DecisionUnavailable(RuntimeError):
    """The decision record could not be reached (its host is gone, or the link broke)."""


@dataclass(frozen=True)
class Decision:
    """What the record holds for one plan."""

    commit: bool
    commit_step: int = -1
    """The step at whose boundary every rank applies the plan (``commit`` only)."""
    rank: int = -1
    """The rank whose proposal was first."""
    reason: str = ""
    """Why ``abort`` was proposed."""
    code: str = ""
    """``protocol.AbortCode`` of an ``abort``."""

    @classmethod
    def commit_at(cls, step: int, rank: int) -> "Decision":
        return cls(True, step, rank, "", "")

    @classmethod
    def abort(cls, rank: int, reason: str, code: str = "other") -> "Decision":
        return cls(False, -1, rank, reason, code)

    def encode(self) -> bytes:
        kind = "commit" if self.commit else "abort"
        return f"{kind}|{self.commit_step}|{self.rank}|{self.code}|{self.reason}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Decision":
        try:
            kind, step, rank, code, reason = raw.decode().split("|", 4)
            if kind not in ("commit", "abort"):
                raise ValueError(kind)
            return cls(kind == "commit", int(step), int(rank), reason, code)
        except ValueError as exc:
            raise DecisionUnavailable(
                f"decision record holds {raw[:80]!r}, expected 'commit|S|rank||' or 'abort|-1|rank|code|reason'"
            ) from exc

    def describe(self) -> str:
        if self.commit:
            return f"commit at step {self.commit_step} (first proposed by rank {self.rank})"
        return f"abort (rank {self.rank}: {self.reason})"


class DecisionRecord(Protocol):
    """Where the decisions of one deployment live."""

    address: str

    def propose(self, plan_id: int, proposal: Decision) -> Decision:
        """Write ``proposal`` unless a decision is there already; return what is there now.

        May block while the record's host does not answer; raises
        :class:`DecisionUnavailable` when the link to it is broken.
        """


class StoreDecisionRecord:
    """Decision records as keys of a torch TCPStore (``compare_set`` with an empty expected value)."""

    KEY = "eplb/decision/{plan_id}"

    def __init__(self, host: str, port: int, connect_timeout_s: float = 10.0) -> None:
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self._timeout = datetime.timedelta(seconds=connect_timeout_s)
        self._client = None
        self._lock = threading.Lock()

    def propose(self, plan_id: int, proposal: Decision) -> Decision:
        with self._lock:  # one TCPStore client is not meant for concurrent calls
            try:
                if self._client is None:
                    import torch.distributed as dist  # agents have torch; importing it is cheap there

                    self._client = dist.TCPStore(self.host, self.port, None, False, timeout=self._timeout)
                raw = self._client.compare_set(self.KEY.format(plan_id=plan_id), "", proposal.encode())
            except Exception as exc:  # DistNetworkError, DistStoreError, RuntimeError: all mean "not now"
                self._client = None
                raise DecisionUnavailable(
                    f"decision record at {self.address} unreachable: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
        return Decision.decode(raw)


class Ticketed(Protocol):
    """What the decider needs of a commit ticket (``serving_hooks.CommitTicket``)."""

    plan_id: int

    def resolve(self, decision: Decision) -> bool: ...

    @property
    def is_decided(self) -> bool: ...


class Decider:
    """One thread per agent that talks to the decision record.

    ``submit`` never blocks: the agent thread and the serving thread (at a fence timeout)
    both call it. Proposals for a ticket are retried, on a broken link, until the ticket is
    decided; the first answer resolves the ticket. ``stop`` ends the thread once every
    proposal submitted before it has its answer: an armed ticket's serving thread waits for
    that answer (bounded), whether or not the agent around it is still running.
    """

    def __init__(self, rank: int, retry_max_s: float = 1.0) -> None:
        self.rank = rank
        self.log = rank_logger(__name__, rank)
        self.retry_max_s = retry_max_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.unreachable_since: float | None = None
        """Monotonic time since which the record has not answered (``None`` while it does)."""
        self.last_error = ""

    def start(self) -> "Decider":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"eplb-decider-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)

    def submit(self, ticket: Ticketed, record: DecisionRecord, proposal: Decision) -> None:
        self._queue.put((ticket, record, proposal))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._stop.is_set():
                    return
                continue
            ticket, record, proposal = item
            backoff_s = 0.02
            while not ticket.is_decided:
                try:
                    decision = record.propose(ticket.plan_id, proposal)
                except DecisionUnavailable as exc:
                    if self.unreachable_since is None:
                        self.unreachable_since = time.monotonic()
                        self.log.error(
                            "plan %d: %s; retrying (the serving thread waits at the fence, bounded)",
                            ticket.plan_id,
                            exc,
                        )
                    self.last_error = str(exc)
                    time.sleep(backoff_s)
                    backoff_s = min(self.retry_max_s, backoff_s * 2)
                    continue
                except Exception:  # a bug here must not kill the thread that every commit needs
                    self.log.exception("plan %d: proposing %s failed; retrying", ticket.plan_id, proposal)
                    time.sleep(backoff_s)
                    backoff_s = min(self.retry_max_s, backoff_s * 2)
                    continue
                self.unreachable_since = None
                ticket.resolve(decision)
                break
