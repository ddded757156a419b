"""Endpoint security: local by default, CURVE (ZeroMQ's Curve25519) for anything else.

- ``ipc://`` endpoints live in a 0700 directory (see ``coordinator.socket_dir``).
- ``tcp://`` on a loopback address needs nothing more.
- ``tcp://`` on any other address needs CURVE keys, unless ``--insecure`` is given, which
  the coordinator logs loudly.

Key layout (``eplb-coordinator keygen DIR``)::

    DIR/server.key             server public certificate   (give to every agent)
    DIR/server.key_secret      server secret certificate   (coordinator only)
    DIR/clients/agent.key      agent public certificate    (coordinator: who may connect)
    DIR/agent.key_secret       agent secret certificate    (give to every agent)

``DIR`` and ``DIR/clients`` are created 0700 (an existing one must be private already: it is
never chmod-ed), the secret files 0600 from their creation on.

Agents read ``EPLB_SERVICE_CURVE_SERVER_CERT`` (path of ``server.key``) and
``EPLB_SERVICE_CURVE_CLIENT_CERT`` (path of ``agent.key_secret``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass

import zmq
import zmq.auth

SERVER_CERT_ENV = "EPLB_SERVICE_CURVE_SERVER_CERT"
CLIENT_CERT_ENV = "EPLB_SERVICE_CURVE_CLIENT_CERT"


class SecurityError(ValueError):
    """An endpoint or key setup that would expose the coordinator; the message says how to fix it."""


def is_local_endpoint(endpoint: str) -> bool:
    """``ipc://`` or ``tcp://`` on a loopback address."""
    if endpoint.startswith("ipc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_endpoint_security(endpoint: str, curve_dir: str | None, insecure: bool) -> None:
    if is_local_endpoint(endpoint) or curve_dir or insecure:
        return
    raise SecurityError(
        f"endpoint {endpoint!r} is reachable from other hosts: give --curve-dir DIR (create it with "
        "`eplb-coordinator keygen DIR`) or pass --insecure to accept unauthenticated, unencrypted traffic"
    )


class KeyDirectoryError(SecurityError):
    """``keygen``'s directory cannot hold the keys safely, or cannot be made or written; the message says why."""


def generate_keys(directory: str) -> dict[str, str]:
    """Create the server and agent key pairs (see the module docstring); returns their paths.

    ``directory`` (and its ``clients/``) is created 0700 when missing; an existing one must be
    private already (:func:`_check_key_dir`), because it is never chmod-ed: ``keygen .`` or
    ``keygen ~`` must not lock everyone else out of a shared directory. Secret files are
    created 0600 (:func:`_write_new_file`), so no one else can ever read them.
    """
    clients = os.path.join(directory, "clients")
    _prepare_key_dir(directory)
    _prepare_key_dir(clients)
    paths: dict[str, str] = {}
    for role in ("server", "agent"):
        public, secret = zmq.curve_keypair()
        where = clients if role == "agent" else directory  # the coordinator admits the keys in clients/
        paths[f"{role}_public"] = _write_certificate(os.path.join(where, f"{role}.key"), public)
        paths[f"{role}_secret"] = _write_certificate(os.path.join(directory, f"{role}.key_secret"), public, secret)
    return paths


def _prepare_key_dir(directory: str) -> None:
    """Create ``directory`` 0700 (with any missing parents), or check the one already there."""
    if not directory:
        raise KeyDirectoryError("keygen needs a directory for the keys; got an empty path")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        if not os.path.lexists(directory):  # else it is there but no directory: the check below says so
            raise KeyDirectoryError(f"cannot create the key directory {directory!r}: {exc.strerror}") from None
    _check_key_dir(directory)


def _check_key_dir(directory: str) -> None:
    """Refuse a key directory that is not a real directory of this user's, closed to others.

    Whoever can write to it could swap ``clients/agent.key`` (and be admitted by the
    coordinator) or ``server.key`` (and pose as the coordinator to every agent); a symlink
    can be pointed elsewhere after this check.
    """
    uid = os.geteuid()
    info = os.lstat(directory)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        what = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
        raise KeyDirectoryError(
            f"key directory {directory!r} is {what}; expected a directory of this user's (uid {uid}) "
            "with mode 0700, or a path that does not exist yet (created 0700)"
        )
    if info.st_uid != uid or mode & 0o077:
        raise KeyDirectoryError(
            f"key directory {directory!r} has mode {mode:04o} and owner uid {info.st_uid}; expected mode 0700 "
            f"and owner uid {uid} (this user), as others could replace the keys in it; it is left as it is: "
            f"{_key_dir_remedy(directory, info, uid)}"
        )


def _key_dir_remedy(directory: str, info: os.stat_result, uid: int) -> str:
    """What to do about a refused key directory: a chmod only for one of this user's that others cannot write.

    One that others can write to is shared (``/tmp``, say), and another user's is not ours to
    change: a chmod there would lock the others out, so the fix is a directory of the keys' own.
    """
    new_dir = "give a path that does not exist yet, which keygen creates 0700 (a new subdirectory, say)"
    if info.st_uid == uid and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"`chmod 700 {directory}` if it holds only these keys, or {new_dir}"
    return new_dir


def _write_certificate(path: str, public: bytes, secret: bytes | None = None) -> str:
    """A certificate in ZeroMQ's format (what ``zmq.auth.load_certificate`` reads); 0600 when it holds ``secret``."""
    kind = "**Secret** Certificate: DO NOT PROVIDE THIS FILE TO OTHER USERS" if secret else "Public Certificate"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now()} by eplb-coordinator keygen  ****",
        f"#   ZeroMQ CURVE {kind}",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    _write_new_file(path, "\n".join(lines) + "\n", 0o600 if secret else 0o644)
    return path


def _write_new_file(path: str, text: str, mode: int) -> None:
    """Put ``text`` at ``path`` in a new file that has ``mode`` from its creation on.

    The file is created beside ``path`` (``mkstemp``: a fresh name, 0600) and renamed over
    it: writing into an existing file would keep that file's mode (a 0644 secret from an
    older keygen stays 0644), and a chmod after writing leaves a moment when others can read it.
    """
    try:
        fd, staged = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    except OSError as exc:
        raise KeyDirectoryError(f"cannot write {path!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(staged, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the error to report is the one above
            os.unlink(staged)
        raise KeyDirectoryError(f"cannot write {path!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class ClientCurve:
    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_cert: str, client_cert: str) -> "ClientCurve":
        try:
            server_public, _ = zmq.auth.load_certificate(server_cert)
            client_public, client_secret = zmq.auth.load_certificate(client_cert)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot load CURVE certificates {server_cert!r} / {client_cert!r}: {exc}") from None
        if client_secret is None:
            raise SecurityError(f"{client_cert!r} holds no secret key: give the agent's .key_secret file")
        return cls(server_public, client_public, client_secret)

    @classmethod
    def from_env(cls) -> "ClientCurve | None":
        server, client = os.environ.get(SERVER_CERT_ENV), os.environ.get(CLIENT_CERT_ENV)
        if not server and not client:
            return None
        if not (server and client):
            raise SecurityError(f"set both {SERVER_CERT_ENV} and {CLIENT_CERT_ENV}, or neither")
        return cls.from_files(server, client)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


def apply_server_curve(sock: zmq.Socket, curve_dir: str) -> None:
    """Make ``sock`` a CURVE server with the keys in ``curve_dir`` (before bind)."""
    try:
        public, secret = zmq.auth.load_certificate(os.path.join(curve_dir, "server.key_secret"))
    except (OSError, ValueError) as exc:
        raise SecurityError(
            f"cannot load {curve_dir}/server.key_secret (create it with `eplb-coordinator keygen {curve_dir}`): {exc}"
        ) from None
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
