"""``eplb-plan``: compute a placement offline, from a load file.

Reads a load ``[L, N_log]`` (``.npy``, JSON: a list of lists or an object with a ``load``
key, or a coordinator's recorded trace ``.npz`` whose windows are summed; several files, such as
a recording's parts, are summed), runs a placement policy, and writes placement JSON::

    {"policy": ..., "num_layers": L, "num_logical": N, "num_physical": P, "num_ranks": R,
     "phy2log": [[...], ...],            # [L, P]
     "logcnt": [[...], ...],             # [L, N]
     "balancedness": {"per_layer_before": [...], "per_layer": [...], "before": b0, "overall": b1},
     "persistence": a,                   # 1.0 unless --previous-load is given
     "experts_moved": n, "bytes_moved": n,
     "batches": [{"layers": [...], "bytes_moved": n, "gain": g}, ...]}

``--current`` takes the same JSON (only ``phy2log`` is read; a bare ``[L, P]`` list works too), so a
plan can seed the coordinator's initial placement and the next plan can start from it. Without
``--current`` the current placement is vLLM's initial one (slot ``p`` holds expert ``p % N``). From
that placement (given or not) the migration policy lays DeepSeek's packing (in layers small
enough to weigh every layout, the best one; on ranks of 2 slots without redundant ones, the least
even best pairing, ``policy_lookahead``), as the coordinator's first plan does
(``plan_rebalance(fresh=True)``). Balancedness figures are under ``--load`` as given
(with ``--previous-load`` and a persistence below 0.6 the migration policy plans for a forecast of
the next window, see ``load_forecast``; the batches' gains are then under that forecast). The
migration policy runs at its default move price: the coordinator's spend controller
(``spend_control``), which makes moves cheaper where its plans move far fewer slots than DeepSeek's
would (dearer close to a fifth of them), needs a sequence of plans to tally and is not used here;
nor is the law of surges it reads from its windows (``surge_model``), so layers of ranks of 2 slots
without redundant ones are planned as without it (the swap search where the load lasts).
Bad input ends with exit code 2 and a one-line message naming the flag or the file (with the bad
entry's position) and what was expected: numeric flags are checked as they are parsed, files as they
are read (an unreadable or ill-typed file is named, never a traceback; pickles are never loaded).
Progress goes to stderr (:mod:`.plan_progress`); Ctrl-C ends with exit code 130 and one line, and
``--out`` is written whole or not at all (:mod:`.plan_output`). Under ``--log-format json`` (else
``EPLB_SERVICE_LOG_FORMAT``) every stderr line, errors, warnings and progress, is one JSON object,
as the coordinator and the sidecar write theirs: a pipeline reading the service's logs reads this
too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eplb_service import logutil
from eplb_service.coordinator import arg_types
from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.plan_output import write_text_atomically
from eplb_service.coordinator.plan_progress import PLAN_TAG, PlanProgress
from eplb_service.coordinator.policy import (
    DEFAULT_POLICY,
    POLICIES,
    RebalancePlan,
    load_total_overflow,
    plan_rebalance,
    validate_load,
)
from eplb_service.placement import (
    PlacementError,
    PlacementShape,
    initial_phy2log,
    is_initial_phy2log,
    layer_balancedness,
    logical_replica_count,
    model_balancedness,
    rank_loads,
    validate_phy2log,
)
from eplb_service.stdout import SIGPIPE_EXIT, ReaderGone, StdoutError, write_stdout
from eplb_service.trace import (
    TraceError,
    UnreadableFile,
    as_float_loads,
    file_format,
    load_trace,
    read_numpy,
    real_dtype,
)

MAX_COUNT = 2**62
"""Upper bound of the integer flags: every count and byte sum stays within int64."""
MAX_BYTES_PER_EXPERT = 2**40
"""1 TiB: far above any expert's weights, low enough that bytes moved (experts x bytes) fit int64."""
MAX_SLOTS_PER_EXPERT = 32
"""``--redundant`` gives at most this many slots per layer per expert of ``--load`` (redundant
<= 31 x experts): room for an 8-expert model on 256 ranks with one slot each, while every
array the policies build stays within a small multiple of the load's own size (a count of
1e12 used to end in a MemoryError traceback allocating the initial placement)."""
MAX_EXACT_FLOAT_INT = 2**53
"""A JSON float is taken as an expert index only below this: above it floats are not exact integers."""


class UsageError(Exception):
    """Bad command-line input; the message is shown as is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other input error
        raise UsageError(f"{message} (see `eplb-plan --help`)")


def int_flag(minimum: int, maximum: int = MAX_COUNT) -> Callable[[str], int]:
    """argparse ``type`` for an integer in ``[minimum, maximum]``, checked at parse time.

    argparse prefixes the message with the flag (``argument --groups: ...``), so a bad value is
    named before any file is read, and the policies never see a value they would reject in their
    own terms (``num_groups=0``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {text!r}")
        return value

    return parse


def path_flag(text: str) -> str:
    """argparse ``type`` for a file path: not empty. ``--out "$UNSET"`` used to write the plan to
    stdout and exit 0, as if ``--out`` had not been given."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    return text


def build_parser() -> argparse.ArgumentParser:
    from eplb_service.coordinator.cli import HelpFormatter

    parser = _Parser(
        prog="eplb-plan",
        formatter_class=HelpFormatter,
        description="Compute an expert placement offline from a load file.",
        epilog="Exit status: 0 with the plan written; 2 for bad input (a flag, a file or an entry in it, named\n"
        "in one line), or a plan stdout cannot take (a full disk); 130 if interrupted (Ctrl-C), with no\n"
        "--out file written; 141, quietly, if the reader of stdout closed the pipe first (`| head`).",
    )
    parser.add_argument(
        "--load",
        required=True,
        nargs="+",
        metavar="FILE",
        help=".npy or JSON load [layers, logical experts] in routed tokens (counts: the migration "
        "policy ignores differences within their sampling noise), or a recorded .npz trace; several "
        "files (a trace's parts: trace.npz trace.part1.npz ...) are summed, and a part that cannot be "
        "read, has another shape or repeats a file is skipped with a warning naming it",
    )
    parser.add_argument(
        "--previous-load",
        metavar="FILE",
        help="the window before --load, same shape and formats: the migration policy measures how much "
        "of the imbalance lasted from it to --load, prices moves by it and, where most of it fades, plans "
        "for the forecast next window (default: plan for --load as it is)",
    )
    parser.add_argument("--ranks", required=True, type=int_flag(1), help="EP ranks (must divide the slots)")
    parser.add_argument(
        "--redundant",
        type=int_flag(0),
        default=None,
        help=f"redundant slots per layer, at most {MAX_SLOTS_PER_EXPERT - 1} x the experts of --load "
        "(default: from --current, else 0)",
    )
    parser.add_argument(
        "--groups",
        type=int_flag(1),
        default=1,
        help="expert groups, a divisor of the experts of --load (DeepSeek's hierarchy: with --nodes, "
        "each group stays on one node)",
    )
    parser.add_argument(
        "--nodes",
        type=int_flag(1),
        default=1,
        help="server nodes, a divisor of --ranks (DeepSeek's hierarchy, kept where --groups is a multiple "
        "of --nodes; else both policies place experts on any node)",
    )
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULT_POLICY,
        help="migration: change only what the load needs, starting from --current "
        "(from vLLM's initial placement, the default, it lays DeepSeek's packing, or the best "
        "layout where a layer is small enough to weigh them all, as the "
        "coordinator's first plan does: that layout is no plan's choice); "
        "deepseek: DeepSeek's EPLB algorithm (as vLLM ships it), with the slots inside each rank "
        "ordered to keep the experts --current already has there in place, so its phy2log equals "
        "DeepSeek's only up to a permutation within each rank (same experts per rank, same loads). "
        "Under either policy a layer whose new row would not raise its balancedness keeps its current "
        "row (unless that row spreads a group over nodes under --groups/--nodes)",
    )
    parser.add_argument("--current", metavar="FILE", help="current placement JSON (phy2log)")
    parser.add_argument(
        "--bytes-per-expert",
        type=int_flag(1, MAX_BYTES_PER_EXPERT),
        default=1,
        help="bytes of one expert on one rank",
    )
    parser.add_argument(
        "--staging-budget-bytes",
        type=int_flag(1),
        default=None,
        help="staging bytes per rank per batch (default: unbounded, every layer in one batch)",
    )
    parser.add_argument(
        "--min-layer-gain",
        type=arg_types.balancedness_gain,
        default=0.0,
        help="skip layers gaining less balancedness (from 0 to below 1: balancedness is at most 1)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        type=path_flag,
        help="write the JSON here instead of stdout, whole or not at all (a complete temporary file "
        "in the same directory is renamed over FILE; /dev/stdout, a pipe or a device is written in place)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one line per phase and per block of layers on stderr, with the time so far "
        "(default: on when stderr is a terminal)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="json: every line on stderr (errors, warnings, progress) as one JSON object, as the coordinator "
        "writes them (default: $EPLB_SERVICE_LOG_FORMAT, else text)",
    )
    return parser


class NotJson(UsageError):
    """A file read as JSON that is not JSON (the message says why)."""


def _read_json(path: str, what: str) -> object:
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise NotJson(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise NotJson(f"{what} {path}: not valid JSON (not UTF-8 text)") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep
        raise NotJson(f"{what} {path}: not valid JSON ({' '.join(str(exc).split()) or 'nested too deeply'})") from None


def _json_text(value: object) -> str:
    """``value`` as the JSON the user wrote (``null``, ``true``, ``"3"``), shortened for a message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unwrap(value: object, key: str, where: str) -> tuple[object, str]:
    """The matrix of a JSON document (a bare list, or an object's ``key``) and its path prefix."""
    if isinstance(value, dict):
        if key not in value:
            raise UsageError(f"{where}: JSON object has no {key!r} key")
        return value[key], key
    return value, ""


def _json_rows(value: object, where: str, label: str) -> list[list[object]]:
    """The rows of a JSON matrix: a non-empty list of equal-length, non-empty lists.

    Walked in Python rather than handed to ``np.asarray``, which would turn ``null`` into
    ``nan``, ``true`` into 1 and ``"3"`` into 3.0 and report them later under internal names."""
    if not isinstance(value, list) or not value:
        raise UsageError(
            f"{where}: {label or 'the document'} is {_json_text(value)}, "
            "expected a 2-D array (a non-empty list of rows)"
        )
    width = len(value[0]) if isinstance(value[0], list) else 0
    for i, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise UsageError(f"{where}: row {label}[{i}] is {_json_text(row)}, expected a non-empty list (a 2-D array)")
        if len(row) != width:
            raise UsageError(
                f"{where}: row {label}[{i}] has {len(row)} entries, row {label}[0] has {width}: "
                "expected a 2-D array (equal-length rows)"
            )
    return value


def _load_number(value: object) -> float | None:
    """A JSON load entry as a float when it is a finite number >= 0 (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float64
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _expert_index(value: object) -> int | None:
    """A JSON placement entry as an int when it is an integer >= 0, else None.

    A float is taken only when it is exactly an integer (numpy's ``tolist()`` of a float array
    writes ``3.0``); ``1e30`` is not, and must be refused here, before an int64 cast wraps it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < MAX_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value < MAX_EXACT_FLOAT_INT:
        return int(value)
    return None


def _not_an_index(value: object) -> str:
    """Why a JSON placement entry is not an expert index, for the message."""
    text = _json_text(value)
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{text}, a float that is not an exact integer: expected an integer expert index >= 0"
    return f"{text}, expected an integer expert index >= 0"


def _check_load_array(arr: np.ndarray, where: str, what: str = "entry") -> np.ndarray:
    """``arr`` as float64 ``[L, N]``: 2-D, no empty axis, real numbers, finite and >= 0."""
    if arr.ndim != 2 or 0 in arr.shape:
        raise UsageError(f"{where}: expected a 2-D array [layers > 0, experts > 0], got shape {arr.shape}")
    if not real_dtype(arr):
        raise UsageError(f"{where}: the array has dtype {arr.dtype}, expected real numbers (integers or floats)")
    load, bad = as_float_loads(arr)
    if bad is not None:
        raise UsageError(f"{where}: {what} [{bad[0]}, {bad[1]}] = {load[bad]}, expected a finite number >= 0")
    overflow = load_total_overflow(load)
    if overflow is not None:
        raise UsageError(f"{where}: the load {overflow}")
    return load


def _read_npy(path: str, flag: str) -> np.ndarray:
    """``[L, N]`` float64 from a ``.npy`` file; never a pickle, and an ``.npz`` is refused by name."""
    where = f"{flag} {path}"
    try:
        value = read_numpy(path, "npy")
    except UnreadableFile as exc:
        raise UsageError(f"{where}: {exc}") from None
    assert isinstance(value, np.ndarray)  # read_numpy(..., "npy") returns the array
    return _check_load_array(value, where)


def _read_json_load(path: str, flag: str) -> np.ndarray:
    """``[L, N]`` float64 from a JSON list of rows or an object's ``load``; every entry checked."""
    where = f"{flag} {path}"
    value, label = _unwrap(_read_json(path, flag), "load", where)
    rows = _json_rows(value, where, label)
    for i, row in enumerate(rows):
        for j, entry in enumerate(row):
            if _load_number(entry) is None:
                raise UsageError(
                    f"{where}: entry {label}[{i}][{j}] is {_json_text(entry)}, expected a finite number >= 0"
                )
    return _check_load_array(np.array(rows, dtype=np.float64), where)


def load_file_kind(path: str) -> str:
    """``"npz"``, ``"npy"`` or ``"json"``: by the name's suffix in any case (``LOAD.NPY`` is an
    array, as on a filesystem that ignores case), else, for a regular file, by its first bytes (an
    array saved without a suffix is still one; before, both were read as JSON and refused as "not
    UTF-8 text"). A pipe or device is never sniffed (its bytes cannot be read twice): JSON."""
    lower = path.lower()
    for kind in ("npz", "npy", "json"):
        if lower.endswith(f".{kind}"):
            return kind
    try:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                kind = file_format(f)
                return kind if kind in ("npy", "npz") else "json"
    except OSError:
        pass  # the JSON reader opens it again and names the error
    return "json"


def read_load(path: str, flag: str = "--load") -> np.ndarray:
    """``[L, N_log]`` float64 from ``.npy``, JSON, or a recorded trace (``.npz``, windows summed).

    Raises :class:`UsageError` naming ``flag``, the file and, for a bad entry, its position:
    the load is finite and >= 0 here, so nothing later reports it under an internal name."""
    kind = load_file_kind(path)
    if kind == "npz":
        try:
            summed = load_trace(path).aggregate()
        except TraceError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        return _check_load_array(summed, f"{flag} {path}", "the sum over the trace's windows at")
    if kind == "npy":
        return _read_npy(path, flag)
    try:
        return _read_json_load(path, flag)
    except NotJson as exc:
        if path.lower().endswith(".json"):
            raise
        # a .csv or text table is read as JSON too (any name but .npy/.npz): say what is taken
        raise UsageError(f"{exc}; {flag} takes a .npy array, a .npz trace, or else JSON") from None


@dataclass(frozen=True)
class PlacementFile:
    """A placement file as read once: its ``phy2log`` and the ``num_ranks`` it was planned for
    (``None`` where it names none: a bare ``[L, P]`` list, or an object without the key)."""

    phy2log: np.ndarray
    num_ranks: int | None


def read_placement(path: str, flag: str = "--current") -> PlacementFile:
    """``phy2log [L, P]`` int64 from placement JSON (an object with ``phy2log``, or a bare list),
    and the ``num_ranks`` the same document names, read in one go so both come from one file.

    Entries are integers >= 0, checked before any cast (the range against the load's experts is
    the caller's: :func:`plan_document`, or the coordinator's config); raises :class:`UsageError`
    naming ``flag``, the file and the bad entry's position.

    A ``num_ranks`` that is there is a rank count or the file is refused (naming ``flag``, the
    file and the value), by the rule the ``phy2log`` entries follow: an integer (a float only when
    exactly one), never ``true``, ``"4"`` or ``null``. Ignored, such a value let a placement of
    any rank count through the check it exists for, while ``-1`` or ``8`` were refused."""
    where = f"{flag} {path}"
    document = _read_json(path, flag)
    value, label = _unwrap(document, "phy2log", where)
    rows = _json_rows(value, where, label)
    for i, row in enumerate(rows):
        for j, entry in enumerate(row):
            if _expert_index(entry) is None:
                raise UsageError(f"{where}: entry {label}[{i}][{j}] is {_not_an_index(entry)}")
    phy2log = np.array([[_expert_index(e) for e in row] for row in rows], dtype=np.int64)
    return PlacementFile(phy2log, _planned_ranks(document, where))


def _planned_ranks(document: object, where: str) -> int | None:
    """The ``num_ranks`` of a placement document (see :func:`read_placement`)."""
    if not isinstance(document, dict) or "num_ranks" not in document:
        return None
    value = document["num_ranks"]
    ranks = _expert_index(value)  # an integer >= 0 by the entries' rule; a rank count is also >= 1
    if ranks is None or ranks < 1:
        raise UsageError(
            f"{where}: num_ranks is {_json_text(value)}, expected an integer rank count >= 1 "
            "(the --ranks the placement was planned for)"
        )
    return ranks


def _warn(message: str, fmt: str | None = None) -> None:
    """A warning line on stderr, in ``fmt`` (``None``: ``EPLB_SERVICE_LOG_FORMAT``'s)."""
    logutil.command_line("eplb-plan", logging.WARNING, f"warning: {message}", message, fmt, PLAN_TAG)


def read_load_parts(paths: list[str], warn: Callable[[str], None] = _warn) -> tuple[np.ndarray, list[str]]:
    """``[L, N_log]`` float64, the sum of the loads in ``paths``, and the paths summed.

    One path is read as :func:`read_load` reads it (a bad file is an error). Of several, a
    recording's parts, each is a load of its own: a part that cannot be read, has another shape
    than the first one read, or names a file already summed (``trace.npz trace*.npz``) is
    skipped and ``warn`` names it and why; an error only when no part is left."""
    if len(paths) == 1:
        return read_load(paths[0]), list(paths)
    total: np.ndarray | None = None
    used: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        same = seen.get(os.path.realpath(path))
        if same is not None:
            warn(f"--load {path} skipped: the same file as {same}, already summed")
            continue
        try:
            part = read_load(path)
        except UsageError as exc:
            warn(f"{exc}; skipped")
            continue
        if total is not None and part.shape != total.shape:
            warn(f"--load {path} skipped: shape {part.shape}, expected {total.shape} (the shape of {used[0]})")
            continue
        seen[os.path.realpath(path)] = path
        total = part if total is None else total + part
        used.append(path)
    if total is None:
        raise UsageError(f"--load: none of its {len(paths)} files could be read (the warnings above say why)")
    return _check_load_array(total, f"--load {' + '.join(used)}", "the sum at"), used


def _load_name(args: argparse.Namespace) -> str:
    """``--load``'s file, or its files joined, for messages."""
    return " ".join(args.load)


def _redundant(args: argparse.Namespace, current: np.ndarray | None, num_logical: int) -> int:
    """Redundant slots per layer: ``--redundant``, else what ``--current`` has beyond the experts."""
    if args.redundant is not None:
        bound = (MAX_SLOTS_PER_EXPERT - 1) * num_logical
        if args.redundant > bound:
            raise UsageError(
                f"--redundant {args.redundant} is implausible: expected at most {bound} redundant slots per "
                f"layer ({MAX_SLOTS_PER_EXPERT - 1} x the {num_logical} experts of --load {_load_name(args)})"
            )
        return int(args.redundant)
    if current is None:
        return 0
    if current.shape[1] < num_logical:
        raise UsageError(
            f"--current {args.current} has {current.shape[1]} slots per layer, "
            f"fewer than the {num_logical} experts of --load {_load_name(args)}"
        )
    return int(current.shape[1] - num_logical)


def _check_current(args: argparse.Namespace, given: PlacementFile, shape: PlacementShape, redundant: int) -> None:
    """``--current`` fits ``shape``: planned for ``--ranks`` (where it says), its size, every entry
    an expert of ``--load``, none missing. A placement of other ranks puts its slots on other
    ranks than it did where it was planned: the plan would start from a placement no one has."""
    ranks, current = given.num_ranks, given.phy2log
    if ranks is not None and ranks != args.ranks:
        raise UsageError(
            f"--current {args.current}: planned for {ranks} ranks (its num_ranks), but --ranks is {args.ranks}; "
            "expected the placement of the deployment this plan is for"
        )
    expected = (shape.num_layers, shape.num_physical)
    if current.shape != expected:
        raise UsageError(
            f"--current {args.current} has shape {current.shape}, expected {expected} "
            f"[layers of --load, {shape.num_logical} experts + {redundant} redundant]"
        )
    try:
        validate_phy2log(current, shape)
    except PlacementError as exc:
        raise UsageError(f"--current {args.current}: {exc} (the experts of --load {_load_name(args)})") from None


def _check_hierarchy(args: argparse.Namespace, shape: PlacementShape) -> None:
    """``--groups`` divides the experts and ``--nodes`` the ranks, under either policy (a ``--groups``
    that is not a multiple of ``--nodes`` leaves no hierarchy to keep, and both policies then place
    experts on any node, but a count that divides neither describes another model or deployment:
    :func:`~eplb_service.coordinator.policy.check_groups_and_nodes`); checked here so the message
    names the flags, not the policy's arguments."""
    if shape.num_logical % args.groups:
        raise UsageError(
            f"--groups {args.groups} must divide the {shape.num_logical} experts of --load {_load_name(args)}"
        )
    if args.ranks % args.nodes:
        raise UsageError(f"--nodes {args.nodes} must divide --ranks {args.ranks}")


def _previous_persistence(args: argparse.Namespace, load: np.ndarray, shape: PlacementShape) -> float:
    """How much of the imbalance lasted from ``--previous-load`` to ``--load`` (1.0 without it)."""
    if not args.previous_load:
        return 1.0
    previous = read_load(args.previous_load, "--previous-load")
    if previous.shape != load.shape:
        raise UsageError(
            f"--previous-load {args.previous_load} has shape {previous.shape}, expected {load.shape} "
            f"(the shape of --load {_load_name(args)})"
        )
    return persistence(validate_load(previous, shape), load)


def _plan(
    args: argparse.Namespace,
    current: np.ndarray,
    load: np.ndarray,
    shape: PlacementShape,
    lasting: float,
    progress: PlanProgress,
) -> RebalancePlan:
    """Run the policy; its one input-dependent refusal (a layer that alone needs more staging
    than the budget) is reworded to name ``--staging-budget-bytes``."""
    try:
        return plan_rebalance(
            args.policy,
            current,
            load,
            shape,
            num_groups=args.groups,
            num_nodes=args.nodes,
            bytes_per_expert=args.bytes_per_expert,
            staging_budget_bytes=args.staging_budget_bytes,
            min_layer_gain=args.min_layer_gain,
            persistence=lasting,
            fresh=is_initial_phy2log(current, shape),
            progress=progress.layers if progress.enabled else None,
        )
    except ValueError as exc:
        internal = f"staging_budget_bytes={args.staging_budget_bytes}"
        if args.staging_budget_bytes is None or internal not in str(exc):
            raise
        raise UsageError(str(exc).replace(internal, f"--staging-budget-bytes {args.staging_budget_bytes}")) from None


def plan_document(args: argparse.Namespace, progress: PlanProgress | None = None) -> dict:
    """Plan for parsed ``args`` and return the output document (raises UsageError / ValueError)."""
    if progress is None:
        progress = PlanProgress(sys.stderr, enabled=False)
    progress.phase(f"reading --load {_load_name(args)}")
    load, used = read_load_parts(args.load, lambda message: _warn(message, args.log_format))
    if len(args.load) > 1:
        progress.phase(f"summed {len(used)} of {len(args.load)} --load files")
    num_layers, num_logical = load.shape
    given = read_placement(args.current) if args.current else None
    redundant = _redundant(args, None if given is None else given.phy2log, num_logical)
    num_physical = num_logical + redundant
    if num_physical % args.ranks:
        raise UsageError(
            f"--ranks {args.ranks} does not divide the {num_physical} slots per layer "
            f"({num_logical} experts + {redundant} redundant)"
        )
    shape = PlacementShape(num_layers, num_logical, num_physical, args.ranks)
    load = validate_load(load, shape)
    lasting = _previous_persistence(args, load, shape)
    if given is None:
        current = initial_phy2log(shape)
    else:
        _check_current(args, given, shape, redundant)
        current = given.phy2log
    _check_hierarchy(args, shape)
    progress.phase(f"planning {num_layers} layers x {num_physical} slots on {args.ranks} ranks, policy {args.policy}")
    plan = _plan(args, current, load, shape, lasting, progress)
    progress.phase(f"planned: {plan.experts_moved} slots change in {len(plan.batches)} batches")
    phy2log = plan.target_phy2log
    return {
        "policy": args.policy,
        "num_layers": num_layers,
        "num_logical": num_logical,
        "num_physical": num_physical,
        "num_ranks": args.ranks,
        "phy2log": phy2log.tolist(),
        "logcnt": logical_replica_count(phy2log, num_logical).tolist(),
        "balancedness": {
            "per_layer_before": [float(b) for b in layer_balancedness(rank_loads(current, load, args.ranks))],
            "per_layer": [float(b) for b in layer_balancedness(rank_loads(phy2log, load, args.ranks))],
            "before": model_balancedness(rank_loads(current, load, args.ranks)),
            "overall": model_balancedness(rank_loads(phy2log, load, args.ranks)),
        },
        "persistence": lasting,
        "experts_moved": plan.experts_moved,
        "bytes_moved": plan.bytes_moved,
        "batches": [{"layers": list(b.layers), "bytes_moved": b.bytes_moved, "gain": b.gain} for b in plan.batches],
    }


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (0, 2 on bad input, 130 on Ctrl-C).

    Ctrl-C ends the run with one line and no traceback; ``--out`` is written atomically, so an
    interrupted run leaves no partial file. Every line is in the format asked for, read before
    parsing so that a bad flag's error is in it too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = logutil.requested_format(argv)
    try:
        return _run(argv, fmt)
    except KeyboardInterrupt:
        message = "interrupted, no plan written"
        logutil.command_line("eplb-plan", logging.ERROR, message, message, fmt, PLAN_TAG)
        return 130


def _log_format(args: argparse.Namespace) -> str:
    """``--log-format``, else ``EPLB_SERVICE_LOG_FORMAT`` (any case), else ``text``; a variable set to
    anything else is refused, naming it, as the coordinator refuses it."""
    try:
        return logutil.resolved_format(args.log_format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run(argv: list[str], fmt: str) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.log_format = fmt = _log_format(args)
        if fmt == "json":  # Python warnings and an uncaught exception as JSON lines too, not bare text
            logutil.configure("INFO", "json", tag=PLAN_TAG)
        enabled = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = PlanProgress(sys.stderr, enabled=enabled, fmt=fmt)
        text = json.dumps(plan_document(args, progress)) + "\n"
        progress.phase(f"writing {len(text) / 2**20:.1f} MiB of JSON to {args.out or 'stdout'}")
        if args.out:
            try:
                write_text_atomically(args.out, text)
            except OSError as exc:
                raise UsageError(f"--out {args.out}: {exc.strerror or exc}") from None
        else:
            try:
                write_stdout(text)
            except ReaderGone:  # `eplb-plan ... | head`: the reader chose to stop; nothing to say
                return SIGPIPE_EXIT
            except StdoutError as exc:
                raise UsageError(f"{exc} (a full disk? --out FILE writes the plan whole or not at all)") from None
    except (UsageError, ValueError) as exc:
        logutil.fatal("eplb-plan", str(exc), fmt, PLAN_TAG)
        return 2
    progress.phase("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
