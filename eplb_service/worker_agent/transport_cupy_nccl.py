"""GPU side transport: a CuPy NCCL communicator on its own low-priority CUDA stream.

The communicator is built for the agents alone, from the coordinator's rendezvous
(:class:`~eplb_service.protocol.CommInit`), never from the serving group: rank 0 creates
the NCCL unique id and publishes it in the rendezvous store (hosted by rank 0's worker, see
``rendezvous``) under a key that carries the generation (``<key_prefix>/nccl_unique_id``);
the other ranks read it there.
A store barrier runs before ``ncclCommInitRank`` so a missing rank fails the connect
within ``timeout_s`` instead of blocking NCCL's bootstrap forever.

Rules this module keeps (the weight movement rules of the design):

- every NCCL call is issued on one dedicated non-blocking stream of the lowest priority;
  tensors are handed to NCCL as raw device pointers of the torch tensors (no copies);
- ``exchange`` is one ``ncclGroupStart``/``ncclGroupEnd`` holding exactly the ops the
  agent passes (whole blocks: one op per peer per chunk, every weight tensor's row of an
  expert side by side in one record, issued in the
  same global order on every rank). It returns once at most ``max_groups_in_flight - 1``
  earlier groups are still running, so the bytes in flight are bounded by that many chunks
  and the host wait of one chunk overlaps the transfer of the next; ``synchronize`` waits
  for all of them. Every host wait is bounded by the connect timeout and ends in
  :class:`TransportError`, never in a hang;
- the senders' records are packed (``gather``) on a second low-priority stream, so the
  pack of the next chunk overlaps the transfer of this one; receivers write straight into
  their staging records; row digests for the vote run on a third stream, after each
  group, overlapping the next;
- the throttle's gap after a group runs on the side stream (a one-thread spin kernel),
  not on the host: every rank's next group then starts when the previous one ended plus
  the same gap, i.e. at the same moment everywhere, so no rank's NCCL kernel holds SMs
  spinning for a peer that is still asleep. ``start_batch`` (a one-element all-reduce)
  lines the ranks up before a batch's first group the same way. A device-wide
  synchronize elsewhere waits for at most ``max_groups_in_flight`` chunks and gaps
  (gaps are capped at ``max_gap_s``);
- a *session* is everything between two ``synchronize`` calls (one plan batch for the
  agent). The first operation of a session makes the side stream wait for everything the
  serving stream has queued so far: the previous commit's copies into the live rows and
  out of the staging rows are ordered before this session reads live rows or writes
  staging rows, without any host/device synchronisation;
- memory the side stream writes or reads is marked with ``record_stream`` so that the
  caching allocator never hands it to another stream while a transfer is pending (a plan
  dropped mid-staging frees its staging rows with a group still in flight);
- ``abort`` is ``ncclCommAbort``: kernels waiting for a dead peer return, the stream is
  drained (bounded), and the next ``connect`` builds a fresh communicator on a fresh stream.

CTA limits: ``max_ctas``/``min_ctas`` bound the CTAs (one per channel) that this
communicator's kernels occupy, for this communicator only, through ``ncclConfig_t`` given to
``ncclCommInitRankConfig``. CuPy only wraps ``ncclCommInitRank``, so a limited communicator
is built through :mod:`~eplb_service.worker_agent.nccl_lib` (ctypes, on the NCCL CuPy
loaded); without a limit CuPy's ``NcclCommunicator`` is used. The environment variable
``NCCL_MAX_CTAS`` is not an option: it caps every communicator in the process, the serving
group's too. The harness measures what each limit costs in bandwidth and gives back in
step time (bench/RESULTS.md).
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.protocol import CommInit
from eplb_service.worker_agent.nccl_lib import NcclLibrary, NcclLibraryError, make_config
from eplb_service.worker_agent.transport import (
    P2POp,
    RecordLayout,
    Transport,
    TransportError,
    _digest_weights,
    row_bytes,
)

log = logging.getLogger(__name__)

# NCCL enum values (nccl.h); CuPy exports the same names, these are the fallbacks.
_NCCL_UINT8 = 1
_NCCL_INT64 = 4
_NCCL_MAX = 2


MAX_CONNECTIONS_VAR = "CUDA_DEVICE_MAX_CONNECTIONS"


def check_hardware_queues(environ=None) -> None:
    """Refuse ``CUDA_DEVICE_MAX_CONNECTIONS=1``; warn below CUDA's default of 8.

    CUDA maps streams onto that many hardware work queues. With one, every stream of the
    process shares a queue, so a side-stream NCCL kernel waiting for its peer (or a
    throttle gap) holds back every serving kernel queued after it: on 2x H100 the serving
    loop stalled for tens of seconds, until transport timeouts aborted the side
    communicator, and then hung. Megatron-style setups set the variable to 1.
    """
    env = os.environ if environ is None else environ
    text = env.get(MAX_CONNECTIONS_VAR, "").strip()
    if not text:
        return
    try:
        value = int(text)
    except ValueError:
        raise TransportError(f"{MAX_CONNECTIONS_VAR}={text!r}: expected an integer (CUDA's default is 8)") from None
    if value < 2:
        raise TransportError(
            f"{MAX_CONNECTIONS_VAR}={value}: the NCCL side transport needs at least 2 hardware "
            "queues (CUDA's default is 8); with one, side-stream transfers block the serving "
            "stream. Unset it or use EPLB_SERVICE_TRANSPORT=gloo"
        )
    if value < 8:
        log.warning(
            "%s=%d: fewer hardware queues than CUDA's default of 8; a serving stream that shares one "
            "with the side stream waits behind side transfers",
            MAX_CONNECTIONS_VAR,
            value,
        )


def _import_nccl():
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or CuPy present without a usable CUDA/NCCL
        raise TransportError(f"CuPy NCCL is not available: {exc}") from exc
    if not getattr(nccl, "available", True):
        raise TransportError("CuPy was built without NCCL support")
    return nccl


def unique_id_to_bytes(uid: bytes | tuple[int, ...]) -> bytes:
    """CuPy's unique id as the 128 raw bytes kept in the store.

    CuPy 14 returns ``bytes``; older CuPy returns a tuple of signed chars.
    """
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    return bytes(b & 0xFF for b in uid)


def unique_id_from_bytes(raw: bytes) -> tuple[int, ...]:
    """The tuple-of-signed-chars form older CuPy's ``NcclCommunicator`` takes."""
    return tuple(b - 256 if b > 127 else b for b in raw)


@dataclass
class TransportSession:
    """Traffic of one session (``order``-fenced start to ``synchronize``), for metrics.

    Attributes:
        bytes_sent / bytes_received: by this rank, over the side communicator.
        groups: NCCL group calls issued.
        wall_s: host time from the session's first operation to the end of ``synchronize``.
        gpu_s: side-stream time from the start of the first group to the end of the last
            (0 when the session issued no group); bytes over ``gpu_s`` is the rate the
            link ran at while this rank streamed, host gaps between groups included.
    """

    started_at: float
    bytes_sent: int = 0
    bytes_received: int = 0
    groups: int = 0
    wall_s: float = 0.0
    gpu_s: float = 0.0
    first_event: object | None = field(default=None, repr=False)
    last_event: object | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {
            "started_at": self.started_at,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "groups": self.groups,
            "wall_s": self.wall_s,
            "gpu_s": self.gpu_s,
        }


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for every pair, as one multi-tensor kernel where torch has one.

    Enqueued on the current stream; ``gather`` packs a block with it, and so does the
    benchmark's packed-per-peer variant (``bench/gpu/packed_transport.py``)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dsts, srcs)
    else:  # pragma: no cover - older torch
        for dst, src in zip(dsts, srcs):
            dst.copy_(src, non_blocking=True)


class CupyNcclTransport(Transport):
    """Side transport over a CuPy NCCL communicator (one per EP rank, one GPU per rank).

    About 560 lines, over the ~300 this code base aims at, for a reason: every method
    orders work on the same three streams (side, pack, check), the same queue of groups in
    flight and the same session fence, and the rules in the module docstring hold only
    across all of them; split apart, each piece would reach into the others' state. The
    parts that stand alone already live elsewhere (the configured communicator in
    ``nccl_lib``, records and digests in ``transport``), and a further split can only be
    checked on GPUs. A benchmark's variant of the wire format subclasses the one seam,
    :meth:`_send_recv_group` (``bench/gpu/packed_transport.py``).

    Args:
        device: the rank's CUDA device (where its expert weights live).
        serving_stream: the stream the serving thread enqueues the commit on; default: the
            current stream of the constructing thread (build the transport on the serving
            thread).
        max_groups_in_flight: NCCL groups that may be queued on the side stream at once
            (>= 1; 1 = ``exchange`` waits for its own group).
        warmup: after connecting, open the NCCL connections to every peer with a small and a
            large all-pairs exchange (NCCL sets up each protocol's buffers on first use, which
            stalled serving steps for hundreds of ms when the first plan did it).
        keep_sessions: how many finished sessions to keep in :attr:`sessions`.
        max_gap_s: the longest throttle gap run on the device after one group; a longer
            ``pace_s`` waits the rest on the host (only at throttles far below the link rate).
    """

    name = "cupy-nccl"

    def __init__(
        self,
        device: torch.device | int | str,
        *,
        serving_stream: torch.cuda.Stream | None = None,
        max_groups_in_flight: int = 2,
        warmup: bool = True,
        keep_sessions: int = 100_000,
        max_gap_s: float = 0.05,
        max_ctas: int | None = None,
        min_ctas: int | None = None,
    ) -> None:
        if max_groups_in_flight < 1:
            raise ValueError(f"max_groups_in_flight={max_groups_in_flight} must be >= 1")
        make_config(min_ctas=min_ctas, max_ctas=max_ctas)  # ValueError naming a bad bound, before any GPU work
        check_hardware_queues()
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CupyNcclTransport needs a CUDA device, got {dev}")
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.max_ctas = max_ctas
        self.min_ctas = min_ctas
        self._nccl = _import_nccl()
        if max_ctas is not None or min_ctas is not None:
            try:
                self._nccl = NcclLibrary()  # the same NCCL CuPy loaded, for ncclCommInitRankConfig
            except NcclLibraryError as exc:
                raise TransportError(
                    f"max_ctas={max_ctas}, min_ctas={min_ctas} need a configured NCCL communicator: {exc}"
                ) from exc
        self.serving_stream = serving_stream if serving_stream is not None else torch.cuda.current_stream(self.device)
        self.max_groups_in_flight = max_groups_in_flight
        self.warmup = warmup
        self.max_gap_s = max_gap_s
        self._comm = None
        self._pack_stream: torch.cuda.Stream | None = None
        self._check_stream: torch.cuda.Stream | None = None
        self._packed_event: torch.cuda.Event | None = None
        self._barrier_buf: torch.Tensor | None = None
        self._cycles_per_s = 0.0
        """Spin-kernel cycles per second on this GPU, measured at connect (for device gaps)."""
        self._store: dist.Store | None = None
        self._stream: torch.cuda.Stream | None = None
        self._generation = -1
        self._world_size = 0
        self._rank = -1
        self._timeout_s = 30.0
        self._in_flight: collections.deque = collections.deque()
        """``(event after a group, the throttle gap queued before that group)``, oldest first."""
        self._gap_s = 0.0
        self._session: TransportSession | None = None
        self.sessions: collections.deque[TransportSession] = collections.deque(maxlen=keep_sessions)
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.groups_total = 0
        self.aborts = 0
        self.last_abort_drained: bool | None = None
        """Whether the side stream emptied after the last ``ncclCommAbort`` (``None``: never aborted)."""
        self._dtype_u8 = getattr(self._nccl, "NCCL_UINT8", _NCCL_UINT8)
        self._dtype_i64 = getattr(self._nccl, "NCCL_INT64", _NCCL_INT64)
        self._op_max = getattr(self._nccl, "NCCL_MAX", _NCCL_MAX)

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._comm is not None

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream of the current generation (``None`` before ``connect``)."""
        return self._stream

    @property
    def session_active(self) -> bool:
        return self._session is not None

    @property
    def wait_timeout_s(self) -> float:
        """The bound on every host wait (a group, a vote, ``synchronize``); ``connect`` sets it
        from its ``timeout_s``. A test of the abort path lowers it after connecting, so that a
        receive nobody matches fails in seconds rather than after the rendezvous timeout."""
        return self._timeout_s

    @wait_timeout_s.setter
    def wait_timeout_s(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"wait_timeout_s={seconds!r} must be > 0")
        self._timeout_s = float(seconds)

    def _require(self):
        if self._comm is None:
            raise TransportError("side communicator is not connected (aborted or never built)")
        return self._comm

    def _use_device(self) -> None:
        # The current device is per host thread; the agent thread calls in here.
        torch.cuda.set_device(self.device)
        import cupy

        cupy.cuda.Device(self.device.index).use()

    # -- connect -------------------------------------------------------------------------

    def connect(self, comm: CommInit, rank: int, timeout_s: float) -> None:
        self.abort()
        self._use_device()
        self._timeout_s = timeout_s
        prefix = comm.key_prefix
        try:
            store = dist.TCPStore(
                comm.store_host, comm.store_port, comm.world_size, False, timeout=datetime.timedelta(seconds=timeout_s)
            )
            if rank == 0:
                store.set(f"{prefix}/nccl_unique_id", unique_id_to_bytes(self._nccl.get_unique_id()))
            self._store_barrier(store, f"{prefix}/nccl_arrived", comm.world_size, timeout_s)
            uid = store.get(f"{prefix}/nccl_unique_id")
        except TransportError:
            raise
        except Exception as exc:  # DistStoreError, RuntimeError, NcclError
            raise TransportError(
                f"NCCL side communicator generation {comm.generation}: rendezvous at "
                f"{comm.store_host}:{comm.store_port} failed: {exc}"
            ) from exc
        if len(uid) != 128:
            raise TransportError(f"NCCL unique id of generation {comm.generation} has {len(uid)} bytes, expected 128")
        self._stream = torch.cuda.Stream(self.device, priority=0)  # 0 = lowest priority on CUDA
        self._pack_stream = torch.cuda.Stream(self.device, priority=0)
        self._check_stream = torch.cuda.Stream(self.device, priority=0)
        with torch.cuda.device(self.device):
            self._barrier_buf = torch.zeros(1, dtype=torch.int64, device=self.device)
        try:
            if isinstance(self._nccl, NcclLibrary):
                self._comm = self._nccl.communicator(
                    comm.world_size, uid, rank, min_ctas=self.min_ctas, max_ctas=self.max_ctas
                )
            else:
                try:
                    self._comm = self._nccl.NcclCommunicator(comm.world_size, uid, rank)
                except TypeError:  # CuPy < 14 takes the id as a tuple of signed chars
                    self._comm = self._nccl.NcclCommunicator(comm.world_size, unique_id_from_bytes(uid), rank)
        except Exception as exc:
            self._stream = None
            raise TransportError(
                f"ncclCommInitRank (generation {comm.generation}, rank {rank}/{comm.world_size}) failed: {exc}"
            ) from exc
        self._store = store
        self._generation = comm.generation
        self._world_size = comm.world_size
        self._rank = rank
        try:
            self._calibrate_gap()
            if self.warmup and comm.world_size > 1:
                self._open_connections()
        except TransportError:
            self.abort()
            raise

    def _calibrate_gap(self) -> None:
        """Measure the spin kernel's cycles per second (it also loads the kernel now, see below)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        with torch.cuda.stream(self._stream):
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
        self._wait_event(end, "gap calibration")
        self._cycles_per_s = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)

    def store_keys(self, comm: CommInit) -> list[str]:
        return [f"{comm.key_prefix}/nccl_unique_id", f"{comm.key_prefix}/nccl_arrived"]

    @staticmethod
    def _store_barrier(store: dist.Store, key: str, world_size: int, timeout_s: float) -> None:
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world_size:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"only {store.add(key, 0)}/{world_size} ranks reached the side-communicator "
                    f"rendezvous within {timeout_s}s"
                )
            time.sleep(0.005)

    def _open_connections(self) -> None:
        """Every kernel the side path launches, once, before serving starts.

        Small and large sends/recvs with every peer (NCCL's LL and Simple protocols), two
        ops per peer (and a subclass's own kernels around a group, see
        :meth:`_send_recv_group`), a local copy, and the vote. With CUDA's lazy module
        loading, the first launch of a kernel can wait for the whole context to go idle; if
        that first launch happens while NCCL kernels spin for their peers, the ranks
        deadlock (seen on H100: a 30 s serving stall, broken only by the side communicator's
        timeout and abort).
        """
        world, rank = self._world_size, self._rank
        for nbytes in (16, 8 << 20):
            with torch.cuda.device(self.device):
                out = torch.zeros((world, 2, nbytes), dtype=torch.uint8, device=self.device)
                back = torch.zeros((world, 2, nbytes), dtype=torch.uint8, device=self.device)
            self.start_batch()
            layout = RecordLayout.of([out[:, 0], out[:, 1]])
            ops = []
            for peer in range(world):
                if peer != rank:
                    packed = self.gather([[out[peer, 0], out[peer, 1]]], layout)
                    ops += [P2POp(True, packed, peer, 0), P2POp(True, out[peer, 1], peer, 1)]
                    ops += [P2POp(False, back[peer].reshape(-1), peer, 0), P2POp(False, back[peer, 1], peer, 1)]
            self.exchange(ops, pace_s=1e-5)
            self.copy_local(back[rank, 0], out[rank, 0])
            self.collect([self.block_digests(back[rank])])
            self.synchronize()
        self.max_reduce(np.zeros(4, dtype=np.int64))
        self.sessions.clear()
        self.bytes_sent_total = self.bytes_received_total = self.groups_total = 0

    # -- sessions and waits -----------------------------------------------------------------

    def _begin_session(self) -> TransportSession:
        session = self._session
        if session is None:
            session = self._session = TransportSession(started_at=time.monotonic())
            # Order this batch's reads of live rows and writes of staging rows after the
            # previous commit's copies, which the serving thread has already enqueued.
            fence = torch.cuda.Event()
            fence.record(self.serving_stream)
            self._stream.wait_event(fence)
            self._pack_stream.wait_event(fence)
        return session

    def _wait_event(self, event: torch.cuda.Event, what: str, sleep_first_s: float = 0.0) -> None:
        """Wait (bounded) for ``event``, polling from the host.

        Every wake-up of this thread takes the GIL from the serving thread for a moment, so
        the polls are few: ``sleep_first_s`` (a throttle gap known to lie ahead) is slept in
        one go, then the interval doubles from 20 us up to 0.5 ms.
        """
        if event.query():
            return
        timeout_s = self._timeout_s
        deadline = time.monotonic() + timeout_s
        if sleep_first_s > 0:
            time.sleep(min(sleep_first_s, timeout_s))
        delay = 20e-6
        next_check = time.monotonic() + 0.005
        while not event.query():
            now = time.monotonic()
            if now > deadline:
                raise TransportError(
                    f"{what} did not complete within {timeout_s}s (a peer is gone or the side stream is stuck)"
                )
            if now > next_check:
                next_check = now + 0.005
                if self._comm is not None:
                    try:
                        self._comm.check_async_error()
                    except Exception as exc:
                        raise TransportError(f"{what}: NCCL reported an asynchronous error: {exc}") from exc
                self._poll()
            time.sleep(delay)
            delay = min(delay * 2, 500e-6)

    def _retire(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            event, gap_before_s = self._in_flight[0]
            self._wait_event(event, "NCCL send/recv group", sleep_first_s=gap_before_s - 5e-4)
            self._in_flight.popleft()

    # -- the Transport interface -----------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._session is not None

    def device_context(self):
        """The side stream; work enqueued here before a vote is complete when the vote returns."""
        if self._stream is None:
            return super().device_context()
        return torch.cuda.stream(self._stream)

    def start_batch(self) -> None:
        comm = self._require()
        self._begin_session()
        buf = self._barrier_buf
        try:
            comm.allReduce(buf.data_ptr(), buf.data_ptr(), 1, self._dtype_i64, self._op_max, self._stream.cuda_stream)
        except Exception as exc:
            raise TransportError(f"NCCL batch-start all-reduce failed: {exc}") from exc

    def gather(self, records: list[list[torch.Tensor]], layout: RecordLayout) -> torch.Tensor:
        self._require()
        self._begin_session()
        pack = self._pack_stream
        with torch.cuda.stream(pack):
            out = torch.empty((len(records), layout.record_bytes), dtype=torch.uint8, device=self.device)
            dsts, srcs = [], []
            for i, record in enumerate(records):
                for row, offset, size in zip(record, layout.offsets, layout.sizes):
                    if row.device != self.device or not row.is_contiguous() or row.numel() * row.element_size() != size:
                        raise TransportError(
                            f"gather: a row of {row.numel() * row.element_size()} bytes on {row.device} "
                            f"(contiguous={row.is_contiguous()}); "
                            f"expected a contiguous {size}-byte row on {self.device}"
                        )
                    dsts.append(out[i, offset : offset + size])
                    srcs.append(row_bytes(row))
            # One multi-tensor copy kernel for the whole block. Measured on 2x H100 with
            # 8 x (16 + 8) MiB records per peer: index_select 169 GB/s, one memcpy per row
            # 120 GB/s, this 225 GB/s end to end (one pre-packed op: 272 GB/s).
            copy_all(dsts, srcs)
            ready = torch.cuda.Event()
            ready.record(pack)
        self._packed_event = ready
        return out

    def block_digests(self, block: torch.Tensor) -> torch.Tensor:
        """Digests on the check stream, after the last group: they overlap the next group."""
        stream = self._check_stream
        if stream is None or block.shape[-1] % 8 or not block.is_contiguous():
            return super().block_digests(block)
        after = self._in_flight[-1][0] if self._in_flight else None
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            else:
                stream.wait_stream(self._stream)
            # A wrapping sum of the record's 64-bit words: one read, no temporary (a weighted sum
            # materialised a product as large as the block and slowed the link it overlaps).
            # It changes with any change confined to a word and with records swapped between
            # experts, the corruptions a transfer or an ordering bug would make.
            digests = block.view(torch.int64).sum(dim=-1)
        block.record_stream(stream)
        return digests

    def collect(self, digests: list[torch.Tensor]) -> list[np.ndarray]:
        """All digests to the host with one bounded wait."""
        on_device = [d for d in digests if d.is_cuda]
        if not on_device:
            return super().collect(digests)
        stream = self._check_stream
        with torch.cuda.stream(stream):
            stream.wait_stream(self._stream)
            flat = torch.cat(on_device)
            host = torch.empty(flat.numel(), dtype=torch.int64, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._wait_event(done, "row digests")
        values = iter(np.split(host.numpy() & ((1 << 62) - 1), np.cumsum([d.numel() for d in on_device])[:-1]))
        return [next(values) if d.is_cuda else d.cpu().numpy() & ((1 << 62) - 1) for d in digests]

    def _device_gap(self, seconds: float) -> float:
        """Enqueue a spin of ``seconds`` (capped) on the side stream; returns the part left for the host."""
        on_device = min(seconds, self.max_gap_s)
        if on_device > 0 and self._cycles_per_s > 0:
            with torch.cuda.stream(self._stream):
                torch.cuda._sleep(int(on_device * self._cycles_per_s))
        return seconds - on_device

    def exchange(self, ops: list[P2POp], pace_s: float = 0.0) -> None:
        comm = self._require()
        stream = self._stream
        session = self._begin_session()
        if not ops:
            # No part in this group, but the same gap as every rank: the next group then
            # starts here when it starts on the peers.
            if pace_s > 0:
                host_gap = self._device_gap(pace_s)
                gap_done = torch.cuda.Event()
                gap_done.record(stream)
                self._in_flight.append((gap_done, 0.0))
                self._gap_s = min(pace_s, self.max_gap_s)
                self._retire(self.max_groups_in_flight - 1)
                self._wait_on_host(host_gap)
            return
        if session.first_event is None:
            session.first_event = torch.cuda.Event(enable_timing=True)
            session.first_event.record(stream)
        if self._packed_event is not None:  # the senders' rows of this group, packed on the pack stream
            stream.wait_event(self._packed_event)
            self._packed_event = None
        sent, received = self._send_recv_group(comm, ops)
        for op in ops:
            op.tensor.record_stream(stream)
        done = torch.cuda.Event(enable_timing=True)
        done.record(stream)
        session.last_event = done
        session.bytes_sent += sent
        session.bytes_received += received
        session.groups += 1
        self.bytes_sent_total += sent
        self.bytes_received_total += received
        self.groups_total += 1
        self._in_flight.append((done, self._gap_s))
        self._gap_s = min(pace_s, self.max_gap_s)
        host_gap = self._device_gap(pace_s) if pace_s > 0 else 0.0
        self._retire(self.max_groups_in_flight - 1)
        self._wait_on_host(host_gap)

    def _send_recv_group(self, comm, ops: list[P2POp]) -> tuple[int, int]:
        """One NCCL group of ``ops`` on the side stream; returns the bytes sent and received.

        Called by :meth:`exchange` once the side stream is fenced behind the serving stream
        and behind the senders' pack; the caller marks the ops' tensors in use by the side
        stream afterwards. The one seam for a benchmark's variant of what goes on the wire
        (``bench/gpu/packed_transport.py``): work it enqueues on :attr:`stream` around the
        group is ordered like the group itself.
        """
        nccl = self._nccl
        handle = self._stream.cuda_stream
        sent = received = 0
        try:
            nccl.groupStart()
            try:
                for op in ops:
                    tensor = op.tensor
                    if tensor.device != self.device or not tensor.is_contiguous():
                        raise TransportError(
                            f"op with peer {op.peer}: tensor on {tensor.device}, contiguous="
                            f"{tensor.is_contiguous()}; expected a contiguous tensor on {self.device}"
                        )
                    nbytes = tensor.numel() * tensor.element_size()
                    if op.is_send:
                        comm.send(tensor.data_ptr(), nbytes, self._dtype_u8, op.peer, handle)
                        sent += nbytes
                    else:
                        comm.recv(tensor.data_ptr(), nbytes, self._dtype_u8, op.peer, handle)
                        received += nbytes
            finally:
                nccl.groupEnd()
        except TransportError:
            raise
        except Exception as exc:  # NcclError from send/recv/groupEnd
            raise TransportError(f"NCCL group of {len(ops)} ops failed: {exc}") from exc
        return sent, received

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._require()
        self._begin_session()
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        dst.record_stream(self._stream)
        src.record_stream(self._stream)

    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        comm = self._require()
        host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).copy()).pin_memory()
        count = host.numel()
        stream = self._stream
        with torch.cuda.stream(stream):
            buf = torch.empty(count, dtype=torch.int64, device=self.device)
            buf.copy_(host, non_blocking=True)
            try:
                comm.allReduce(buf.data_ptr(), buf.data_ptr(), count, self._dtype_i64, self._op_max, stream.cuda_stream)
            except Exception as exc:
                raise TransportError(f"NCCL vote all-reduce failed: {exc}") from exc
            out = torch.empty(count, dtype=torch.int64, pin_memory=True)
            out.copy_(buf, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._wait_event(done, "vote all-reduce")
        del host  # the pinned source must outlive the copy, which the wait guarantees
        return out.numpy().copy()

    def row_digest(self, row: torch.Tensor) -> int:
        """The row's digest computed on the side stream, never on the serving stream.

        Rows whose size is a multiple of 8 bytes are read as int64 words (one read of the
        row, no widening copy): sum of word * odd weight, wrapping mod 2^64, so the result
        does not depend on the reduction order. Sender and receiver both use this transport,
        so they compute the same function of the same bytes.
        """
        stream = self._stream
        if stream is None:
            return super().row_digest(row)
        with torch.cuda.stream(stream):
            flat = row.detach().reshape(-1)
            if flat.numel() * flat.element_size() % 8:
                return super().row_digest(row)
            try:
                words = flat.view(torch.uint8).view(torch.int64)
            except RuntimeError:  # storage offset not 8-byte aligned
                return super().row_digest(row)
            value = int((words * _digest_weights(words.numel(), words.device)).sum().item())
        return value & ((1 << 62) - 1)

    def synchronize(self) -> None:
        stream = self._stream
        if stream is None:
            return
        self._retire(0)
        self._gap_s = 0.0
        done = torch.cuda.Event()
        done.record(stream)  # covers local copies issued after the last group
        self._wait_event(done, "side stream")
        session, self._session = self._session, None
        if session is not None:
            session.wall_s = time.monotonic() - session.started_at
            if session.first_event is not None and session.last_event is not None:
                session.gpu_s = session.first_event.elapsed_time(session.last_event) / 1e3
            session.first_event = session.last_event = None
            self.sessions.append(session)

    def abort(self) -> None:
        comm, self._comm = self._comm, None
        stream = self._stream
        self._in_flight.clear()
        self._gap_s = 0.0
        self._session = None
        self._store = None
        self._packed_event = None
        if comm is None:
            return
        self.aborts += 1
        try:
            comm.abort()  # ncclCommAbort: pending kernels of this communicator return
        except Exception as exc:
            log.warning("ncclCommAbort of generation %d: %s", self._generation, exc)
        self.last_abort_drained = True
        if stream is not None:
            drained = torch.cuda.Event()
            drained.record(stream)
            deadline = time.monotonic() + 10.0
            while not drained.query():
                if time.monotonic() > deadline:
                    self.last_abort_drained = False
                    log.error(
                        "side stream of generation %d still busy 10s after ncclCommAbort; it is abandoned "
                        "(a fresh stream is used from the next connect)",
                        self._generation,
                    )
                    break
                time.sleep(0.001)
        self._stream = None
        self._pack_stream = None
        self._check_stream = None
