"""NCCL's C API through ctypes, for the one thing CuPy's binding lacks: a configured communicator.

The side communicator must be limited in how many CTAs (thread blocks, one per channel)
its kernels occupy, so the serving kernels keep their SMs while expert weights stream.
NCCL offers that per communicator through ``ncclConfig_t`` (``minCTAs``/``maxCTAs``) given
to ``ncclCommInitRankConfig``; the environment variables ``NCCL_MIN_CTAS``/``NCCL_MAX_CTAS``
would cap every communicator in the process, the serving group's included. CuPy only wraps
``ncclCommInitRank``, so a configured communicator is built here.

The library is the one CuPy already loaded (found in ``/proc/self/maps``), so the unique id,
the group calls and the communicator all come from one NCCL. The object mirrors the subset
of CuPy's ``cupy.cuda.nccl`` module and ``NcclCommunicator`` that the transport calls
(``groupStart``, ``send``, ``allReduce``, ``abort``, ...), so the transport treats both alike.

``ncclConfig_t`` only ever grows at its end, and NCCL copies ``size`` bytes of the caller's
struct over its defaults; the fields declared below (NCCL 2.17's layout) are therefore read
correctly by every later NCCL. ``version`` must say 2.17 or later: NCCL resets the CTA
fields of older configs to their defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

NCCL_UINT8 = 1
NCCL_INT64 = 4
NCCL_MAX = 2

_CONFIG_MAGIC = 0xCAFEBEEF
_CONFIG_VERSION = 21700  # NCCL_VERSION(2, 17, 0): the first layout with the CTA fields honoured
_UNDEF_INT = -(2**31)  # NCCL_CONFIG_UNDEF_INT (INT_MIN): "NCCL decides"
MAX_CHANNELS = 64  # NCCL's MAXCHANNELS on current releases; larger limits are capped by NCCL itself


class NcclLibraryError(RuntimeError):
    """An NCCL call returned an error; the message names the call, the code and NCCL's text."""


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]


class NcclConfig(ctypes.Structure):
    """``ncclConfig_t`` up to ``splitShare`` (the 2.17 layout; later NCCLs append fields)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]


def make_config(*, min_ctas: int | None = None, max_ctas: int | None = None) -> NcclConfig:
    """A blocking communicator's config with the given CTA bounds (``None``: NCCL's choice).

    Raises ``ValueError`` naming the bad bound: NCCL would silently clamp it instead.
    """
    for name, value in (("min_ctas", min_ctas), ("max_ctas", max_ctas)):
        if value is not None and not 1 <= value <= MAX_CHANNELS:
            raise ValueError(f"{name}={value}: expected 1..{MAX_CHANNELS} CTAs (or None for NCCL's choice)")
    if min_ctas is not None and max_ctas is not None and min_ctas > max_ctas:
        raise ValueError(f"min_ctas={min_ctas} > max_ctas={max_ctas}: expected min_ctas <= max_ctas")
    cfg = NcclConfig()
    cfg.size = ctypes.sizeof(NcclConfig)
    cfg.magic = _CONFIG_MAGIC
    cfg.version = _CONFIG_VERSION
    cfg.blocking = 1  # the transport bounds init with its own store barrier
    cfg.cgaClusterSize = _UNDEF_INT
    cfg.minCTAs = _UNDEF_INT if min_ctas is None else min_ctas
    cfg.maxCTAs = _UNDEF_INT if max_ctas is None else max_ctas
    cfg.netName = None
    cfg.splitShare = _UNDEF_INT
    return cfg


def loaded_nccl_paths(maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the ``libnccl`` files mapped into this process, in order of first mapping."""
    paths: list[str] = []
    try:
        with open(maps_path) as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and "libnccl" in os.path.basename(parts[5].strip()):
                    path = parts[5].strip()
                    if path not in paths:
                        paths.append(path)
    except OSError:
        pass
    return paths


def find_library() -> str:
    """The NCCL to load: the one CuPy loaded, else the pip wheel's, else the system's.

    Raises ``NcclLibraryError`` listing where it looked.
    """
    try:
        from cupy.cuda import nccl  # noqa: F401  (maps CuPy's libnccl into the process)
    except Exception:
        pass
    mapped = loaded_nccl_paths()
    if mapped:
        return mapped[0]
    looked = ["/proc/self/maps (no libnccl mapped)"]
    try:
        import nvidia.nccl  # the nvidia-nccl-cu1x wheel

        for base in list(getattr(nvidia.nccl, "__path__", [])):
            found = sorted(glob.glob(os.path.join(base, "lib", "libnccl.so*")))
            if found:
                return found[0]
            looked.append(os.path.join(base, "lib"))
    except ImportError:
        looked.append("the nvidia.nccl package (not installed)")
    name = ctypes.util.find_library("nccl")
    if name:
        return name
    looked.append("the system library path")
    raise NcclLibraryError(f"libnccl not found; looked in: {'; '.join(looked)}")


class NcclLibrary:
    """One loaded NCCL; the attribute names match ``cupy.cuda.nccl`` where the transport uses them."""

    NCCL_UINT8 = NCCL_UINT8
    NCCL_INT64 = NCCL_INT64
    NCCL_MAX = NCCL_MAX

    def __init__(self, path: str | None = None) -> None:
        self.path = path or find_library()
        try:
            self._lib = ctypes.CDLL(self.path)
        except OSError as exc:
            raise NcclLibraryError(f"cannot load NCCL from {self.path!r}: {exc}") from exc
        lib = self._lib
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            UniqueId,
            ctypes.c_int,
            ctypes.POINTER(NcclConfig),
        ]
        for fn in ("ncclSend", "ncclRecv"):
            getattr(lib, fn).argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
        lib.ncclAllReduce.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclCommGetAsyncError.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        version = ctypes.c_int()
        self._check("ncclGetVersion", lib.ncclGetVersion(ctypes.byref(version)))
        self.version = version.value
        if self.version < 21700:
            raise NcclLibraryError(f"NCCL {self.version} at {self.path}: per-communicator CTA limits need NCCL >= 2.17")

    def _check(self, call: str, result: int) -> None:
        if result != 0:
            text = self._lib.ncclGetErrorString(result)
            raise NcclLibraryError(f"{call} failed: NCCL error {result} ({text.decode() if text else 'unknown'})")

    def get_version(self) -> int:
        return self.version

    def get_unique_id(self) -> bytes:
        uid = UniqueId()
        self._check("ncclGetUniqueId", self._lib.ncclGetUniqueId(ctypes.byref(uid)))
        return ctypes.string_at(ctypes.addressof(uid), 128)

    def groupStart(self) -> None:  # noqa: N802  (CuPy's name)
        self._check("ncclGroupStart", self._lib.ncclGroupStart())

    def groupEnd(self) -> None:  # noqa: N802
        self._check("ncclGroupEnd", self._lib.ncclGroupEnd())

    def communicator(
        self, nranks: int, unique_id: bytes, rank: int, *, min_ctas: int | None = None, max_ctas: int | None = None
    ) -> ConfiguredCommunicator:
        """``ncclCommInitRankConfig`` (blocking: returns once every rank has joined)."""
        if len(unique_id) != 128:
            raise ValueError(f"NCCL unique id of {len(unique_id)} bytes, expected 128")
        if not 0 <= rank < nranks:
            raise ValueError(f"rank={rank}: expected 0 <= rank < nranks={nranks}")
        config = make_config(min_ctas=min_ctas, max_ctas=max_ctas)
        uid = UniqueId()
        ctypes.memmove(ctypes.addressof(uid), unique_id, 128)
        handle = ctypes.c_void_p()
        self._check(
            f"ncclCommInitRankConfig(nranks={nranks}, rank={rank}, minCTAs={min_ctas}, maxCTAs={max_ctas})",
            self._lib.ncclCommInitRankConfig(ctypes.byref(handle), nranks, uid, rank, ctypes.byref(config)),
        )
        return ConfiguredCommunicator(self, handle.value, min_ctas=min_ctas, max_ctas=max_ctas)


class ConfiguredCommunicator:
    """A communicator from :meth:`NcclLibrary.communicator`; CuPy ``NcclCommunicator``'s call shapes."""

    def __init__(self, library: NcclLibrary, handle: int, *, min_ctas: int | None, max_ctas: int | None) -> None:
        self._library = library
        self._handle: int | None = handle
        self.min_ctas = min_ctas
        self.max_ctas = max_ctas

    def _live(self) -> int:
        if self._handle is None:
            raise NcclLibraryError("NCCL communicator already aborted or destroyed")
        return self._handle

    def send(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        self._library._check("ncclSend", self._library._lib.ncclSend(ptr, count, dtype, peer, self._live(), stream))

    def recv(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        self._library._check("ncclRecv", self._library._lib.ncclRecv(ptr, count, dtype, peer, self._live(), stream))

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, dtype: int, op: int, stream: int) -> None:  # noqa: N802
        self._library._check(
            "ncclAllReduce", self._library._lib.ncclAllReduce(sendbuf, recvbuf, count, dtype, op, self._live(), stream)
        )

    def check_async_error(self) -> None:
        state = ctypes.c_int()
        self._library._check(
            "ncclCommGetAsyncError", self._library._lib.ncclCommGetAsyncError(self._live(), ctypes.byref(state))
        )
        self._library._check("asynchronous NCCL operation", state.value)

    def abort(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._library._check("ncclCommAbort", self._library._lib.ncclCommAbort(handle))

    def destroy(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._library._check("ncclCommDestroy", self._library._lib.ncclCommDestroy(handle))
