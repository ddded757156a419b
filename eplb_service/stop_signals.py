"""Which of its stop signals a process takes over: those its parent did not ignore.

A signal ignored when a process starts was ignored on purpose by whoever started it. ``nohup``
ignores SIGHUP so that a command outlives its terminal; a script's background job (``cmd &``)
has SIGINT ignored so that the terminal's Ctrl-C stops only what runs in the foreground. An
ignored disposition is inherited across ``exec``; a handled one is not (it is reset to the
default). So a handler installed over an ignored signal undoes the parent's choice twice: this
process stops on the signal, and every process it starts afterwards (vLLM under the sidecar, the
coordinator it supervises) dies of it by the default action. ``nohup eplb-sidecar -- vllm serve``
lost vLLM when the ssh session closed. The daemon, the simulation and the sidecar therefore take
over only the signals that were not ignored, as Python does for SIGINT itself (it installs no
``KeyboardInterrupt`` where SIGINT was ignored)."""

from __future__ import annotations

import signal
from collections.abc import Iterable


def not_ignored(signals: Iterable[signal.Signals]) -> tuple[signal.Signals, ...]:
    """``signals`` less those whose disposition here is ``SIG_IGN``, in the given order."""
    return tuple(sig for sig in signals if signal.getsignal(sig) != signal.SIG_IGN)
