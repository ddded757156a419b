"""Logging helpers: every agent line names its rank, every coordinator line its role.

``configure(fmt="json")`` writes one JSON object per line (time, level, logger, pid,
tag, message, and ``exc`` / ``stack`` when the call had a traceback or ``stack_info``) for log
pipelines; the default is plain text. Every line carries a tag: the rank or role a
:class:`RankAdapter` gave it, else the process's own (``configure(tag=...)``), so lines of other
loggers (torch, zmq, asyncio, a library's) name their process too; in text, the tag stands in
front of the message (``[rank 3] ...``) and in front of every further line of a traceback, so a
``grep -F '[rank 3]'`` finds all of it. What would otherwise reach stderr as bare text goes
through logging as well: Python warnings (``logging.captureWarnings``) and uncaught exceptions,
in the main thread or another one. A log call whose arguments do not fit its format string
gives one tagged line naming the call, where ``logging`` printed a "--- Logging error ---"
traceback with no tag and lost the line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import TextIO


class RankAdapter(logging.LoggerAdapter):
    """Prefixes each message with ``[rank N]`` (or another role tag) and records the tag."""

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {})["eplb_tag"] = self.extra["tag"]
        return f"[{self.extra['tag']}] {msg}", kwargs


def rank_logger(name: str, rank: int | str) -> RankAdapter:
    tag = f"rank {rank}" if isinstance(rank, int) else str(rank)
    return RankAdapter(logging.getLogger(name), {"tag": tag})


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not cost the line
        return f"<{type(value).__name__} whose repr failed: {type(exc).__name__}>"


def message_of(record: logging.LogRecord) -> str:
    """``record``'s message; a call whose arguments do not fit its format string (``log.info("%d",
    "x")``, a missing argument, a ``__str__`` that raises) reads as one line naming the call and the
    error, instead of ``logging``'s "--- Logging error ---" traceback on bare stderr."""
    try:
        return record.getMessage()
    except Exception as exc:  # noqa: BLE001 - any formatting error, whatever the argument raises
        return (
            f"unformattable log call at {record.pathname}:{record.lineno}: msg {_safe_repr(record.msg)} "
            f"with args {_safe_repr(record.args)} ({type(exc).__name__}: {exc})"
        )


class TextFormatter(logging.Formatter):
    """``time LEVEL pid logger: [tag] message``; every further line (a traceback, ``stack_info``,
    a message of several lines) starts with ``[tag]`` as well."""

    def __init__(self, fmt: str = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s") -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "eplb_tag", None)
        message = message_of(record)
        if tag is not None and not message.startswith(f"[{tag}] "):  # not through a RankAdapter
            message = f"[{tag}] {message}"
        record.message = message
        record.asctime = self.formatTime(record, self.datefmt)
        parts = [self.formatMessage(record)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        first, *more = "\n".join(parts).split("\n")
        return "\n".join([first, *(line if tag is None else f"[{tag}] {line}" for line in more)])


class JsonFormatter(logging.Formatter):
    """One object per line; ``msg`` is the message alone: the tag a :class:`RankAdapter` puts in
    front of it for text is in ``tag``, so a line reads the same whichever way it was logged (an
    adapter's, another logger's, a fatal error written without logging)."""

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "eplb_tag", None)
        message = message_of(record)
        if tag is not None and message.startswith(f"[{tag}] "):
            message = message[len(tag) + 3 :]
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "tag": tag,
            "msg": message,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc)


class DefaultTag(logging.Filter):
    """Gives a record that came without a tag (not through a :class:`RankAdapter`) the process's."""

    def __init__(self, tag: str | None) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "eplb_tag", None) is None:
            record.eplb_tag = self.tag
        return True


def _log_uncaught(exc_type, exc, tb) -> None:
    """``sys.excepthook``: the traceback through logging (one JSON line, or tagged text lines)."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("eplb_service").critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: through logging (the default one prints an untagged traceback)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("eplb_service").critical(
        "uncaught %s in thread %s: %s",
        args.exc_type.__name__,
        name,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def active_format() -> str:
    """``json`` while the root logger writes JSON lines (as :func:`configure` set it up), else ``text``:
    what a process hands its children so that their lines match its own."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The level names ``--log-level`` and ``EPLB_SERVICE_LOG_LEVEL`` take (any case)."""

LOG_LEVEL_ENV = "EPLB_SERVICE_LOG_LEVEL"
LOG_FORMAT_ENV = "EPLB_SERVICE_LOG_FORMAT"


def parse_level(text: str | int, source: str) -> int:
    """``text`` as a logging level; ``source`` (the flag or variable it came from) names it in the error.

    Level names are taken in any case (``debug`` is ``DEBUG``): ``logging`` itself only knows
    upper case, and a user typing the variable's value should not have to know that.
    """
    if isinstance(text, int):
        return text
    name = level_name(text)
    if name is None:
        raise ValueError(f"{source}={text!r} is not a log level; expected one of {', '.join(LEVELS)} (any case)")
    return getattr(logging, name)


def level_name(text: object) -> str | None:
    """``text`` as one of :data:`LEVELS` (any case, spaces around ignored), or ``None``."""
    name = str(text).strip().upper()
    return name if name in LEVELS else None


def env_format() -> str:
    """``EPLB_SERVICE_LOG_FORMAT`` as given, trimmed and in lower case (``JSON`` is ``json``, as the
    vLLM plugin and the sidecar read it); ``""`` when unset."""
    return os.environ.get(LOG_FORMAT_ENV, "").strip().lower()


def resolved_format(fmt: str | None) -> str:
    """``fmt`` (a command's ``--log-format``), else ``EPLB_SERVICE_LOG_FORMAT`` (any case), else
    ``text``; ``ValueError`` naming the flag or variable and its value when it is neither format."""
    if fmt is None:
        source, given, fmt = LOG_FORMAT_ENV, os.environ.get(LOG_FORMAT_ENV, ""), env_format() or "text"
    else:
        source, given = "--log-format", fmt
    if fmt not in ("text", "json"):
        raise ValueError(f"{source}={given!r} is not a log format; expected 'text' or 'json'")
    return fmt


def last_flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv`` (as argparse would keep
    it); ``None`` without one. For settings that must be known before the command line is parsed."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.partition("=")[2]
    return value


def requested_format(argv: list[str], configured: str | None = None) -> str:
    """``json`` when ``argv`` (a command's own flags) asks for ``--log-format json``, or says nothing
    and ``configured`` (a config file's ``log-format``) is ``json``, or neither says and
    ``EPLB_SERVICE_LOG_FORMAT`` is ``json``; else ``text``: the order in which the settings win once
    parsed. Read before parsing, so that an error found while parsing (a bad flag, a bad
    ``--config`` file) comes out in the format asked for."""
    fmt = last_flag_value(argv, "--log-format")
    if fmt is None:
        fmt = configured if configured is not None else env_format()
    return "json" if fmt == "json" else "text"


def fatal(prog: str, message: str, fmt: str | None, tag: str) -> None:
    """A fatal error's line on stderr, in the format the command asked for (``fmt``; ``None``: the
    variable's): ``prog: error: message`` in text, one JSON line (level CRITICAL, ``logger`` the
    command, ``tag``) in JSON, so a log pipeline reading JSON does not get a bare line at the
    very moment it matters. Written directly, not through the root logger: the error may be that
    logging could not be configured."""
    command_line(prog, logging.CRITICAL, f"error: {message}", message, fmt, tag)


def command_line(
    prog: str, level: int, text: str, message: str, fmt: str | None, tag: str, stream: TextIO | None = None
) -> None:
    """One line of a command on ``stream`` (stderr), written directly (not through the root
    logger): ``prog: text`` in text, else one JSON line with ``message``, ``level`` and ``tag``
    (``logger`` the command), the fields every other JSON line has. ``fmt`` ``None``: the
    variable's format."""
    if fmt is None:
        fmt = env_format()
    line = json_line(prog, level, message, tag) if fmt == "json" else f"{prog}: {text}"
    print(line, file=stream if stream is not None else sys.stderr, flush=True)


def json_line(logger: str, level: int, message: str, tag: str) -> str:
    """The JSON line :class:`JsonFormatter` writes for ``message``, for a line written without logging."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    record.eplb_tag = tag
    return JsonFormatter().format(record)


def configure(level: str | int | None = None, fmt: str | None = None, tag: str | None = None) -> None:
    """stderr logging. ``level`` / ``fmt`` are the command line's (``None``: not given); the
    variables ``EPLB_SERVICE_LOG_LEVEL`` / ``EPLB_SERVICE_LOG_FORMAT`` fill in what it left out,
    so a flag always wins over the environment. ``ValueError`` names a bad value and its source.
    ``tag`` (``coordinator``, ``rank 3``, ...) is the tag of lines that come without one."""
    if level is not None:
        resolved = parse_level(level, "--log-level")
    else:
        resolved = parse_level(os.environ.get(LOG_LEVEL_ENV, "") or "INFO", LOG_LEVEL_ENV)
    fmt = resolved_format(fmt)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(DefaultTag(tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(resolved)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
