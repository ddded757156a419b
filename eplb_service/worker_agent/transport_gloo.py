"""CPU side transport: a gloo process group built for the agents alone.

It is bootstrapped on the rendezvous store rank 0's worker hosts (prefixed by generation), never a
subgroup of the host process's default group: inside vLLM that group is vLLM's serving
group, and rearrangement collectives must never interleave with serving ones.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.protocol import CommInit
from eplb_service.worker_agent.transport import P2POp, Transport, TransportError

log = logging.getLogger(__name__)


class GlooTransport(Transport):
    name = "gloo"

    def __init__(self) -> None:
        self._group: dist.ProcessGroupGloo | None = None
        self._store: dist.Store | None = None
        self._generation = -1
        self._timeout_s = 30.0
        self._waiter: threading.Thread | None = None
        """The thread waiting on an exchange's ops, until they all completed (see :meth:`exchange`)."""

    @property
    def connected(self) -> bool:
        return self._group is not None

    @property
    def generation(self) -> int:
        return self._generation

    def connect(self, comm: CommInit, rank: int, timeout_s: float) -> None:
        self.abort()
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(comm.store_host, comm.store_port, comm.world_size, False, timeout=timeout)
            prefixed = dist.PrefixStore(comm.key_prefix, store)
            self._group = dist.ProcessGroupGloo(prefixed, rank, comm.world_size, timeout)
        except Exception as exc:  # torch raises RuntimeError/DistStoreError with the cause
            raise TransportError(
                f"gloo side group generation {comm.generation} at {comm.store_host}:{comm.store_port} failed: {exc}"
            ) from exc
        self._store = store
        self._generation = comm.generation
        self._timeout_s = timeout_s

    def store_keys(self, comm: CommInit) -> list[str]:
        return gloo_store_keys(comm)

    def _require(self) -> dist.ProcessGroupGloo:
        if self._group is None:
            raise TransportError("side communicator is not connected (aborted or never built)")
        return self._group

    def exchange(self, ops: list[P2POp], pace_s: float = 0.0) -> None:
        """The ops wait on a helper thread while this one polls: the agent thread keeps its
        heartbeats and reads the coordinator's messages (an ``AbortPlan``, a ``Plan`` sent again
        to a late peer) for as long as the group waits (gloo's send and receive works only
        complete inside ``wait``, so they cannot be polled). Blocked for the transport timeout
        instead, a rank went silent past its silence limit, reopened its socket and lost what
        was in flight. A wait left behind (the hook raised) keeps :attr:`busy` true: the agent
        then tears the group down, so its ops never match a later group's."""
        group = self._require()
        try:
            works = [
                group.send([op.tensor], op.peer, op.tag) if op.is_send else group.recv([op.tensor], op.peer, op.tag)
                for op in ops
            ]
        except Exception as exc:
            raise TransportError(f"gloo exchange of {len(ops)} ops failed: {exc}") from exc
        errors: list[BaseException] = []

        def wait_all() -> None:
            try:
                for work in works:
                    work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the agent thread
                errors.append(exc)

        waiter = threading.Thread(target=wait_all, name="eplb-gloo-wait", daemon=True)
        self._waiter = waiter
        waiter.start()
        deadline = time.monotonic() + self._timeout_s + 1.0  # gloo's own timeout ends each op first
        while waiter.is_alive():
            if time.monotonic() > deadline:
                raise TransportError(f"gloo exchange of {len(ops)} ops did not complete within {self._timeout_s}s")
            self._poll()
            waiter.join(0.002)
        self._waiter = None
        if errors:
            raise TransportError(f"gloo exchange of {len(ops)} ops failed: {errors[0]}") from errors[0]
        self._wait_on_host(pace_s)  # gloo is synchronous: the throttle's gap is a host wait

    @property
    def busy(self) -> bool:
        return self._waiter is not None

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        group = self._require()
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).copy())
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        deadline = time.monotonic() + self._timeout_s
        try:
            work = group.allreduce([tensor], opts)
            while not work.is_completed():  # poll, so the agent's hook runs while it waits
                if time.monotonic() > deadline:
                    raise TransportError(f"gloo vote all-reduce did not complete within {self._timeout_s}s")
                self._poll()
                time.sleep(0.001)
            work.wait()
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"gloo vote all-reduce failed: {exc}") from exc
        return tensor.numpy()

    def synchronize(self) -> None:
        return None

    def abort(self) -> None:
        group, self._group, self._store = self._group, None, None
        self._waiter = None
        if group is not None:
            # Tearing a gloo group down can block while a peer is gone; the agent thread
            # must never wait on it, so the group is dropped here and torn down aside.
            box = [group]
            del group
            thread = threading.Thread(target=_abort_quietly, args=(box,), name="eplb-gloo-abort", daemon=True)
            with _TEARDOWNS_LOCK:
                _TEARDOWNS.add(thread)
            thread.start()


def gloo_store_keys(comm: CommInit) -> list[str]:
    """What a gloo group built on ``comm``'s prefix writes: each rank's address, under the
    group's one device (``<prefix>/0/<rank>``; a test pins this against torch's real keys)."""
    return [f"{comm.key_prefix}/0/{r}" for r in range(comm.world_size)]


LAST_REFERENCE_WAIT_S = 120.0
"""How long the teardown thread waits to hold the group's last reference (see :func:`_abort_quietly`)."""


def _abort_quietly(box: list) -> None:
    """Abort the group, then be the one that destroys it.

    Destroying a gloo group whose collective is still pending blocks until that collective
    ends or times out, and whoever drops the last reference pays for it. It was the agent
    thread (2.7 s, when the frames of a vote it had left let go of the group): long enough
    for the coordinator to declare the rank dead and for the rank to reopen its connection,
    after which the ranks attempted side-communicator generations out of step for good. So
    this thread keeps the group until every other reference is gone, then drops it here.
    """
    group = box.pop()
    try:
        group.abort()
    except Exception as exc:  # already broken: nothing left to tear down
        log.debug("gloo abort: %s", exc)
    deadline = time.monotonic() + LAST_REFERENCE_WAIT_S
    # Two references: ``group`` here and getrefcount's own argument.
    while sys.getrefcount(group) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    del group
    with _TEARDOWNS_LOCK:
        _TEARDOWNS.discard(threading.current_thread())


EXIT_TEARDOWN_WAIT_S = 5.0
"""How long a process that is exiting waits for its groups' teardowns (see :func:`finish_teardowns`)."""

_TEARDOWNS: set[threading.Thread] = set()
_TEARDOWNS_LOCK = threading.Lock()


def finish_teardowns(timeout_s: float = EXIT_TEARDOWN_WAIT_S) -> int:
    """Let the teardown threads destroy their groups before the interpreter goes; returns how
    many were still running after ``timeout_s``.

    Registered with :mod:`atexit`. A teardown thread is a daemon: left running at exit, it was
    frozen holding a live gloo group, and the C++ runtime then ended the process with
    ``terminate called without an active exception`` (exit -6, about one simulated run in ten,
    always the rank that had aborted a generation). By exit time the agent and its frames are
    gone, so after a collection the group's last other reference is, and the thread finishes.
    """
    gc.collect()
    deadline = time.monotonic() + timeout_s
    with _TEARDOWNS_LOCK:
        pending = list(_TEARDOWNS)
    for thread in pending:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread in pending)


atexit.register(finish_teardowns)
