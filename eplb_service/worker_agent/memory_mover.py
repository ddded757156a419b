"""Memory movers: the device-specific half of the copy-engine transport.

A mover owns the transport's stream, allocates the outbox window that peers open, opens
theirs, and enqueues the copies; :mod:`.transport_copy_engine` drives it with the pure
protocol of :mod:`.copy_engine`. Two implementations of one interface:

- :class:`CudaIpcMover`: the outbox is a plain ``cudaMalloc`` allocation (its own, so the
  IPC handle names it at offset 0), exported with ``cudaIpcGetMemHandle`` and opened by
  peers with ``cudaIpcOpenMemHandle`` (lazy peer access: the mapping lives in the
  opener's own context, no context on the peer's GPU). Every copy is one
  ``cudaMemcpyAsync`` on the transport's low-priority stream: the copy engines move the
  bytes, no SM and no NCCL kernel is involved. CuPy's runtime bindings make the calls
  (CuPy is already what the NCCL transport needs).
- :class:`HostMemoryMover`: the CPU stand-in. The outbox is a shared-memory file that
  peers map; copies are plain tensor copies. It runs the transport's whole protocol
  between real processes in CPU tests (and on CPU workers when forced).

Control blocks are host shared memory for both (:class:`SharedFile`).
"""

from __future__ import annotations

import abc
import contextlib
import mmap
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass, field

import torch

_FENCE_LOCK = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier on the host (a lock's acquire and release).

    Control-block words are written by one process and read by another; x86 keeps stores in
    order anyway, Arm hosts (Grace) need the barrier between a descriptor's fields and its
    sequence number.
    """
    with _FENCE_LOCK:
        pass


def shared_dir() -> str:
    """Where shared-memory files go: ``/dev/shm`` where there is one, else the temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


@dataclass
class SharedFile:
    """A file mapped into memory, shared by path between the processes of one host.

    The creator removes the name (:meth:`unlink`) once every peer has mapped it: the
    mappings stay valid, and nothing is left behind when a process dies later.
    """

    path: str
    size: int
    map: mmap.mmap
    owner: bool
    closed: bool = False

    @classmethod
    def create(cls, size: int, tag: str) -> SharedFile:
        path = os.path.join(shared_dir(), f"eplb-ce-{os.getpid()}-{secrets.token_hex(6)}-{tag}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, mapped, owner=True)

    @classmethod
    def open(cls, path: str, size: int) -> SharedFile:
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise OSError(f"{path} has {actual} bytes, expected {size}")
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, mapped, owner=False)

    def unlink(self) -> None:
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        """Unmap (after :meth:`unlink` for the owner); views still alive keep the mapping until freed."""
        if self.closed:
            return
        self.closed = True
        self.unlink()
        with contextlib.suppress(BufferError):  # a numpy/torch view still exports it: freed with the view
            self.map.close()


@dataclass
class Window:
    """An outbox: this rank's own (``local``) or a peer's, opened here."""

    nbytes: int
    local: bool
    ptr: int = 0
    """Device address (CUDA)."""
    file: SharedFile | None = None
    """Backing file (CPU stand-in)."""
    tensor: torch.Tensor | None = field(default=None, repr=False)
    """A flat ``uint8`` view of the memory (CPU stand-in)."""


class MemoryMover(abc.ABC):
    """Stream, windows and copies of one rank's copy-engine transport."""

    name: str = "abstract"
    device: torch.device

    @abc.abstractmethod
    def device_id(self) -> str:
        """This rank's device as peers can recognise it (a GPU UUID)."""

    @abc.abstractmethod
    def can_reach(self, device_id: str) -> bool:
        """Whether this rank could map and copy from memory on the peer device ``device_id``."""

    def use_device(self) -> None:  # noqa: B027 - only CUDA has a current device per thread
        """Make this mover's device current on the calling thread."""

    def start(self) -> None:  # noqa: B027 - only CUDA has streams
        """A fresh stream for a new generation."""

    def begin_session(self) -> None:  # noqa: B027 - only CUDA has streams
        """Order what the transport enqueues from now on after the serving stream's queued work."""

    def stream_context(self) -> contextlib.AbstractContextManager:
        """Where the transport's own tensor work is enqueued."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def create_window(self, nbytes: int) -> tuple[Window, str]:
        """Allocate this rank's outbox; returns it and the handle peers open it with."""

    def unpublish(self, window: Window) -> None:  # noqa: B027 - only files have names to remove
        """Every peer has opened ``window`` (or given up): drop whatever names it."""

    @abc.abstractmethod
    def open_window(self, handle: str, nbytes: int) -> Window:
        """Map a peer's outbox here."""

    @abc.abstractmethod
    def close_window(self, window: Window) -> None:
        """Unmap a peer's outbox (opened) or free this rank's own (local)."""

    @abc.abstractmethod
    def fill(self, window: Window, offset: int, src: torch.Tensor, src_offset: int, nbytes: int) -> None:
        """Enqueue ``src[src_offset:+nbytes]`` (flat ``uint8``) into this rank's ``window`` at ``offset``."""

    @abc.abstractmethod
    def pull(self, dst: torch.Tensor, dst_offset: int, window: Window, offset: int, nbytes: int) -> None:
        """Enqueue a peer ``window``'s bytes ``[offset, +nbytes)`` into ``dst[dst_offset:]`` (flat ``uint8``)."""

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue ``dst.copy_(src)`` on the mover's stream."""
        dst.copy_(src)

    def mark(self) -> object:
        """A marker after everything enqueued so far (:meth:`done` tells when it is reached)."""
        return None

    def done(self, marker: object) -> bool:
        return True


class HostMemoryMover(MemoryMover):
    """The CPU stand-in: outboxes are shared-memory files, copies are synchronous."""

    name = "host"

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def device_id(self) -> str:
        return "cpu"

    def can_reach(self, device_id: str) -> bool:
        return device_id == "cpu"

    def create_window(self, nbytes: int) -> tuple[Window, str]:
        file = SharedFile.create(nbytes, "window")
        return Window(nbytes, True, file=file, tensor=torch.frombuffer(file.map, dtype=torch.uint8)), file.path

    def unpublish(self, window: Window) -> None:
        if window.file is not None:
            window.file.unlink()

    def open_window(self, handle: str, nbytes: int) -> Window:
        file = SharedFile.open(handle, nbytes)
        return Window(nbytes, False, file=file, tensor=torch.frombuffer(file.map, dtype=torch.uint8))

    def close_window(self, window: Window) -> None:
        window.tensor = None
        if window.file is not None:
            window.file.close()

    @staticmethod
    def _view(window: Window) -> torch.Tensor:
        if window.tensor is None:
            raise RuntimeError("copy through a closed window")
        return window.tensor

    def fill(self, window: Window, offset: int, src: torch.Tensor, src_offset: int, nbytes: int) -> None:
        self._view(window)[offset : offset + nbytes].copy_(src[src_offset : src_offset + nbytes])

    def pull(self, dst: torch.Tensor, dst_offset: int, window: Window, offset: int, nbytes: int) -> None:
        dst[dst_offset : dst_offset + nbytes].copy_(self._view(window)[offset : offset + nbytes])


def _runtime():
    from cupy.cuda import runtime

    return runtime


class CudaIpcMover(MemoryMover):
    """CUDA IPC windows and ``cudaMemcpyAsync`` on a low-priority side stream.

    Args:
        device: this rank's GPU.
        serving_stream: the stream the serving thread enqueues commits on (default: the
            constructing thread's current stream: build the transport on the serving thread).
    """

    name = "cuda-ipc"

    def __init__(self, device: torch.device | int | str, serving_stream: torch.cuda.Stream | None = None) -> None:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaIpcMover needs a CUDA device, got {dev}")
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.index = int(self.device.index or 0)
        self.runtime = _runtime()  # ImportError without CuPy: the caller names the variable that chose this
        self.serving_stream = serving_stream if serving_stream is not None else torch.cuda.current_stream(self.device)
        self.stream: torch.cuda.Stream | None = None
        self._kind = getattr(self.runtime, "memcpyDefault", 4)  # cudaMemcpyDefault: direction from the addresses

    @staticmethod
    def uuid_of(index: int) -> str:
        """The GPU's UUID (the same in every process, whatever ``CUDA_VISIBLE_DEVICES`` numbers it)."""
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        if uuid is None:  # pragma: no cover - torch before 2.2
            return f"{props.name}/{getattr(props, 'pci_bus_id', index)}"
        try:
            return bytes(uuid.bytes).hex()
        except (AttributeError, TypeError):
            return str(uuid)

    def device_id(self) -> str:
        return self.uuid_of(self.index)

    def can_reach(self, device_id: str) -> bool:
        for other in range(torch.cuda.device_count()):
            if self.uuid_of(other) == device_id:
                return other == self.index or bool(torch.cuda.can_device_access_peer(self.index, other))
        return False  # the peer's GPU is not visible to this process

    def use_device(self) -> None:
        torch.cuda.set_device(self.device)
        self.runtime.setDevice(self.index)  # CuPy's runtime may be another copy of libcudart

    def start(self) -> None:
        self.use_device()
        self.stream = torch.cuda.Stream(self.device, priority=0)  # 0 = lowest priority on CUDA

    def _require_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            raise RuntimeError("the copy-engine stream is not started")
        return self.stream

    def begin_session(self) -> None:
        fence = torch.cuda.Event()
        fence.record(self.serving_stream)
        self._require_stream().wait_event(fence)

    def stream_context(self) -> contextlib.AbstractContextManager:
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def create_window(self, nbytes: int) -> tuple[Window, str]:
        self.use_device()
        ptr = int(self.runtime.malloc(nbytes))
        try:
            handle = bytes(self.runtime.ipcGetMemHandle(ptr))
        except Exception:
            self.runtime.free(ptr)
            raise
        return Window(nbytes, True, ptr=ptr), handle.hex()

    def open_window(self, handle: str, nbytes: int) -> Window:
        self.use_device()
        # CuPy's default flag is cudaIpcMemLazyEnablePeerAccess: mapped into this GPU's context.
        return Window(nbytes, False, ptr=int(self.runtime.ipcOpenMemHandle(bytes.fromhex(handle))))

    def close_window(self, window: Window) -> None:
        if not window.ptr:
            return
        self.use_device()
        ptr, window.ptr = window.ptr, 0
        if window.local:
            self.runtime.free(ptr)
        else:
            self.runtime.ipcCloseMemHandle(ptr)

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        stream = self._require_stream()
        self.runtime.memcpyAsync(dst, src, nbytes, self._kind, stream.cuda_stream)

    def fill(self, window: Window, offset: int, src: torch.Tensor, src_offset: int, nbytes: int) -> None:
        self._copy(window.ptr + offset, src.data_ptr() + src_offset, nbytes)
        src.record_stream(self._require_stream())

    def pull(self, dst: torch.Tensor, dst_offset: int, window: Window, offset: int, nbytes: int) -> None:
        self._copy(dst.data_ptr() + dst_offset, window.ptr + offset, nbytes)
        dst.record_stream(self._require_stream())

    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        stream = self._require_stream()
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        dst.record_stream(stream)
        src.record_stream(stream)

    def mark(self) -> object:
        event = torch.cuda.Event()
        event.record(self._require_stream())
        return event

    def done(self, marker: object) -> bool:
        return marker is None or bool(marker.query())  # type: ignore[attr-defined]
