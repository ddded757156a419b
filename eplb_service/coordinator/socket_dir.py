"""The private directory of an ``ipc://`` endpoint: created 0700, and refused when it is not ours.

Another local user who creates the directory first (``/tmp/eplb-service-<uid>`` is a
predictable name) could swap the socket in it and answer in the coordinator's place,
to a status query run as root, say. So the coordinator and ``eplb-coordinator status``
check that the directory is a real directory, owned by the current user, closed to others.
"""

from __future__ import annotations

import os
import stat


class UnsafeSocketDirectory(RuntimeError):
    """The directory of an ``ipc://`` endpoint is not this user's private directory."""


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
        raise UnsafeSocketDirectory(
            f"socket directory {directory} has mode {stat.S_IMODE(info.st_mode):04o}, "
            "expected 0700 (private to its owner)"
        )


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

    A directory that exists already must be ours: owned by this user (checked before the
    chmod, which would fail on someone else's anyway), then made 0700.
    """
    directory = ipc_dir(endpoint)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
        if info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(directory, 0o700)
        check_private_dir(directory)
