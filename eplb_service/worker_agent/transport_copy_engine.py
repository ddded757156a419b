"""Copy-engine side transport: expert rows move by peer copies between the ranks of one node.

Receivers pull the senders' bytes out of their outboxes (CUDA IPC mappings) with
``cudaMemcpyAsync`` on the transport's low-priority stream: copy engines, no SMs, no NCCL
kernel. :mod:`.copy_engine` has the protocol (selection, addressing, completion: read
its docstring first); :mod:`.memory_mover` the device half (:class:`CudaIpcMover`, and
:class:`HostMemoryMover`, the CPU stand-in that runs this whole class between real
processes in CPU tests).

The contract is :class:`~.transport.Transport`'s, kept as the NCCL transport keeps it:

- ``connect`` joins the generation's rendezvous (keys under ``<key_prefix>/copy_engine``
  in the store rank 0's worker hosts): every rank publishes its host, device, mode, the
  path of its control block and its outbox's IPC handle; every rank opens the others',
  publishes what it opened, and the deployment's choice follows (:func:`~.copy_engine.decide`).
  Once every rank has published what it opened, nobody needs the names any more and the
  shared-memory files are unlinked (a crash leaves nothing behind). The commit vote runs
  on a gloo group of the same generation (a MAX all-reduce of a few hundred int64 on the
  host: NCCL cannot be built for two ranks on one GPU, and the vote needs no GPU);
- ``exchange`` moves every op's bytes and returns when they have all landed and all this
  rank's outbox bytes have been read (one host wait per chunk, bounded by the timeout;
  a peer that aborts is seen at once through its control block, one that vanishes at the
  timeout), then waits ``pace_s`` on the host (the throttle);
- a *session* (first operation to ``synchronize``) starts with the stream waiting for
  the serving stream, so a batch reads live rows and writes staging rows only after the
  previous commit's copies, without any host/device synchronisation;
- ``max_reduce`` first waits for the stream (what the agent enqueued under
  ``device_context`` before the vote is complete when the vote returns), then votes;
- ``abort`` marks the control block aborted (peers stop waiting for this rank), tears
  the vote group down, waits (bounded) for the stream, closes every opened IPC handle
  and control block. This rank's own outbox is freed at the *next* rendezvous, once
  every live peer has torn this generation down (a peer may be mid-copy out of it now).

``SelectingTransport`` is what ``EPLB_SERVICE_TRANSPORT=auto`` builds on GPU workers: at
every connect it tries the copy-engine rendezvous and falls back to the NCCL transport
for the generation when some pair of ranks cannot use peer copies (today: all or none,
see :mod:`.copy_engine`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.protocol import CommInit
from eplb_service.worker_agent.copy_engine import (
    STATE_LIVE,
    ControlBlock,
    CopyEngineError,
    Descriptor,
    RankInfo,
    ReceiveStream,
    SendStream,
    candidate_peers,
    control_words,
    copy_engine_pairs,
    decide,
    host_key,
    pid_namespace,
    plan_round,
    process_alive,
    split_span,
)
from eplb_service.worker_agent.memory_mover import MemoryMover, SharedFile, Window, memory_fence
from eplb_service.worker_agent.transport import P2POp, RecordLayout, Transport, TransportError, row_bytes
from eplb_service.worker_agent.transport_gloo import GlooTransport

log = logging.getLogger(__name__)

DEFAULT_WINDOW_BYTES = 64 << 20


@dataclass
class _Peer:
    """A peer's control block and outbox, opened here."""

    rank: int
    control_file: SharedFile
    control: ControlBlock
    window: Window
    pid: int = 0
    """Watched while this rank waits for the peer (0: another pid namespace, not watched)."""


@dataclass
class _Round:
    """The sender's pieces in flight: peer -> (outbox offset, bytes), filled until ``marker``."""

    layout: dict[int, tuple[int, int]]
    marker: object
    published: dict[int, int] = field(default_factory=dict)
    """peer -> sequence number published (empty until the fill completed)."""


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and dsts:
        foreach(dsts, srcs)
    else:  # pragma: no cover - older torch
        for dst, src in zip(dsts, srcs):
            dst.copy_(src)


class CopyEngineTransport(Transport):
    """Side transport over peer copies between the ranks of one host.

    About 370 lines, over the ~300 this code base aims at, for a reason: the rendezvous
    (outbox and control block published, peers' windows opened), the exchange and the
    teardown share one set of opened IPC windows and one control block, and the rule that
    a window is closed only once the stream that reads it is idle spans all three. The
    parts that stand alone already live elsewhere: the protocol's pure logic in
    :mod:`.copy_engine`, the CUDA and host movers in :mod:`.memory_mover`, one exchange's
    state machine in :class:`_Exchange` below. A further split would move GPU code that has
    run on one H200 only (``tests/gpu/test_copy_engine.py``), without a run to check it.

    Args:
        mover: :class:`~.memory_mover.CudaIpcMover` on GPU workers, the host stand-in on CPU.
        window_bytes: this rank's outbox; an exchange larger than it moves in rounds.
        mode: this rank's ``EPLB_SERVICE_TRANSPORT`` (``copy-engine`` or ``auto``).
        host: the host key (default: :func:`~.copy_engine.host_key`; tests fake hosts).
        votes: the vote's transport (default: a gloo group of the same generation).
    """

    name = "copy-engine"

    def __init__(
        self,
        mover: MemoryMover,
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        mode: str = "copy-engine",
        host: str | None = None,
        votes: Transport | None = None,
    ) -> None:
        if window_bytes < 4096:
            raise ValueError(f"window_bytes={window_bytes}: expected at least 4096")
        self.mover = mover
        self.window_bytes = window_bytes
        self.mode = mode
        self.host = host if host is not None else host_key()
        self.votes = votes if votes is not None else GlooTransport()
        self.votes.poll_hook = self._poll
        self._timeout_s = 30.0
        self._generation = -1
        self._rank = -1
        self._world_size = 0
        self._store: dist.Store | None = None
        self._own_file: SharedFile | None = None
        self._own: ControlBlock | None = None
        self._window: Window | None = None
        self._retired: list[Window] = []
        """Own outboxes of torn-down generations, freed at the next rendezvous."""
        self._peers: dict[int, _Peer] = {}
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._send_streams: dict[int, int] = {}
        self._recv_streams: dict[int, int] = {}
        self._session = False
        self._warmed = False
        self.last_choice = ""
        """What the last rendezvous chose (``copy-engine`` or ``nccl``)."""
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.pieces_total = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._own is not None and self.votes.connected

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def busy(self) -> bool:
        return self._session

    def _require(self) -> ControlBlock:
        if self._own is None:
            raise TransportError("side communicator is not connected (aborted or never built)")
        return self._own

    # -- connect -------------------------------------------------------------------------

    def connect(self, comm: CommInit, rank: int, timeout_s: float) -> None:
        if not self.try_connect(comm, rank, timeout_s):
            raise TransportError(f"copy engines not chosen for generation {comm.generation} (mode {self.mode})")

    def try_connect(self, comm: CommInit, rank: int, timeout_s: float) -> bool:
        """Join ``comm``'s rendezvous; ``False`` when the deployment chose NCCL (nothing left open).

        Raises ``TransportError`` when the rendezvous fails, the ranks disagree on the mode,
        or ``copy-engine`` is forced and some pair cannot use it.
        """
        self.abort()
        self.mover.use_device()
        self._timeout_s = timeout_s
        prefix = f"{comm.key_prefix}/copy_engine"
        world = comm.world_size
        try:
            store = dist.TCPStore(
                comm.store_host, comm.store_port, world, False, timeout=datetime.timedelta(seconds=timeout_s)
            )
            control, handle = self._publish_own(rank, comm.generation, world)
            me = RankInfo(
                rank,
                self.host,
                self.mover.device_id(),
                self.mode,
                control,
                handle,
                self.window_bytes,
                os.getpid(),
                pid_namespace(),
            )
            store.set(f"{prefix}/info/{rank}", json.dumps(me.as_dict()))
            infos = [RankInfo.from_dict(json.loads(raw)) for raw in self._gather(store, f"{prefix}/info", world)]
            if self._own is not None:
                self._open_peers(me, infos, comm.generation)
            store.set(f"{prefix}/opened/{rank}", json.dumps(sorted(self._peers)))
            opened = {r: json.loads(raw) for r, raw in enumerate(self._gather(store, f"{prefix}/opened", world))}
            # Every rank has opened what it could: the names are no longer needed.
            if self._own_file is not None:
                self._own_file.unlink()
            if self._window is not None:
                self.mover.unpublish(self._window)
            self._free_retired()
            self.last_choice = decide([info.mode for info in infos], world, copy_engine_pairs(opened))
            if self.last_choice == "copy-engine" and self._own is None:  # one rank alone, without its own window
                self.last_choice = decide([self.mode], world + 1, set())  # "nccl", or the forced mode's error
        except TransportError:
            self.abort()
            raise
        except Exception as exc:  # DistStoreError, OSError, CUDA errors, CopyEngineError
            self.abort()
            raise TransportError(
                f"copy-engine side transport generation {comm.generation}: rendezvous at "
                f"{comm.store_host}:{comm.store_port} failed: {exc}"
            ) from exc
        if self.last_choice != "copy-engine":
            self.abort()
            return False
        self._store, self._rank, self._world_size, self._generation = store, rank, world, comm.generation
        try:
            self.votes.connect(comm, rank, timeout_s)
            self._warm_kernels()
        except TransportError:
            self.abort()
            raise
        return True

    def store_keys(self, comm: CommInit) -> list[str]:
        prefix = f"{comm.key_prefix}/copy_engine"
        own = [f"{prefix}/{part}/{r}" for part in ("info", "opened") for r in range(comm.world_size)]
        return own + self.votes.store_keys(comm)

    def _warm_kernels(self) -> None:
        """Launch this transport's kernels once, before any plan (once per process).

        With CUDA's lazy module loading the first launch of a kernel can wait for the whole
        context to go idle (see the NCCL transport's warm-up); better here, at connect, than
        in the middle of a plan. The copies themselves are ``cudaMemcpyAsync``: no kernel.
        """
        if self._warmed:
            return
        device = self.mover.device
        with self.mover.stream_context():
            a = torch.zeros((2, 64), dtype=torch.uint8, device=device)
            b = torch.ones((2, 64), dtype=torch.uint8, device=device)
            _copy_all([a[0, :32], a[0, 32:]], [b[0, :32], b[1, 32:]])
            a[1].copy_(b[1], non_blocking=True)
            digest = a.view(torch.int64).sum(dim=-1).to("cpu", non_blocking=True)
        self._drain("kernel warm-up")
        if int(digest.sum()) == 0:  # pragma: no cover - the copies above wrote ones
            raise TransportError("kernel warm-up on the copy-engine stream read back zeros")
        self._warmed = True

    def _publish_own(self, rank: int, generation: int, world: int) -> tuple[str, str]:
        """This rank's stream, outbox and control block: ``(control path, outbox handle)``.

        ``("", "")`` when they cannot be made here (no shared memory, no device memory):
        the rank still takes part in the rendezvous, so that every rank reaches the same
        choice, but no pair with it can use copy engines.
        """
        try:
            self.mover.start()
            self._window, handle = self.mover.create_window(self.window_bytes)
            self._own_file = SharedFile.create(control_words(world) * 8, "control")
            own = ControlBlock(self._words(self._own_file), world, memory_fence)
            own.init(rank, generation)
        except Exception as exc:  # OSError, CUDA errors
            log.warning("rank %d cannot set up its copy-engine outbox: %s", rank, exc)
            return "", ""
        self._own = own
        return self._own_file.path, handle

    @staticmethod
    def _words(file: SharedFile) -> np.ndarray:
        return np.frombuffer(file.map, dtype=np.int64)

    def _gather(self, store: dist.Store, prefix: str, world: int) -> list[str]:
        keys = [f"{prefix}/{r}" for r in range(world)]
        try:
            store.wait(keys, datetime.timedelta(seconds=self._timeout_s))
        except Exception as exc:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise TransportError(
                f"ranks {missing} did not reach the copy-engine rendezvous ({prefix}) within {self._timeout_s}s "
                f"(is EPLB_SERVICE_TRANSPORT the same on every rank?): {exc}"
            ) from exc
        return [bytes(store.get(key)).decode() for key in keys]

    def _open_peers(self, me: RankInfo, infos: list[RankInfo], generation: int) -> None:
        for peer in candidate_peers(me, infos, self.mover.can_reach):
            info = infos[peer]
            file = None
            try:
                file = SharedFile.open(info.control, control_words(len(infos)) * 8)
                control = ControlBlock(self._words(file), len(infos), memory_fence)
                control.check(peer, generation)
                window = self.mover.open_window(info.window, info.window_bytes)
            except Exception as exc:  # this pair falls back (or fails the forced mode in decide)
                log.warning("rank %d cannot open rank %d's copy-engine window: %s", me.rank, peer, exc)
                if file is not None:
                    file.close()
                continue
            same_pids = bool(me.pid_namespace) and info.pid_namespace == me.pid_namespace
            self._peers[peer] = _Peer(peer, file, control, window, info.pid if same_pids else 0)

    def _free_retired(self) -> None:
        retired, self._retired = self._retired, []
        for window in retired:
            try:
                self.mover.close_window(window)
            except Exception as exc:
                log.warning("freeing a previous generation's outbox: %s", exc)

    # -- sessions and waits ----------------------------------------------------------------

    def _begin_session(self) -> None:
        if not self._session:
            self.mover.begin_session()
            self._session = True

    def _wait_marker(self, marker: object, what: str) -> None:
        """Wait (bounded, polling the hook) until the mover's stream reaches ``marker``."""
        deadline = time.monotonic() + self._timeout_s
        delay, next_poll = 20e-6, time.monotonic() + 0.005
        while not self.mover.done(marker):
            now = time.monotonic()
            if now > deadline:
                raise TransportError(f"{what} did not complete within {self._timeout_s}s")
            if now > next_poll:
                next_poll = now + 0.005
                self._poll()
            time.sleep(delay)
            delay = min(delay * 2, 500e-6)

    def _drain(self, what: str) -> None:
        self._wait_marker(self.mover.mark(), what)

    # -- the Transport interface -----------------------------------------------------------

    def device_context(self) -> contextlib.AbstractContextManager:
        return self.mover.stream_context()

    def start_batch(self) -> None:
        self._require()
        self._begin_session()

    def gather(self, records: list[list[torch.Tensor]], layout: RecordLayout) -> torch.Tensor:
        self._require()
        self._begin_session()
        device = self.mover.device
        with self.mover.stream_context():
            out = torch.zeros((len(records), layout.record_bytes), dtype=torch.uint8, device=device)
            dsts, srcs = [], []
            for i, record in enumerate(records):
                for row, offset, size in zip(record, layout.offsets, layout.sizes):
                    if row.device != device or not row.is_contiguous() or row.numel() * row.element_size() != size:
                        raise TransportError(
                            f"gather: a row of {row.numel() * row.element_size()} bytes on {row.device} "
                            f"(contiguous={row.is_contiguous()}); expected a contiguous {size}-byte row on {device}"
                        )
                    dsts.append(out[i, offset : offset + size])
                    srcs.append(row_bytes(row))
            _copy_all(dsts, srcs)
        return out

    def block_digests(self, block: torch.Tensor) -> torch.Tensor:
        """A wrapping sum of each record's 64-bit words (the NCCL transport's digest), on the stream."""
        if block.shape[-1] % 8 or not block.is_contiguous():
            return super().block_digests(block)
        with self.mover.stream_context():
            return block.view(torch.int64).sum(dim=-1)

    def collect(self, digests: list[torch.Tensor]) -> list[np.ndarray]:
        if not any(d.is_cuda for d in digests):
            return super().collect(digests)
        with self.mover.stream_context():
            host = [d.to("cpu", non_blocking=True) for d in digests]
        self._drain("row digests")
        return [h.numpy() & ((1 << 62) - 1) for h in host]

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._require()
        self._begin_session()
        self.mover.copy_local(dst, src)

    def exchange(self, ops: list[P2POp], pace_s: float = 0.0) -> None:
        self._require()
        self._begin_session()
        sends: dict[int, list[torch.Tensor]] = {}
        receives: dict[int, list[torch.Tensor]] = {}
        for op in ops:
            if op.peer not in self._peers:
                raise TransportError(f"op with rank {op.peer}: not a copy-engine peer of rank {self._rank}")
            if op.tensor.device != self.mover.device or not op.tensor.is_contiguous():
                raise TransportError(
                    f"op with peer {op.peer}: tensor on {op.tensor.device}, contiguous={op.tensor.is_contiguous()}; "
                    f"expected a contiguous tensor on {self.mover.device}"
                )
            if op.tensor.numel():
                (sends if op.is_send else receives).setdefault(op.peer, []).append(row_bytes(op.tensor))
        try:
            _Exchange(self, sends, receives).run()
        except CopyEngineError as exc:
            raise TransportError(str(exc)) from exc
        self._wait_on_host(pace_s)

    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        self._require()
        self._drain("side stream before the vote")
        return self.votes.max_reduce(values)

    def synchronize(self) -> None:
        if self._own is not None:
            self._drain("side stream")
        self._session = False

    def abort(self) -> None:
        own, self._own = self._own, None
        self._session = False
        self._store = None
        if own is not None:
            own.mark_aborted()
        self.votes.abort()
        drained = True
        try:
            deadline = time.monotonic() + 10.0
            marker = self.mover.mark()
            while not self.mover.done(marker):
                if time.monotonic() > deadline:
                    drained = False
                    break
                time.sleep(0.001)
        except Exception as exc:  # the stream never started
            log.debug("copy-engine abort: %s", exc)
        peers, self._peers = self._peers, {}
        for peer in peers.values():
            if drained:  # copies still running out of a mapping must not lose it: leak it instead
                with contextlib.suppress(Exception):
                    self.mover.close_window(peer.window)
            peer.control_file.close()
        if not drained:
            log.error(
                "copy-engine stream of generation %d still busy 10s after abort; its mappings are kept",
                self._generation,
            )
        if self._window is not None:
            self._retired.append(self._window)
            self._window = None
        if self._own_file is not None:
            self._own_file.close()
            self._own_file = None
        self._send_seq.clear()
        self._recv_seq.clear()
        self._send_streams.clear()
        self._recv_streams.clear()

    def close(self) -> None:
        """Abort, then free this rank's retired outboxes too (the process is leaving)."""
        self.abort()
        self._free_retired()


class _Exchange:
    """One ``exchange``: the sender's rounds and the receiver's pieces, driven from one host loop."""

    def __init__(
        self,
        transport: CopyEngineTransport,
        sends: dict[int, list[torch.Tensor]],
        receives: dict[int, list[torch.Tensor]],
    ) -> None:
        t = self.t = transport
        self.sends = sends
        self.receives = receives
        self.out: dict[int, SendStream] = {}
        for peer, tensors in sends.items():
            t._send_streams[peer] = t._send_streams.get(peer, 0) + 1
            self.out[peer] = SendStream(peer, [x.numel() for x in tensors], t._send_streams[peer])
        self.into: dict[int, ReceiveStream] = {}
        for peer, tensors in receives.items():
            t._recv_streams[peer] = t._recv_streams.get(peer, 0) + 1
            self.into[peer] = ReceiveStream(
                peer, [x.numel() for x in tensors], t._recv_streams[peer], t._recv_seq.get(peer, 0) + 1
            )
        self.round: _Round | None = None
        self.copying: dict[int, tuple[object, Descriptor]] = {}

    def run(self) -> None:
        t = self.t
        idle_since = time.monotonic()
        delay, next_poll = 20e-6, idle_since + 0.005
        while self.pending():
            if self.step():
                idle_since = time.monotonic()
                delay = 20e-6
                continue
            now = time.monotonic()
            if now - idle_since > t._timeout_s:
                raise TransportError(self.describe_stall())
            if now > next_poll:
                next_poll = now + 0.005
                self.check_peers()
                t._poll()
            time.sleep(delay)
            delay = min(delay * 2, 500e-6)

    def pending(self) -> bool:
        return (
            self.round is not None
            or any(s.owed for s in self.out.values())
            or any(not r.done for r in self.into.values())
        )

    def step(self) -> bool:
        """One pass over everything that can move now; ``True`` if anything did."""
        progressed = self.send_step()
        for peer, stream in self.into.items():
            if not stream.done:
                progressed = self.receive_step(peer, stream) or progressed
        return progressed

    def send_step(self) -> bool:
        t = self.t
        if self.round is None:
            owed = {peer: s.owed for peer, s in self.out.items() if s.owed}
            if not owed:
                return False
            layout = plan_round(owed, t.window_bytes)
            assert t._window is not None
            for peer, (offset, nbytes) in layout.items():
                stream = self.out[peer]
                for index, op_offset, piece_offset, part in split_span(stream.sizes, stream.sent, nbytes):
                    t.mover.fill(t._window, offset + piece_offset, self.sends[peer][index], op_offset, part)
            self.round = _Round(layout, t.mover.mark())
            return True
        r = self.round
        if not r.published:
            if not t.mover.done(r.marker):
                return False
            own = t._require()
            for peer, (offset, nbytes) in r.layout.items():
                stream = self.out[peer]
                seq = t._send_seq.get(peer, 0) + 1
                own.publish(peer, Descriptor(seq, offset, nbytes, stream.sent, stream.total, stream.stream_no))
                t._send_seq[peer] = seq
                r.published[peer] = seq
                stream.sent += nbytes
                t.bytes_sent_total += nbytes
                t.pieces_total += 1
            return True
        if all(t._peers[peer].control.acked(t._rank) >= seq for peer, seq in r.published.items()):
            self.round = None
            return True
        return False

    def receive_step(self, peer: int, stream: ReceiveStream) -> bool:
        t = self.t
        if peer in self.copying:
            marker, d = self.copying[peer]
            if not t.mover.done(marker):
                return False
            t._require().ack(peer, d.seq)
            del self.copying[peer]
            stream.received += d.nbytes
            stream.next_seq = d.seq + 1
            t._recv_seq[peer] = d.seq
            t.bytes_received_total += d.nbytes
            return True
        source = t._peers[peer]
        d = source.control.descriptor(t._rank)
        if not stream.accept(d, t._rank):
            return False
        if d.offset < 0 or d.offset + d.nbytes > source.window.nbytes:
            raise CopyEngineError(
                f"rank {peer} published bytes [{d.offset}, {d.offset + d.nbytes}) "
                f"of a {source.window.nbytes}-byte outbox"
            )
        for index, op_offset, piece_offset, part in split_span(stream.sizes, stream.received, d.nbytes):
            t.mover.pull(self.receives[peer][index], op_offset, source.window, d.offset + piece_offset, part)
        self.copying[peer] = (t.mover.mark(), d)
        return True

    def waiting_on(self) -> set[int]:
        peers = {peer for peer, s in self.into.items() if not s.done}
        if self.round is not None:
            peers |= set(self.round.published)
        return peers

    def check_peers(self) -> None:
        for peer in self.waiting_on():
            source = self.t._peers[peer]
            if source.control.state != STATE_LIVE:
                raise TransportError(
                    f"rank {peer} tore its copy-engine side communicator down (generation {self.t._generation})"
                )
            if source.pid and not process_alive(source.pid):
                raise TransportError(f"rank {peer} (pid {source.pid}) exited during a copy-engine exchange")

    def describe_stall(self) -> str:
        t = self.t
        parts = [f"from rank {p}: {s.received}/{s.total} bytes" for p, s in self.into.items() if not s.done]
        if self.round is not None:
            parts += [f"to rank {p}: piece {seq} not acknowledged" for p, seq in self.round.published.items()]
            if not self.round.published:
                parts.append("this rank's outbox fill did not complete")
        return (
            f"copy-engine exchange stalled for {t._timeout_s}s on rank {t._rank} (a peer is gone or stuck): "
            + "; ".join(parts)
        )


class SelectingTransport(Transport):
    """``auto``: copy engines when every pair of ranks can use them, else ``fallback`` (NCCL).

    The choice is made again at every ``connect`` from what every rank published, so all
    ranks of a generation use the same transport.
    """

    def __init__(self, copy_engine: CopyEngineTransport, fallback: Transport) -> None:
        self.copy_engine, self.fallback = copy_engine, fallback
        self.active: Transport | None = None
        for t in (copy_engine, fallback):
            t.poll_hook = self._poll

    @property  # type: ignore[override]
    def name(self) -> str:  # noqa: D401 - the transport of the current generation
        return f"auto:{self.active.name}" if self.active is not None else "auto"

    def _require_active(self) -> Transport:
        if self.active is None:
            raise TransportError("side communicator is not connected (aborted or never built)")
        return self.active

    def connect(self, comm: CommInit, rank: int, timeout_s: float) -> None:
        self.abort()
        if self.copy_engine.try_connect(comm, rank, timeout_s):
            self.active = self.copy_engine
        else:
            log.info(
                "generation %d: some pair of ranks cannot use peer copies; using %s",
                comm.generation,
                self.fallback.name,
            )
            self.fallback.connect(comm, rank, timeout_s)
            self.active = self.fallback

    def store_keys(self, comm: CommInit) -> list[str]:
        """Both choices' keys: which one a generation made is only known where it was built."""
        return self.copy_engine.store_keys(comm) + self.fallback.store_keys(comm)

    @property
    def connected(self) -> bool:
        return self.active is not None and self.active.connected

    @property
    def generation(self) -> int:
        return self.active.generation if self.active is not None else -1

    @property
    def busy(self) -> bool:
        return self.active is not None and self.active.busy

    def exchange(self, ops: list[P2POp], pace_s: float = 0.0) -> None:
        self._require_active().exchange(ops, pace_s)

    def start_batch(self) -> None:
        self._require_active().start_batch()

    def gather(self, records: list[list[torch.Tensor]], layout: RecordLayout) -> torch.Tensor:
        return self._require_active().gather(records, layout)

    def block_digests(self, block: torch.Tensor) -> torch.Tensor:
        return self._require_active().block_digests(block)

    def collect(self, digests: list[torch.Tensor]) -> list[np.ndarray]:
        return self._require_active().collect(digests)

    def device_context(self) -> contextlib.AbstractContextManager:
        return self.active.device_context() if self.active is not None else contextlib.nullcontext()

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._require_active().copy_local(dst, src)

    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        return self._require_active().max_reduce(values)

    def row_digest(self, row: torch.Tensor) -> int:
        return self._require_active().row_digest(row)

    def synchronize(self) -> None:
        if self.active is not None:
            self.active.synchronize()

    def abort(self) -> None:
        active, self.active = self.active, None
        if active is not None:
            active.abort()
