"""The private directory of an ``ipc://`` endpoint: created 0700, and refused when it is not ours.

Another local user who creates the directory first (``/tmp/eplb-service-<uid>`` is a
predictable name) could swap the socket in it and answer in the coordinator's place,
to a status query run as root, say. So the coordinator and ``eplb-coordinator status``
check that the directory is a real directory, owned by the current user, closed to others.

A directory that exists already is never changed: it may be a shared one (``/tmp``, a
home directory) that other programs rely on, so making it 0700 would break them, and one
that others can write to may hold a socket they put there. It is refused instead, with
what to do.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import stat

from eplb_service.coordinator.config import default_endpoint


class UnsafeSocketDirectory(RuntimeError):
    """The directory of an ``ipc://`` endpoint is not this user's private directory."""


def _owner(uid: int) -> str:
    """``uid 0 (root)``: the name helps a reader see whose directory it is; the uid alone when it has none."""
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _private_alternative(directory: str) -> str:
    """What to give instead of ``directory``: a directory of its own, which the coordinator creates 0700."""
    default = default_endpoint()
    own = f", such as the default {default}" if ipc_dir(default) != directory else ""
    return f"choose an --endpoint in a directory of its own that does not exist yet (created 0700){own}"


def _mode_problem(directory: str, info: os.stat_result) -> str:
    """Why a directory open to others is refused, and what to do; it names the mode and the owner.

    A directory that others can write to is shared (``/tmp``, say): the fix is another
    directory, not a chmod that would lock its other users out. One that others can only
    read may be this user's own: a chmod is the fix when nothing else lives there.
    """
    mode = stat.S_IMODE(info.st_mode)
    head = (
        f"socket directory {directory} has mode {mode:04o}, expected 0700 (private to its owner); "
        f"owner {_owner(info.st_uid)}; it is left as it is"
    )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{head}: others can write there and replace the socket, so {_private_alternative(directory)}"
    return f"{head}: `chmod 700 {directory}` if only the socket lives there, or {_private_alternative(directory)}"


def check_private_dir(directory: str, uid: int | None = None) -> None:
    """Refuse a directory another user could have prepared: a symlink, another owner, or open to others.

    Another user who created the directory first could swap the socket in it and answer in
    the coordinator's place (to a status query run as root, say).
    """
    uid = os.geteuid() if uid is None else uid
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketDirectory(
            f"socket directory {directory} is a symlink or not a directory; expected a "
            f"directory owned by uid {uid} with mode 0700"
        )
    if info.st_uid != uid:
        raise UnsafeSocketDirectory(
            f"socket directory {directory} is owned by uid {info.st_uid}, not by this user "
            f"(uid {uid}): another user may have prepared it; remove it or choose another "
            "--endpoint"
        )
    if info.st_mode & 0o077:
        raise UnsafeSocketDirectory(_mode_problem(directory, info))


def socket_file_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint; ``None`` for ``tcp://`` and Linux's abstract
    namespace (``ipc://@name``), which have none."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return endpoint[len("ipc://") :]


def ipc_dir(endpoint: str) -> str | None:
    if endpoint.startswith("ipc://"):
        return os.path.dirname(endpoint[len("ipc://") :]) or None
    return None


def check_endpoint_dir(endpoint: str) -> None:
    """For clients: refuse an ``ipc://`` endpoint whose directory is not this user's (a missing one is fine)."""
    directory = ipc_dir(endpoint)
    if directory and os.path.lexists(directory):
        check_private_dir(directory)


def prepare_ipc_dir(endpoint: str) -> None:
    """Create the directory of an ``ipc://`` endpoint, private to this user (0700), or refuse it.

    Only a directory created here gets its mode from here; one that exists already is
    checked as it is (see the module docstring for why it is never chmod-ed).
    """
    directory = ipc_dir(endpoint)
    if not directory:
        return
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        if not os.path.lexists(directory):  # else it is there but no directory: the check below says so
            raise UnsafeSocketDirectory(
                f"cannot create socket directory {directory}: {exc.strerror}; choose another --endpoint"
            ) from None
    check_private_dir(directory)


class EndpointUnavailable(RuntimeError):
    """The ``ipc://`` endpoint is held by a live process (or cannot be checked): this coordinator must not start."""


def claim_ipc_endpoint(endpoint: str, probe_timeout_s: float = 2.0) -> str | None:
    """Make an ``ipc://`` endpoint free to bind, or raise :class:`EndpointUnavailable` naming who holds it.

    ZeroMQ's ipc bind unlinks whatever socket file is at the path, so a second coordinator
    would silently take the endpoint over: agents connecting from then on reach it, while
    the first keeps running with the agents it has. So a socket something listens on is
    refused (naming the coordinator's pid when it answers a status request), and a socket
    nobody listens on, left by a coordinator that died, is removed. Two coordinators
    starting in the same instant can still both pass; this guards against the common case.
    ``tcp://`` needs none of it: binding a port in use fails. Returns a line for the log
    when a stale socket was removed.
    """
    path = socket_file_path(endpoint)
    if path is None:  # tcp://, or the abstract namespace, where a bind fails when taken
        return None
    try:
        state = socket_file_state(path)
    except OSError as exc:
        raise EndpointUnavailable(f"cannot check the endpoint's socket {path}: {exc.strerror}") from None
    if state is SocketFile.MISSING:
        return None
    if state is SocketFile.NOT_A_SOCKET:
        raise EndpointUnavailable(f"{path} is not a socket; expected a coordinator's ipc:// socket or nothing there")
    if state is SocketFile.STALE:
        os.unlink(path)
        return f"removed the stale socket {path} (no process listens on it)"
    import zmq

    from eplb_service.coordinator.status_client import fetch_status
    from eplb_service.protocol import ProtocolError
    from eplb_service.security import SecurityError

    try:
        pid = fetch_status(endpoint, timeout_s=probe_timeout_s).get("pid")
    except (
        TimeoutError,
        ProtocolError,
        zmq.ZMQError,
        SecurityError,
    ) as exc:  # not a coordinator, still not ours to replace
        raise EndpointUnavailable(
            f"a process listens on {path} but does not answer as a coordinator ({exc}); "
            "stop it or choose another --endpoint"
        ) from None
    raise EndpointUnavailable(
        f"a coordinator (pid {pid}) already serves {endpoint}; stop it first or choose another --endpoint"
    )


class SocketFile(enum.Enum):
    """What is at an ``ipc://`` endpoint's path."""

    MISSING = "missing"
    NOT_A_SOCKET = "not a socket"
    STALE = "stale"
    """A socket nobody listens on: its coordinator died, or has not listened yet."""
    LISTENING = "listening"


def socket_file_state(path: str) -> SocketFile:
    """What is at ``path``: the one reading the coordinator's claim, the sidecar's check and
    ``status`` make of it. ``OSError`` where the path cannot be read; :class:`EndpointUnavailable`
    where a socket there cannot be probed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return SocketFile.MISSING
    if not stat.S_ISSOCK(mode):
        return SocketFile.NOT_A_SOCKET
    return SocketFile.LISTENING if unix_socket_listening(path) else SocketFile.STALE


def unix_socket_listening(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path`` (refused = nobody listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise EndpointUnavailable(f"cannot check the endpoint's socket {path}: {exc.strerror or exc}") from None
        return True


def ipc_socket_identity(endpoint: str) -> tuple[int, int] | None:
    """``(device, inode)`` of an ``ipc://`` endpoint's socket file right after the bind; ``None``
    for ``tcp://``, the abstract namespace or a file that is not there."""
    path = socket_file_path(endpoint)
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def release_ipc_endpoint(endpoint: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file a stopped coordinator bound, if it is still that very file.

    ZeroMQ leaves it behind: ``ls`` and ``test -S`` then show an endpoint nobody listens on
    until the next start removes it as stale. A file another coordinator bound since (another
    inode) is left alone."""
    path = socket_file_path(endpoint)
    if path is None or identity is None or ipc_socket_identity(endpoint) != identity:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
