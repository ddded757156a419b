"""The ctypes NCCL binding's pure parts: the config struct NCCL reads, bounds, library lookup.

The struct layout is what NCCL's ``parseCommConfig`` copies (``size`` bytes over its
defaults), so a field at the wrong offset would silently set the wrong knob: the offsets
are pinned here against ``nccl.h``'s declaration order on LP64.
"""

from __future__ import annotations

import ctypes
import threading
import time
import types

import pytest

from eplb_service import protocol
from eplb_service.worker_agent import nccl_lib
from eplb_service.worker_agent.nccl_lib import NcclConfig, loaded_nccl_paths, make_config


def test_config_layout_matches_nccl_h_on_lp64():
    offsets = {name: getattr(NcclConfig, name).offset for name, _ in NcclConfig._fields_}
    assert offsets == {
        "size": 0,
        "magic": 8,
        "version": 12,
        "blocking": 16,
        "cgaClusterSize": 20,
        "minCTAs": 24,
        "maxCTAs": 28,
        "netName": 32,
        "splitShare": 40,
    }
    assert ctypes.sizeof(NcclConfig) == 48


def test_config_carries_the_limits_and_leaves_the_rest_to_nccl():
    cfg = make_config(max_ctas=4)
    assert (cfg.size, cfg.magic, cfg.version) == (48, 0xCAFEBEEF, 21700)
    assert cfg.blocking == 1
    assert cfg.maxCTAs == 4
    undef = -(2**31)
    assert cfg.minCTAs == undef and cfg.cgaClusterSize == undef and cfg.splitShare == undef
    assert cfg.netName is None
    both = make_config(min_ctas=2, max_ctas=8)
    assert (both.minCTAs, both.maxCTAs) == (2, 8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_ctas": 0}, "max_ctas=0: expected 1..64 CTAs"),
        ({"max_ctas": 65}, "max_ctas=65: expected 1..64 CTAs"),
        ({"min_ctas": -1}, "min_ctas=-1: expected 1..64 CTAs"),
        ({"min_ctas": 8, "max_ctas": 4}, "min_ctas=8 > max_ctas=4"),
    ],
)
def test_bad_limits_are_named(kwargs, needle):
    with pytest.raises(ValueError) as exc:
        make_config(**kwargs)
    assert needle in str(exc.value)


def test_loaded_library_found_in_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000001000 r-xp 00000000 00:00 0 /usr/lib/libc.so.6\n"
        "7f0000002000-7f0000003000 r-xp 00000000 00:00 0 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f0000003000-7f0000004000 r--p 00001000 00:00 0 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f0000005000-7f0000006000 rw-p 00000000 00:00 0 \n"
        "7f0000006000-7f0000007000 r-xp 00000000 00:00 0 /opt/other/libnccl-net.so\n"
    )
    assert loaded_nccl_paths(str(maps)) == ["/site/nvidia/nccl/lib/libnccl.so.2", "/opt/other/libnccl-net.so"]
    assert loaded_nccl_paths(str(tmp_path / "absent")) == []


def test_missing_library_is_a_named_error(monkeypatch):
    monkeypatch.setattr(nccl_lib, "loaded_nccl_paths", lambda maps_path="": [])
    monkeypatch.setattr(nccl_lib.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.nccl", None)
    with pytest.raises(nccl_lib.NcclLibraryError, match="libnccl not found; looked in"):
        nccl_lib.find_library()
    with pytest.raises(nccl_lib.NcclLibraryError, match="cannot load NCCL from '/nonexistent/libnccl.so.2'"):
        nccl_lib.NcclLibrary("/nonexistent/libnccl.so.2")


def test_one_hardware_queue_is_refused_and_few_are_warned(caplog):
    from eplb_service.worker_agent.transport import TransportError
    from eplb_service.worker_agent.transport_cupy_nccl import check_hardware_queues

    check_hardware_queues({})  # CUDA's default
    check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "32"})
    with pytest.raises(TransportError, match="CUDA_DEVICE_MAX_CONNECTIONS=1: the NCCL side transport needs at least 2"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    with pytest.raises(TransportError, match="CUDA_DEVICE_MAX_CONNECTIONS='many': expected an integer"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "many"})
    with caplog.at_level("WARNING"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "4"})
    assert "CUDA_DEVICE_MAX_CONNECTIONS=4: fewer hardware queues" in caplog.text


class FakeLib:
    """The few ``libnccl`` entry points the binding calls, recording them."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.calls: list[tuple[str, object]] = []
        for name in ("ncclGetErrorString", "ncclCommInitRankConfig", "ncclSend", "ncclRecv", "ncclAllReduce"):
            setattr(self, name, self._unexpected(name))
        self.ncclCommGetAsyncError = self._unexpected("ncclCommGetAsyncError")
        self.ncclCommDestroy = self._record("ncclCommDestroy")
        self.ncclCommAbort = self._record("ncclCommAbort")

    def _unexpected(self, name):
        def call(*args):
            raise AssertionError(f"{name} called")

        return call

    def _record(self, name):
        def call(handle):
            self.calls.append((name, handle))
            return 0

        return call

    def ncclGetVersion(self, ref):  # noqa: N802  (NCCL's name)
        ref._obj.value = self.version
        return 0


def library(monkeypatch, version: int) -> tuple[nccl_lib.NcclLibrary, FakeLib]:
    fake = FakeLib(version)
    monkeypatch.setattr(nccl_lib.ctypes, "CDLL", lambda path: fake)
    return nccl_lib.NcclLibrary("/fake/libnccl.so.2"), fake


def test_an_nccl_older_than_2_17_is_refused_naming_its_version(monkeypatch):
    """Before 2.17 NCCL resets the CTA fields of the config: the limit would be silently ignored."""
    with pytest.raises(nccl_lib.NcclLibraryError, match="NCCL 21603 at /fake/libnccl.so.2: per-communicator CTA"):
        library(monkeypatch, 21603)
    lib, _ = library(monkeypatch, 21700)
    assert lib.get_version() == 21700


def test_a_rank_outside_the_communicator_is_refused_before_nccl_is_called(monkeypatch):
    lib, _ = library(monkeypatch, 22800)
    for rank in (2, -1):
        with pytest.raises(ValueError, match=f"rank={rank}: expected 0 <= rank < nranks=2"):
            lib.communicator(2, bytes(128), rank)
    with pytest.raises(ValueError, match="NCCL unique id of 127 bytes, expected 128"):
        lib.communicator(2, bytes(127), 0)


def test_a_communicator_is_aborted_or_destroyed_once_and_unusable_after(monkeypatch):
    """A second ``ncclCommAbort`` on a freed communicator is a use after free in NCCL."""
    lib, fake = library(monkeypatch, 22800)
    comm = nccl_lib.ConfiguredCommunicator(lib, 1234, min_ctas=None, max_ctas=4)
    comm.abort()
    comm.abort()
    comm.destroy()
    assert fake.calls == [("ncclCommAbort", 1234)]
    with pytest.raises(nccl_lib.NcclLibraryError, match="already aborted or destroyed"):
        comm.send(0, 1, nccl_lib.NCCL_UINT8, 1, 0)
    other = nccl_lib.ConfiguredCommunicator(lib, 99, min_ctas=None, max_ctas=None)
    other.destroy()
    other.abort()
    assert fake.calls[1:] == [("ncclCommDestroy", 99)]


class CountingStore:
    """A store's ``add``, as the rendezvous barrier uses it; ``peers``: other ranks' arrivals."""

    def __init__(self, peers: int) -> None:
        self.values: dict[str, int] = {}
        self.peers = peers

    def add(self, key: str, amount: int) -> int:
        self.values[key] = self.values.get(key, self.peers) + amount
        return self.values[key]


def test_the_rendezvous_barrier_fails_at_its_timeout_naming_who_arrived():
    """A rank whose peers never come fails the connect within the transport timeout (the agent
    then reports it and the coordinator builds the next generation), never waits for ever."""
    from eplb_service.worker_agent.transport import TransportError
    from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport

    CupyNcclTransport._store_barrier(CountingStore(peers=3), "p/nccl_arrived", 4, 1.0)  # everyone there
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            CupyNcclTransport._store_barrier(CountingStore(peers=1), "p/nccl_arrived", 4, 0.2)
        except BaseException as exc:
            raised.append(exc)

    start = time.monotonic()
    waiter = threading.Thread(target=wait, daemon=True)  # a barrier that never ends must fail, not hang the suite
    waiter.start()
    waiter.join(3.0)
    assert not waiter.is_alive(), "the barrier still waits 3 s past a 0.2 s timeout"
    assert 0.2 <= time.monotonic() - start < 3.0
    assert len(raised) == 1 and isinstance(raised[0], TransportError), raised
    assert "only 2/4 ranks reached the side-communicator rendezvous within 0.2s" in str(raised[0])


def test_the_keys_listed_for_the_janitor_are_the_keys_a_connect_writes(monkeypatch):
    """Rank 0 deletes exactly ``store_keys`` once every rank is past a generation: a key the
    connect writes but the list lacks stays in the store for the life of the deployment."""
    from eplb_service.worker_agent import transport_cupy_nccl as cupy_nccl
    from eplb_service.worker_agent.transport import TransportError

    written: set[str] = set()

    class Store:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def set(self, key, value):
            written.add(key)

        def add(self, key, amount):
            written.add(key)
            return 2

        def get(self, key):
            written.add(key)
            return b"short"  # ends the connect before any GPU work

    monkeypatch.setattr(cupy_nccl.dist, "TCPStore", Store)
    comm = protocol.CommInit(generation=3, store_host="127.0.0.1", store_port=1, world_size=2, nonce="ab")
    for rank in (0, 1):
        t = cupy_nccl.CupyNcclTransport.__new__(cupy_nccl.CupyNcclTransport)
        t.abort = lambda: None
        t._use_device = lambda: None
        t._nccl = types.SimpleNamespace(get_unique_id=lambda: bytes(128))
        with pytest.raises(TransportError, match="unique id of generation 3 has 5 bytes"):
            t.connect(comm, rank, 1.0)
        assert written == set(t.store_keys(comm)), (rank, written)
        written.clear()
