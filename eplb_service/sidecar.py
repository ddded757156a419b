"""``eplb-sidecar``: run the coordinator next to ``vllm serve`` with one command.

    eplb-sidecar [--endpoint ipc://...] [--metrics-port 9464] [-- coordinator flags] -- vllm serve MODEL ...

It derives the EP rank count from the vLLM command as vLLM reads it (``--data-parallel-size``/``-dp``
x ``--tensor-parallel-size``/``-tp`` x ``--prefill-context-parallel-size``/``-pcp``, underscores or
dashes, its ``--config`` YAML file), starts the coordinator, waits until it answers, then runs the
vLLM command with ``EPLB_SERVICE_ENDPOINT`` set so the plugin in every worker finds it. It sets
no ``EPLB_SERVICE_DEPLOYMENT``: the plugin derives the id from vLLM's own process group, the same
on every node, where an id drawn here would differ from that of nodes started without the sidecar.
SIGINT/SIGTERM/SIGHUP/SIGQUIT go to vLLM first, then the coordinator stops. The coordinator is a *separate*
process: if it dies, vLLM keeps serving (the agents keep the current maps and re-register) and
the sidecar restarts it with back-off. The exit code is vLLM's.

Mistakes are found before anything starts and reported in one line, exit status 2: a
``--dp``/``--tp`` for the coordinator that contradicts the vLLM command (the coordinator would
refuse vLLM's agents with no word to the user), a bad flag, endpoint, port, log or plugin variable.

No way out of the sidecar leaves the coordinator behind: a vLLM command that cannot start,
exits or is killed, a signal to the sidecar, an exception, and a SIGKILL of the sidecar
itself (the kernel then sends the coordinator SIGTERM: ``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import zmq

from eplb_service import logutil
from eplb_service.coordinator import arg_types
from eplb_service.coordinator.config import default_endpoint
from eplb_service.coordinator.config_file import config_path, peek_log_format
from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory
from eplb_service.coordinator.status_client import fetch_status
from eplb_service.security import SecurityError
from eplb_service.sidecar_checks import (
    check_coordinator_config,
    check_endpoint,
    check_metrics_port,
    check_plugin_environment,
    coordinator_settings,
    log_environment,
)
from eplb_service.stop_signals import not_ignored
from eplb_service.vllm_command import UsageError, coordinator_ranks, vllm_parallelism

log = logutil.rank_logger(__name__, "sidecar")

ENDPOINT_ENV = "EPLB_SERVICE_ENDPOINT"

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""Signals the sidecar passes to vLLM and then waits out, stopping the coordinator after vLLM.

Any signal whose default action ends the sidecar must be here: a sidecar killed by it
takes the coordinator with it (``PR_SET_PDEATHSIG``) but leaves vLLM running unsupervised,
holding its GPUs, with nobody to restart the coordinator. The sidecar ends when vLLM does,
not at the signal: a vLLM that ignores one keeps its coordinator supervised."""


PR_SET_PDEATHSIG = 1
"""``prctl`` option (``<linux/prctl.h>``): the signal the kernel sends a process when its parent dies."""


def exit_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the kernel SIGTERMs the child as soon as this process dies, SIGKILL included.

    The coordinator runs in its own session (terminal signals are for vLLM alone), so nothing
    else would ever stop it once the sidecar is gone. SIGTERM is the coordinator's clean
    shutdown: it aborts a plan in flight and tells the agents. The kernel tracks the *thread*
    that forked, so children are started from the main thread only. Linux only (``prctl``),
    like vLLM's expert parallelism; ``None`` elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls into it
    parent = os.getpid()

    def hook() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the sidecar died between fork and prctl: nobody would signal us
            os._exit(1)

    return hook


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell reports it: a death by signal N is ``128 + N``, not ``-N``."""
    return 128 - returncode if returncode < 0 else returncode


EXIT_USAGE = 2
"""A mistake found before anything starts (a flag, a size the vLLM command contradicts, a setting)."""
EXIT_NOT_RUNNABLE = 126
"""The vLLM command exists but cannot be run (no permission, not an executable): the shell's code."""
EXIT_NOT_FOUND = 127
"""The vLLM command was not found: the shell's code, so a wrapper script tells it from vLLM's own 1."""


INITIAL_BACKOFF_S = 1.0
"""Wait before restarting a coordinator that died; doubled at every crash in a row."""
MAX_BACKOFF_S = 30.0
STABLE_RUN_S = 60.0
"""A coordinator that ran this long before it died was not crash-looping: its restart waits
``INITIAL_BACKOFF_S`` again, not the maximum that crashes weeks earlier built up."""


class Sidecar:
    """Runs the coordinator, then vLLM; whatever way the sidecar ends, the coordinator ends with it."""

    def __init__(
        self,
        vllm_cmd: list[str],
        coordinator_args: list[str],
        endpoint: str,
        ready_timeout_s: float,
        ranks: tuple[int, int],
    ) -> None:
        """``ranks``: the coordinator's ``(--dp, --tp)`` (:func:`coordinator_ranks`), ahead of ``coordinator_args``."""
        self.vllm_cmd = vllm_cmd
        self.endpoint = endpoint
        self.ready_timeout_s = ready_timeout_s
        self.coordinator_cmd = [
            sys.executable,
            "-m",
            "eplb_service.coordinator.cli",
            "serve",
            "--dp",
            str(ranks[0]),
            "--tp",
            str(ranks[1]),
            "--endpoint",
            endpoint,
            *coordinator_args,
        ]
        self.coordinator: subprocess.Popen | None = None
        self.vllm: subprocess.Popen | None = None
        self._stop_signal: int | None = None
        self._restart_at = 0.0
        self._backoff_s = INITIAL_BACKOFF_S
        self._started_at = 0.0
        """Monotonic time the coordinator running now was started."""

    def _start_coordinator(self) -> None:
        self.coordinator = subprocess.Popen(
            self.coordinator_cmd, start_new_session=True, preexec_fn=exit_with_parent_hook()
        )
        self._started_at = time.monotonic()
        log.info("coordinator started (pid %d): %s", self.coordinator.pid, " ".join(self.coordinator_cmd[3:]))

    def _wait_ready(self) -> bool:
        """True once *our* coordinator answers: another one answering at the endpoint is not ready."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline and self._stop_signal is None:
            if self.coordinator.poll() is not None:
                return False
            try:
                if fetch_status(self.endpoint, timeout_s=0.5).get("pid") == self.coordinator.pid:
                    return True
                time.sleep(0.2)
            except TimeoutError:  # no answer within 0.5 s, or no socket file yet (at once)
                time.sleep(0.05)
            except UnsafeSocketDirectory:  # the coordinator refuses it too and exits: poll() sees that
                time.sleep(0.2)
            except (zmq.ZMQError, SecurityError) as exc:  # checked before the start: only a change since then
                raise UsageError(f"cannot ask the coordinator at {self.endpoint} whether it is ready: {exc}") from None
        return False

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum
        if self.vllm is not None and self.vllm.poll() is None:
            log.info("forwarding %s to vLLM (pid %d)", signal.Signals(signum).name, self.vllm.pid)
            self.vllm.send_signal(signum)

    def run(self) -> int:
        """vLLM's exit status (``128 + N`` for a death by signal N); the coordinator is stopped on every way out."""
        # One the sidecar's parent ignored stays ignored, here and in vLLM and the coordinator,
        # which inherit it: `nohup eplb-sidecar -- vllm serve` outlives its ssh session.
        for sig in not_ignored(FORWARDED_SIGNALS):
            signal.signal(sig, self._on_signal)
        try:
            return self._run()
        finally:
            self._stop_coordinator()

    def _run(self) -> int:
        self._start_coordinator()
        ready = self._wait_ready()
        if self._stop_signal is not None:
            log.info("%s before vLLM started; stopping", signal.Signals(self._stop_signal).name)
            return 128 + self._stop_signal
        if ready:
            log.info("coordinator ready at %s", self.endpoint)
        elif self.coordinator.poll() is not None:
            # A coordinator that cannot start (bad flag, endpoint taken) will not start on a retry either.
            log.error("coordinator exited with %d before it was ready; not starting vLLM", self.coordinator.returncode)
            return exit_status(self.coordinator.returncode) or 1
        else:
            log.error(
                "coordinator not ready within %gs; starting vLLM anyway (agents register when it is up)",
                self.ready_timeout_s,
            )
        code = self._start_vllm()
        if code is not None:
            return code
        while self.vllm.poll() is None:
            time.sleep(0.2)
            self._supervise_coordinator()
        code = exit_status(self.vllm.returncode)
        log.info("vLLM exited with %d", code)
        return code

    def _start_vllm(self) -> int | None:
        """Start vLLM; on failure, the shell's exit status for it (``EXIT_NOT_FOUND``, ``EXIT_NOT_RUNNABLE``)."""
        env = dict(os.environ, **{ENDPOINT_ENV: self.endpoint})
        try:
            self.vllm = subprocess.Popen(self.vllm_cmd, env=env)
        except OSError as exc:
            log.error("cannot start the vLLM command %r: %s", self.vllm_cmd[0], exc.strerror or exc)
            return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_RUNNABLE
        log.info("vLLM started (pid %d): %s", self.vllm.pid, " ".join(self.vllm_cmd))
        if self._stop_signal is not None:  # the signal came while vLLM was being started
            self.vllm.send_signal(self._stop_signal)
        return None

    def _supervise_coordinator(self) -> None:
        """Restart a coordinator that died, with back-off, for as long as vLLM runs.

        Not ended by a forwarded signal: vLLM decides what a signal means (one run under
        ``nohup``, or one that handles SIGHUP, serves on), and a vLLM that serves on needs its
        coordinator; one that is stopping gets a restarted coordinator stopped with it."""
        if self.coordinator is None or self.coordinator.poll() is None:
            return
        now = time.monotonic()
        if not self._restart_at:
            ran_s = now - self._started_at
            if ran_s >= STABLE_RUN_S:
                self._backoff_s = INITIAL_BACKOFF_S
            log.error(
                "coordinator exited with %s after %.0fs; vLLM keeps serving, restarting in %.0fs",
                self.coordinator.returncode,
                ran_s,
                self._backoff_s,
            )
            self._restart_at = now + self._backoff_s
            self._backoff_s = min(MAX_BACKOFF_S, self._backoff_s * 2)
        elif now >= self._restart_at:
            self._restart_at = 0.0
            self._start_coordinator()

    def _stop_coordinator(self) -> None:
        proc = self.coordinator
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.error("coordinator ignored SIGTERM for 15s; killing it")
            proc.kill()
            proc.wait()


_DESCRIPTION = """\
Run the eplb-service coordinator next to `vllm serve` with one command.

The EP rank count comes from the vLLM command as vLLM reads it: --data-parallel-size/-dp x
--tensor-parallel-size/-tp x --prefill-context-parallel-size/-pcp, with underscores or
dashes, FLAG VALUE or FLAG=VALUE, and from its --config YAML file. A --dp/--tp given to the
coordinator must agree with them. The sidecar starts the coordinator, waits until it answers,
then runs the vLLM command with EPLB_SERVICE_ENDPOINT set. SIGINT/SIGTERM/SIGHUP/SIGQUIT go to
vLLM, then the coordinator stops; one ignored when the sidecar starts (nohup's SIGHUP) stays
ignored by all three. If the coordinator dies, vLLM keeps serving and the coordinator is
restarted with back-off.

Exit status: vLLM's (128 + N if signal N killed it); 2 for a mistake in the sidecar's flags,
the coordinator's or the vLLM command's sizes, found before anything starts; 127 if the vLLM
command is not found, 126 if it cannot be run; the coordinator's own (1 if it gave none) if it
stops before it is ready, vLLM not started; 128 + N if signal N came before vLLM started."""

_EPILOG = """\
Flags before the vLLM command that are not listed above go to the coordinator
(see `eplb-coordinator serve --help`), for example:
  eplb-sidecar --metrics-port 9464 --policy deepseek -- vllm serve MODEL \\
      --data-parallel-size 8 --enable-expert-parallel --enable-eplb"""


def build_parser() -> argparse.ArgumentParser:
    from eplb_service.coordinator.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="eplb-sidecar",
        formatter_class=HelpFormatter,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        usage="%(prog)s [-h] [--endpoint URL] [--ready-timeout-s S] [--log-format {text,json}]\n"
        "                    [COORDINATOR FLAG ...] -- VLLM COMMAND ...",
    )
    parser.add_argument(
        "--endpoint",
        default=default_endpoint(),
        metavar="URL",
        help="the coordinator's endpoint, passed to vLLM's workers as EPLB_SERVICE_ENDPOINT",
    )
    parser.add_argument(
        "--ready-timeout-s",
        type=arg_types.positive_float,
        default=30.0,
        metavar="S",
        help="how long to wait for the coordinator before starting vLLM anyway",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="json: one JSON object per line, the coordinator's too (default: $EPLB_SERVICE_LOG_FORMAT, else text)",
    )
    return parser


def split_command_line(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(sidecar and coordinator flags, vLLM command): the last ``--`` starts the vLLM command; ``None`` without one."""
    if "--" not in argv:
        return argv, None
    split = len(argv) - 1 - argv[::-1].index("--")
    return [a for a in argv[:split] if a != "--"], argv[split + 1 :]


def plan(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str], tuple[int, int]]:
    """Everything checked before anything starts: ``(sidecar flags, coordinator flags, vLLM command, (dp, tp))``.

    Argparse mistakes exit 2 from here (one line, naming the help to read); the rest raise ``UsageError``.
    """
    own, vllm_cmd = split_command_line(argv)
    parser = build_parser()
    fmt = requested_format(own)
    parser.error = lambda message: _refuse(message, fmt)  # type: ignore[method-assign]
    args, coordinator_args = parser.parse_known_args(own)  # --help answers here, vLLM command or not
    if vllm_cmd is None:
        parser.error("give the vLLM command after '--', e.g. eplb-sidecar -- vllm serve MODEL --enable-eplb ...")
    if not vllm_cmd:
        parser.error("the vLLM command after '--' is empty")
    os.environ.update(log_environment(os.environ))
    # The flag, else the coordinator's --config file's log-format: one format for the sidecar, the
    # coordinator and vLLM's workers, which read no flag (the plugin's lines follow the variable).
    log_format = args.log_format or peek_log_format(config_path(coordinator_args))
    if log_format:
        os.environ[logutil.LOG_FORMAT_ENV] = log_format
    logutil.configure(None, log_format, tag="sidecar")
    settings = coordinator_settings(coordinator_args)
    check_metrics_port(settings.metrics_port)
    check_endpoint(args.endpoint)
    check_plugin_environment(os.environ, args.endpoint)
    vllm = vllm_parallelism(vllm_cmd)
    dp, tp, ranks_line = coordinator_ranks(vllm, settings.dp, settings.tp)
    ranks = (dp, tp)
    check_coordinator_config(settings, args.endpoint, ranks)
    log.info("%s", ranks_line)
    if vllm.eplb is False:
        log.warning("the vLLM command has no --enable-eplb: the plugin will refuse to attach")
    # Without the flag the coordinator reads its --config file or EPLB_SERVICE_LOG_FORMAT, as the sidecar did.
    log_flag = ["--log-format", args.log_format] if args.log_format else []
    return args, coordinator_args + log_flag, vllm_cmd, ranks


def requested_format(own: list[str]) -> str:
    """The format of an error found before logging starts: ``--log-format``, else the coordinator's
    ``--config`` file's ``log-format``, else ``EPLB_SERVICE_LOG_FORMAT``, as :func:`plan` sets it up."""
    return logutil.requested_format(own, peek_log_format(config_path(own)))


def _refuse(message: str, fmt: str) -> NoReturn:
    """argparse's refusal of a sidecar flag: one line (a JSON line under json) naming the help to
    read, exit 2; argparse's own way printed the usage first."""
    logutil.fatal("eplb-sidecar", f"{message} (see `eplb-sidecar --help`)", fmt, "sidecar")
    sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    """vLLM's exit status; 2, with one line saying what to change, for a mistake found before or while
    starting (a JSON line under ``--log-format json``, like every other line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, coordinator_args, vllm_cmd, ranks = plan(argv)
        return Sidecar(vllm_cmd, coordinator_args, args.endpoint, args.ready_timeout_s, ranks).run()
    except UsageError as exc:
        logutil.fatal("eplb-sidecar", str(exc), requested_format(split_command_line(argv)[0]), "sidecar")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
