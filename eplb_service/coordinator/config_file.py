"""``eplb-coordinator --config FILE``: settings from a TOML file, checked as the flags are.

Keys are the flags' long names or their destinations, dashes or underscores; switches take
only TOML booleans (the string ``"false"`` would otherwise read as true), and numbers only TOML
numbers: ``fence-timeout-s = "30"`` is a string where a number belongs (a template that quoted
what it should not, a value meant for another key), refused like any other mistaken type.
"""

from __future__ import annotations

import argparse
import json
import math

from eplb_service.logutil import last_flag_value


def _toml_module():
    """``tomllib`` (standard from Python 3.11), else its backport ``tomli`` (a dependency below 3.11); same API."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("--config needs tomli on Python < 3.11: pip install tomli") from None
    return tomllib


def _config_keys(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Each key a config file may use -> (its flag's action, whether true means the flag's default flipped).

    A key is a long flag name (``no-step-clock-check``) or its destination (``step-clock-check``),
    with dashes or underscores: users copy either from ``--help`` or from an old file.
    """
    keys: dict[str, tuple[argparse.Action, bool]] = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        keys[action.dest.replace("_", "-")] = (action, False)
        for option in action.option_strings:
            if option.startswith("--"):
                keys[option[2:]] = (action, switch and option[2:] != action.dest.replace("_", "-"))
    return keys


def _as_written(value: object) -> str:
    """``value`` as TOML writes it, for a message: ``true``, ``"abc"``, ``inf``, not Python's
    ``True``, ``'abc'``; the user reads it against the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, list, dict)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):  # a date or time inside a list: not JSON
            return repr(value)
    return str(value)


def _config_value(path: str, key: str, value, action: argparse.Action, flips: bool):
    """``value`` from the file as the flag's destination holds it, or ``ValueError`` naming the key."""
    setting = f"config file {path!r}: {key} = {_as_written(value)}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):  # "false" is a string, and a non-empty string would read as true
            raise ValueError(f"{setting}: expected true or false (no quotes)")
        return (not value) if flips else value
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{setting}; expected one of {', '.join(map(str, action.choices))}")
    if isinstance(value, (bool, dict, list)):
        raise ValueError(f"{setting}: expected a {'number' if action.type else 'string'}")
    if action.type is not None:
        try:
            converted = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ValueError(f"{setting}: {exc}") from None
        # TOML is typed: a number in quotes is a string. Told by what the flag makes of it, not by
        # the text: ``log-level = "10"`` is no number to unquote (a level name is expected).
        if isinstance(value, str) and isinstance(converted, (int, float)):
            raise ValueError(f"{setting}: expected a number (no quotes), got a string")
        return converted
    if not isinstance(value, str):
        raise ValueError(f"{setting}: expected a string (in quotes)")
    return value


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Settings from a TOML file, keyed by long flag names (``dp``, ``metrics-port``, ``insecure``...)."""
    tomllib = _toml_module()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the codec's error, naming no file, through
        raise ValueError(
            f"config file {path!r} is not valid TOML: not UTF-8 text "
            f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    keys = _config_keys(parser)
    settings = {}
    set_by: dict[str, str] = {}
    for key, value in raw.items():
        found = keys.get(key.replace("_", "-"))
        if found is None:
            known = sorted({k for k, (a, _) in keys.items() if a.help != argparse.SUPPRESS})
            raise ValueError(f"config file {path!r}: unknown setting {key!r}; known: {', '.join(known)}")
        action, flips = found
        if action.dest in set_by:  # TOML keeps both spellings; the last one read would win unseen
            raise ValueError(
                f"config file {path!r}: {set_by[action.dest]!r} and {key!r} are the same setting; expected it once"
            )
        set_by[action.dest] = key
        settings[action.dest] = _config_value(path, key, value, action, flips)
    return settings


def config_path(argv: list[str]) -> str | None:
    """The ``--config FILE`` (or ``--config=FILE``) of a command line, the last one if several; ``None`` without."""
    return last_flag_value(argv, "--config")


def peek_log_format(path: str | None) -> str | None:
    """The ``log-format`` a config file sets (``text`` or ``json``), read before anything is parsed;
    ``None`` when there is no file, it cannot be read or it sets none (or a bad one).

    Settings are checked when the file is loaded with the flags; this only lets the errors found
    there, or in the flags, come out in the format the file asks for, as every later line does.
    """
    if path is None:
        return None
    try:
        tomllib = _toml_module()
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, ValueError, UnicodeDecodeError):  # TOMLDecodeError is a ValueError
        return None
    for key, value in raw.items():
        if key.replace("_", "-") == "log-format" and value in ("text", "json"):
            return value
    return None
