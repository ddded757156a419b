"""A command's result on stdout, where the reader may have gone (``status | head -1``) or the
disk filled up (``> /dev/full``): neither is a traceback.

A reader that stops reading chose to: the command ends quietly with the exit status of a process
killed by ``SIGPIPE`` (``128 + 13``), as ``cat`` and ``grep`` do. Any other write error is the
caller's one-line error. Either way stdout is then pointed at ``/dev/null``, so the
interpreter's flush at exit has nothing left to fail on ("Exception ignored ... BrokenPipeError").
"""

from __future__ import annotations

import os
import signal
import sys

SIGPIPE_EXIT = 128 + signal.SIGPIPE
"""Exit status of a command whose reader closed the pipe: that of a process ``SIGPIPE`` killed."""


class ReaderGone(Exception):
    """The pipe's reader closed it before the result was written."""


class StdoutError(OSError):
    """stdout could not take the result; the message says why (the OS's words)."""


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout and flush it; :class:`ReaderGone` or :class:`StdoutError` when it cannot be."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        raise ReaderGone() from None
    except OSError as exc:
        _drop_stdout()
        raise StdoutError(f"cannot write to stdout: {exc.strerror or exc}") from None


def _drop_stdout() -> None:
    """Point fd 1 at ``/dev/null``: what is still buffered is discarded there at exit, not raised."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
