"""Building the side communicator a ``CommInit`` names (``worker_agent.side_link``), with a
transport whose rendezvous the test holds open, fails or completes."""

from __future__ import annotations

import logging
import threading

from eplb_service import protocol
from eplb_service.worker_agent.side_link import SideLink
from eplb_service.worker_agent.transport import TransportError


class HeldTransport:
    """``connect`` waits for ``release`` and then builds, or fails for the generations in ``fail``."""

    name = "held"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.fail: set[int] = set()
        self.connected = False
        self.generation = -1
        self.attempts: list[tuple[str, int]] = []

    def connect(self, comm, rank, timeout_s):
        self.attempts.append((comm.nonce, comm.generation))
        assert self.release.wait(5)
        if comm.generation in self.fail:
            raise TransportError(f"generation {comm.generation}: rendezvous timed out")
        self.connected, self.generation = True, comm.generation

    def abort(self):
        self.connected = False


def comm(generation: int, nonce: str = "aa", port: int = 1) -> protocol.CommInit:
    return protocol.CommInit(generation=generation, store_host="127.0.0.1", store_port=port, world_size=2, nonce=nonce)


def make_link() -> tuple[SideLink, HeldTransport, list[str]]:
    transport = HeldTransport()
    link = SideLink(0, transport, logging.LoggerAdapter(logging.getLogger("side"), {}))  # type: ignore[arg-type]
    opened: list[str] = []

    class Record:
        def __init__(self, host, port, timeout_s):
            self.address = f"{host}:{port}"
            opened.append(self.address)

    link.record_factory = Record  # type: ignore[assignment]
    return link, transport, opened


def finish(link: SideLink) -> None:
    assert link.connecting is not None
    link.connecting.join(5)
    assert not link.connecting.is_alive()


def test_a_generation_sent_during_a_build_is_built_once_that_build_ends():
    """The coordinator sends the next generation while this rank still waits in the previous
    rendezvous: it is queued, not lost (its copies would arrive during the same wait)."""
    link, transport, _ = make_link()
    link.connect(comm(1), 5.0)
    link.connect(comm(2), 5.0)
    link.connect(comm(1), 5.0)  # a copy of the one being attempted: not queued over the newer one
    assert link.take_pending() is None, "nothing is handed out while the build runs"
    transport.release.set()
    finish(link)
    pending = link.take_pending()
    assert pending == comm(2)
    link.connect(pending, 5.0)
    finish(link)
    assert transport.attempts == [("aa", 1), ("aa", 2)] and link.ready and link.built == comm(2)


def test_a_failed_build_is_not_the_built_communicator():
    link, transport, _ = make_link()
    transport.fail.add(1)
    transport.release.set()
    link.connect(comm(1), 5.0)
    finish(link)
    assert link.built is None and not link.ready and not link.is_current(comm(1))
    assert link.is_stale(comm(1)), "a generation attempted once is never joined again"


def test_a_restarted_coordinator_s_generations_count_from_one_again_and_are_not_stale():
    """Generations are ordered within one coordinator (one nonce); a restarted coordinator (a new
    nonce) starts at 1 again, and its generation 1 is new, not older than the last one's 5."""
    link, transport, _ = make_link()
    transport.release.set()
    link.connect(comm(5, nonce="old"), 5.0)
    finish(link)
    assert link.is_stale(comm(4, nonce="old"))
    assert not link.is_stale(comm(1, nonce="new"))
    link.connect(comm(1, nonce="new"), 5.0)
    finish(link)
    assert link.built == comm(1, nonce="new") and transport.generation == 1


def test_the_decision_record_follows_the_store_a_comm_init_names():
    """Rank 0's worker restarted hosts a new store: the record (where votes are decided) must move
    with the rendezvous, not stay on the dead store."""
    link, transport, opened = make_link()
    transport.release.set()
    link.connect(comm(1, port=1), 5.0)
    finish(link)
    link.connect(comm(2, port=1), 5.0)
    finish(link)
    link.connect(comm(3, port=2), 5.0)
    finish(link)
    assert opened == ["127.0.0.1:1", "127.0.0.1:2"] and link.record.address == "127.0.0.1:2"
