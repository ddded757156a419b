"""``eplb-sidecar``: run the coordinator next to ``vllm serve`` with one command.

    eplb-sidecar [--endpoint ipc://...] [--metrics-port 9464] [-- coordinator flags] -- vllm serve MODEL ...

It derives the EP rank count from the vLLM command (``--data-parallel-size``/``-dp`` x
``--tensor-parallel-size``/``-tp``), starts the coordinator, waits until it answers,
then runs the vLLM command with ``EPLB_SERVICE_ENDPOINT`` set so the plugin in every
worker finds it. SIGINT/SIGTERM go to vLLM first, then the coordinator stops. The
coordinator is a *separate* process: if it dies, vLLM keeps serving (the agents keep
the current maps and re-register) and the sidecar restarts it with back-off. The exit
code is vLLM's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from eplb_service import logutil
from eplb_service.coordinator.config import default_endpoint
from eplb_service.coordinator.status_client import fetch_status

log = logutil.rank_logger(__name__, "sidecar")

ENDPOINT_ENV = "EPLB_SERVICE_ENDPOINT"


def _flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def ep_ranks_from_vllm_args(argv: list[str]) -> tuple[int, int]:
    """``(dp, tp)`` from a vLLM command line; 1 where a flag is absent."""
    sizes = []
    for names in (("--data-parallel-size", "-dp"), ("--tensor-parallel-size", "-tp")):
        raw = _flag_value(argv, names)
        try:
            value = 1 if raw is None else int(raw)
        except ValueError:
            raise ValueError(f"{names[0]} {raw!r} in the vLLM command is not an integer") from None
        if value <= 0:
            raise ValueError(f"{names[0]} {value} in the vLLM command must be positive")
        sizes.append(value)
    return sizes[0], sizes[1]


class Sidecar:
    def __init__(self, vllm_cmd: list[str], coordinator_args: list[str], endpoint: str, ready_timeout_s: float) -> None:
        self.vllm_cmd = vllm_cmd
        self.endpoint = endpoint
        self.ready_timeout_s = ready_timeout_s
        dp, tp = ep_ranks_from_vllm_args(vllm_cmd)
        self.coordinator_cmd = [sys.executable, "-m", "eplb_service.coordinator.cli", "--dp", str(dp), "--tp", str(tp),
                                "--endpoint", endpoint, *coordinator_args]
        self.coordinator: subprocess.Popen | None = None
        self.vllm: subprocess.Popen | None = None
        self._stopping = False
        self._restart_at = 0.0
        self._backoff_s = 1.0
        if "--enable-eplb" not in vllm_cmd:
            log.warning("the vLLM command has no --enable-eplb: the plugin will refuse to attach")

    def _start_coordinator(self) -> None:
        self.coordinator = subprocess.Popen(self.coordinator_cmd, start_new_session=True)
        log.info("coordinator started (pid %d): %s", self.coordinator.pid, " ".join(self.coordinator_cmd[3:]))

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                return False
            try:
                fetch_status(self.endpoint, timeout_s=0.5)
                return True
            except TimeoutError:
                continue
        return False

    def _on_signal(self, signum, _frame) -> None:
        self._stopping = True
        if self.vllm is not None and self.vllm.poll() is None:
            log.info("forwarding %s to vLLM (pid %d)", signal.Signals(signum).name, self.vllm.pid)
            self.vllm.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self._start_coordinator()
        if self._wait_ready():
            log.info("coordinator ready at %s", self.endpoint)
        else:
            log.error("coordinator not ready within %.0fs; starting vLLM anyway (agents register when it is up)", self.ready_timeout_s)
        env = dict(os.environ, **{ENDPOINT_ENV: self.endpoint})
        self.vllm = subprocess.Popen(self.vllm_cmd, env=env)
        log.info("vLLM started (pid %d): %s", self.vllm.pid, " ".join(self.vllm_cmd))
        try:
            while self.vllm.poll() is None:
                time.sleep(0.2)
                self._supervise_coordinator()
        finally:
            code = self.vllm.wait()
            self._stop_coordinator()
        log.info("vLLM exited with %d", code)
        return code

    def _supervise_coordinator(self) -> None:
        if self._stopping or self.coordinator is None or self.coordinator.poll() is None:
            return
        now = time.monotonic()
        if not self._restart_at:
            log.error("coordinator exited with %s; vLLM keeps serving, restarting in %.0fs", self.coordinator.returncode, self._backoff_s)
            self._restart_at = now + self._backoff_s
            self._backoff_s = min(30.0, self._backoff_s * 2)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("eplb-sidecar: error: give the vLLM command after '--', e.g. eplb-sidecar -- vllm serve MODEL --enable-eplb ...", file=sys.stderr)
        return 2
    split = len(argv) - 1 - argv[::-1].index("--")  # the last '--' starts the vLLM command
    own, vllm_cmd = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="eplb-sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default=default_endpoint())
    parser.add_argument("--ready-timeout-s", type=float, default=30.0)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    args, coordinator_args = parser.parse_known_args([a for a in own if a != "--"])
    logutil.configure(None, args.log_format)
    if not vllm_cmd:
        print("eplb-sidecar: error: the vLLM command after '--' is empty", file=sys.stderr)
        return 2
    try:
        sidecar = Sidecar(vllm_cmd, coordinator_args + ["--log-format", args.log_format], args.endpoint, args.ready_timeout_s)
    except ValueError as exc:
        print(f"eplb-sidecar: error: {exc}", file=sys.stderr)
        return 2
    return sidecar.run()


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
