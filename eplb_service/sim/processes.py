"""Rank processes on one host: spawn them, wait for their results while polling, stop them.

The simulated deployment and the GPU benchmarks (``bench/gpu``) each start one process per
EP rank, wait for one result per rank on a queue while the coordinator (or nothing) runs on
this process, notice a rank that died, and never leave a process behind. This is that loop,
once.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a store the ranks connect to)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal this process gets when the process that started it dies."""


def end_with_parent() -> None:
    """Make this rank process end when the process that started it ends, however that ends.

    A parent stopped cleanly stops its ranks (:meth:`RankProcesses.stop`); one killed outright
    (SIGKILL, an OOM kill, a crash) cannot, and its ranks were left running, blocked on a peer or
    a store that was gone, for good (found after 11 minutes). On Linux the kernel sends SIGKILL
    then; elsewhere nothing changes. Called first thing in the child.

    The kernel's parent is the process that forked this one: the spawning process under
    ``spawn``, the fork server under ``forkserver`` (which ends with the process that started it).
    Under ``forkserver`` it is not multiprocessing's parent: compared with that, every rank of the
    tests' clusters took itself for an orphan and exited at once. An orphan is told by its
    re-parenting, or by the pipe multiprocessing keeps to the process that started it."""
    import multiprocessing

    starter = multiprocessing.parent_process()  # the process that asked for this one
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the parent's stop is the only way out
        return
    # Gone before the prctl took effect (a rank is still importing for a second or more after its
    # start): re-parented to init or a subreaper, or the starter's pipe closed.
    if os.getppid() != parent or parent == 1 or (starter is not None and not starter.is_alive()):
        os._exit(1)
    if starter is not None and starter.pid != parent:  # forked by a fork server: watch the starter itself
        threading.Thread(target=_exit_when_gone, args=(starter,), name="end-with-starter", daemon=True).start()


def _exit_when_gone(starter) -> None:
    """End this process once ``starter`` (the process that asked for it) has ended.

    A fork server's children hold the write end of the pipe by which the server learns that its
    own starter is gone (multiprocessing passes it to every child), so with a rank alive the
    server never ends and the kernel's signal never comes: a simulation killed outright left its
    fork server and ranks running (found by the test that kills one). The starter's sentinel
    closes when it ends, however it ends."""
    from multiprocessing.connection import wait

    wait([starter.sentinel])
    os._exit(1)


class RankProcessesDied(RuntimeError):
    """A rank process exited with an error before it reported its result."""


def drain(q) -> list:
    """Everything a multiprocessing queue holds right now, without blocking."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


class RankProcesses:
    """One spawned process per rank, each expected to put one result on :attr:`results`.

    Use: build, create what the ranks share through :attr:`ctx`, :meth:`start` with a
    target and its arguments per rank (:attr:`results` among them), :meth:`wait` (async)
    or :meth:`wait_blocking`, and :meth:`stop` in a ``finally``.

    Args:
        world_size: ranks, hence processes.
        name: prefix of the process names (``<name>-<rank>``), which errors show.
        preload: modules a fork server imports once, before it starts any thread; every rank is
            then forked from it with them imported (``forkserver``). Empty: each rank is spawned
            and imports what it needs itself (``spawn``). Importing torch costs a rank about 3 s of
            CPU on a 2-core machine: 8 ranks spawned together kept the coordinator's process 12 s
            behind on its messages at start. A fork server fixes the environment its ranks see
            when it starts (the first rank of the process), and it must not import what starts
            threads or initialises a GPU, so the GPU benchmarks keep ``spawn``.
    """

    def __init__(self, world_size: int, name: str, preload: Sequence[str] = ()) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size = world_size
        self.name = name
        if preload:
            self.ctx: Any = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(preload))
        else:
            self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.collected: list[Any] = []
        self.procs: list = []
        self.started_at = 0.0

    def start(self, target: Callable[..., None], args_of: Callable[[int], tuple]) -> None:
        """Spawn ``target(*args_of(rank))`` for every rank."""
        self.procs = [
            self.ctx.Process(target=target, name=f"{self.name}-{r}", args=args_of(r)) for r in range(self.world_size)
        ]
        self.started_at = time.monotonic()
        for p in self.procs:
            p.start()

    @property
    def done(self) -> bool:
        """Every rank has reported."""
        return len(self.collected) >= self.world_size

    def collect(self) -> list[Any]:
        """Take what the ranks have reported since the last call; returns all results so far."""
        self.collected.extend(drain(self.results))
        return self.collected

    def failed(self) -> list[tuple[str, int]]:
        """``(name, exit code)`` of the processes that exited with an error."""
        return [(p.name, p.exitcode) for p in self.procs if p.exitcode not in (None, 0)]

    async def wait(
        self,
        poll_s: float,
        on_poll: Callable[[], bool] | None = None,
        *,
        dead_grace_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Poll every ``poll_s`` until every rank has reported; returns the results so far.

        Each poll collects results, then calls ``on_poll()`` (progress, hang checks), which
        returns True to stop waiting early. A rank that exited with an error gets
        ``dead_grace_s`` for its result to arrive (a rank reports, then fails in its
        teardown), then :class:`RankProcessesDied` names the dead processes. Past
        ``timeout_s`` from :meth:`start`, :class:`TimeoutError`.
        """
        while not self.done:
            await asyncio.sleep(poll_s)
            if self._poll(on_poll, timeout_s):
                break
            if self.failed():
                await asyncio.sleep(dead_grace_s)
                self._check_dead()
        return self.collected

    def wait_blocking(self, poll_s: float, *, dead_grace_s: float = 1.0, timeout_s: float | None = None) -> list[Any]:
        """:meth:`wait` for a caller with no event loop (nothing else runs meanwhile)."""
        while not self.done:
            time.sleep(poll_s)
            self._poll(None, timeout_s)
            if self.failed():
                time.sleep(dead_grace_s)
                self._check_dead()
        return self.collected

    def _poll(self, on_poll: Callable[[], bool] | None, timeout_s: float | None) -> bool:
        self.collect()
        if on_poll is not None and on_poll():
            return True
        if timeout_s is not None and not self.done and time.monotonic() - self.started_at > timeout_s:
            raise TimeoutError(
                f"{self.name}: only {len(self.collected)}/{self.world_size} ranks reported within {timeout_s}s"
            )
        return False

    def _check_dead(self) -> None:
        self.collect()
        if not self.done:
            raise RankProcessesDied(f"rank processes died: {self.failed()}")

    def stop(self, join_timeout_s: float = 10.0) -> None:
        """Join the processes for up to ``join_timeout_s`` in all; kill the ones still alive.

        One deadline for all of them: a run stopped at its timeout, every rank hung, waited
        ``join_timeout_s`` for each rank in turn (80 s for 8 ranks at 10 s) before it could
        say why it stopped."""
        deadline = time.monotonic() + join_timeout_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)

    async def stop_async(self, join_timeout_s: float = 10.0) -> None:
        """:meth:`stop` for a caller on an event loop: the joins run on a worker thread, so what
        serves on that loop keeps running while the ranks tear down.

        A rank reports, then ends its process group and its interpreter, which took 2-7 s on the
        simulation's 2-core runs; joined on the loop, that held the coordinator the simulation runs
        there, and every run ended on its warning that its loop "did not run for 6.6s"."""
        await asyncio.to_thread(self.stop, join_timeout_s)

    def signal_alive(self, signum: int) -> None:
        """Send ``signum`` to every process still running (the harness: SIGUSR1, dump stacks)."""
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signum)
