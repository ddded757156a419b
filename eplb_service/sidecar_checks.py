"""The sidecar's start-up checks: whatever would make the coordinator or the agents fail after
vLLM started (a taken port, an endpoint agents cannot reach, a log variable ``logging`` refuses)
is found before anything starts and reported as one :class:`UsageError`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import NoReturn

import zmq

from eplb_service import logutil
from eplb_service.coordinator import config
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.http_endpoints import listen_socket
from eplb_service.coordinator.socket_dir import (
    EndpointUnavailable,
    SocketFile,
    UnsafeSocketDirectory,
    claim_ipc_endpoint,
    prepare_ipc_dir,
    socket_file_state,
)
from eplb_service.security import ClientCurve, SecurityError
from eplb_service.vllm_command import UsageError
from eplb_service.zmq_tcp import allow_ipv6


def log_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``EPLB_SERVICE_LOG_LEVEL``/``_FORMAT`` spelled as every process takes them, or ``UsageError``.

    The sidecar sets the checked, spelled-out values for itself and its children (the
    coordinator and vLLM's workers), so a bad one is one line here rather than a failure in
    each child. Unset or blank variables are left out.
    """
    out = {}
    level = environ.get(logutil.LOG_LEVEL_ENV, "").strip()
    if level:
        try:
            logutil.parse_level(level, logutil.LOG_LEVEL_ENV)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out[logutil.LOG_LEVEL_ENV] = level.upper()
    fmt = environ.get(logutil.LOG_FORMAT_ENV, "").strip()
    if fmt:
        if fmt.lower() not in ("text", "json"):
            raise UsageError(f"{logutil.LOG_FORMAT_ENV}={fmt!r} is not a log format; expected 'text' or 'json'")
        out[logutil.LOG_FORMAT_ENV] = fmt.lower()
    return out


def check_plugin_environment(environ: Mapping[str, str], endpoint: str) -> None:
    """The plugin's ``EPLB_SERVICE_*`` variables as every vLLM process will read them, or ``UsageError``.

    vLLM loads the plugin in its API server first, which raises on a bad value: a traceback
    after vLLM's start-up lines, with the coordinator already started. Here it is one line
    before anything starts, naming the variable and its value.
    """
    from eplb_service.integrations.vllm import config as plugin_config

    try:
        plugin_config.from_env({**environ, plugin_config.ENDPOINT: endpoint})
    except plugin_config.ConfigError as exc:
        raise UsageError(f"{exc} (read by the vLLM plugin)") from None
    log = logutil.rank_logger(__name__, "sidecar")
    for line in plugin_config.unknown_variables(environ):
        log.warning("%s", line)
    inherited = environ.get(plugin_config.ENDPOINT, "").strip()
    if inherited and inherited != endpoint:  # a host-wide setting the user may think the sidecar follows
        log.warning(
            "%s=%s in this environment is not used: vLLM's workers get this sidecar's coordinator, %s "
            "(--endpoint %s to take that one)",
            plugin_config.ENDPOINT,
            inherited,
            endpoint,
            inherited,
        )


def coordinator_settings(coordinator_args: list[str]) -> argparse.Namespace:
    """The coordinator's flags as it will read them (its ``--config`` file included); ``dp``, ``tp``: ``None`` if unset.

    Parsed here, before anything starts, so that a bad flag is one line from the sidecar rather
    than a coordinator that exits, and so that the sizes the user gave can be checked against vLLM's.
    """
    from eplb_service.coordinator import cli

    def refuse(message: str) -> NoReturn:
        raise UsageError(f"{message} (in the flags for the coordinator: see `eplb-coordinator serve --help`)")

    parser = cli.build_parser()
    serve = cli.subcommand_parser(parser, "serve")
    serve.set_defaults(dp=None, tp=None)
    parser.error = serve.error = refuse  # type: ignore[method-assign]
    try:
        return cli.parse_command_line(["serve", *coordinator_args], parser)
    except ValueError as exc:  # the coordinator's --config file
        raise UsageError(str(exc)) from None


def check_coordinator_config(settings: argparse.Namespace, endpoint: str, ranks: tuple[int, int]) -> None:
    """Refuse what the coordinator would refuse at its start (``UsageError``), with the ranks and
    endpoint the sidecar will give it: a ``--record`` directory that does not exist, an
    ``--initial-placement`` it cannot read, a ``--log-level`` ``logging`` does not know. Found
    after the start, each was the coordinator's own error and a second line from the sidecar.

    ``--simulate`` is refused outright: the coordinator would run simulated ranks in place of
    vLLM's, a process per rank, and exit before the sidecar ever started vLLM."""
    from eplb_service.coordinator import cli

    if settings.simulate:
        raise UsageError(
            "--simulate runs simulated ranks in place of vLLM; the sidecar runs the vLLM command: drop --simulate, "
            "or run `eplb-coordinator --simulate` on its own"
        )
    given = argparse.Namespace(**{**vars(settings), "dp": ranks[0], "tp": ranks[1], "endpoint": endpoint})
    try:
        if settings.log_level is not None:
            logutil.parse_level(settings.log_level, "--log-level")
        cli.config_from_args(given)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _http_host() -> str | None:
    """The address the coordinator's HTTP endpoints bind (``CoordinatorConfig.http_host``; no flag sets it)."""
    return next(f.default for f in dataclasses.fields(CoordinatorConfig) if f.name == "http_host")  # type: ignore[return-value]


def listen_problem(host: str | None, port: int) -> str | None:
    """Why a TCP server could not listen on ``host:port`` now (the kernel's words), or ``None``.

    A port in use would end the coordinator in a traceback after it started; asked here first,
    with the coordinator's own listener (:func:`~.http_endpoints.listen_socket`), opened and
    closed. A host that does not resolve (zmq also takes interface names) is left to the
    coordinator.
    """
    try:
        listen_socket(host, port).close()
    except socket.gaierror:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_metrics_port(port: int | None) -> None:
    """Refuse a ``--metrics-port`` in use: the coordinator would exit at start, after the sidecar
    had reported it starting (the coordinator's parser already refuses one outside 0-65535)."""
    if port is None:
        return
    problem = None if port == 0 else listen_problem(_http_host(), port)
    if problem:
        raise UsageError(
            f"--metrics-port {port}: cannot listen on it ({problem}); choose another, or 0 for any free port"
        )


def _check_tcp_endpoint(endpoint: str) -> None:
    """``tcp://HOST:PORT`` with a port 1-65535 free to bind: zmq takes 99999 as 34463 and -1 as 65535 silently."""
    try:
        config.check_endpoint(endpoint)  # the coordinator's own check: a port 1-65535 (or *)
    except ValueError as exc:
        raise UsageError(f"--endpoint: {exc}") from None
    host, port = config.split_tcp_endpoint(endpoint)
    if not port.isdigit():
        raise UsageError(
            f"--endpoint {endpoint!r}: agents cannot connect to it (* is any port); expected tcp://HOST:PORT"
        )
    problem = listen_problem(host, int(port))
    if problem:
        raise UsageError(
            f"--endpoint {endpoint}: the coordinator cannot listen there ({problem}); stop what holds it "
            "(`eplb-coordinator status --endpoint ...` tells whether it is a coordinator) or choose another --endpoint"
        )


def _check_ipc_endpoint(endpoint: str) -> None:
    """``ipc://PATH`` whose directory is this user's and can hold a socket: else the coordinator's bind fails late."""
    path = endpoint[len("ipc://") :]
    if path.startswith("@"):  # abstract namespace: no file, no directory
        return
    if not path:
        raise UsageError(f"--endpoint {endpoint!r}: expected ipc://PATH")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(
            f"--endpoint {endpoint}: the socket path is {len(os.fsencode(path))} bytes; unix sockets take at most "
            f"{UNIX_PATH_MAX}"
        )
    try:
        prepare_ipc_dir(endpoint)  # as the coordinator will, then its own bind
        probe = os.path.join(os.path.dirname(path), f".eplb-sidecar-probe-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)  # left by a sidecar killed here under the same pid
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(probe)
        os.unlink(probe)
    except UnsafeSocketDirectory as exc:
        raise UsageError(f"--endpoint {endpoint}: {exc}") from None
    except OSError as exc:
        raise UsageError(
            f"--endpoint {endpoint}: cannot create a socket in {os.path.dirname(path) or '.'}: {exc.strerror or exc}"
        ) from None
    _check_ipc_endpoint_free(endpoint, path)


def _check_ipc_endpoint_free(endpoint: str, path: str) -> None:
    """Refuse an ``ipc://`` path a live process listens on (a daemon coordinator, say) or that holds
    another kind of file: the coordinator refuses both at its start, which ended the sidecar with its
    exit code 1 after it had started it. A stale socket is left for the coordinator to replace."""
    try:
        if socket_file_state(path) in (SocketFile.NOT_A_SOCKET, SocketFile.LISTENING):
            claim_ipc_endpoint(endpoint)  # raises, naming the coordinator's pid where one answers
    except EndpointUnavailable as exc:
        raise UsageError(f"--endpoint {endpoint}: {exc}") from None


UNIX_PATH_MAX = 107
"""Longest unix socket path, in bytes (``sun_path`` is 108 bytes with the terminating NUL, Linux)."""


def check_endpoint(endpoint: str) -> None:
    """Refuse an ``--endpoint`` that the coordinator could not bind or the agents (and the sidecar) not reach."""
    if endpoint.startswith("tcp://"):
        _check_tcp_endpoint(endpoint)
    elif endpoint.startswith("ipc://"):
        _check_ipc_endpoint(endpoint)
    else:
        raise UsageError(f"--endpoint {endpoint!r}: expected ipc://PATH or tcp://HOST:PORT")
    ctx = zmq.Context()  # its own, ended here: no zmq threads while the children are forked
    sock = allow_ipv6(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)  # what the agents do: tcp://*:PORT binds, but nothing connects to it
    except zmq.ZMQError as exc:
        raise UsageError(f"--endpoint {endpoint!r}: agents cannot connect to it ({exc.strerror})") from None
    finally:
        sock.close()
        ctx.term()
    try:
        ClientCurve.from_env()  # the sidecar's readiness check uses these keys
    except SecurityError as exc:
        raise UsageError(str(exc)) from None
