"""``eplb-plan``: compute a placement offline, from a load file.

Reads a load ``[L, N_log]`` (``.npy``, JSON: a list of lists or an object with a ``load``
key, or a coordinator's recorded trace ``.npz`` whose windows are summed), runs a placement policy, and
writes placement JSON::

    {"policy": ..., "num_layers": L, "num_logical": N, "num_physical": P, "num_ranks": R,
     "phy2log": [[...], ...],            # [L, P]
     "logcnt": [[...], ...],             # [L, N]
     "balancedness": {"per_layer_before": [...], "per_layer": [...], "before": b0, "overall": b1},
     "persistence": a,                   # 1.0 unless --previous-load is given
     "experts_moved": n, "bytes_moved": n,
     "batches": [{"layers": [...], "bytes_moved": n, "gain": g}, ...]}

``--current`` takes the same JSON (only ``phy2log`` is read; a bare ``[L, P]`` list works
too), so a plan can seed the coordinator's initial placement and the next plan can start from
it. Without ``--current`` the current placement is vLLM's initial one (slot ``p`` holds expert
``p % N``). Balancedness figures are under ``--load`` as given (with ``--previous-load`` and a
persistence below 0.6 the migration policy plans for a forecast of the next window, see
``load_forecast``; the batches' gains are then under that forecast). Bad input ends with exit
code 2 and a one-line message naming the bad value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from eplb_service.coordinator.load_forecast import persistence
from eplb_service.coordinator.policy import DEFAULT_POLICY, POLICIES, plan_rebalance, validate_load
from eplb_service.placement import (
    PlacementShape,
    initial_phy2log,
    layer_balancedness,
    logical_replica_count,
    model_balancedness,
    rank_loads,
)


class UsageError(Exception):
    """Bad command-line input; the message is shown as is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other input error
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eplb-plan", description="Compute an expert placement offline from a load file.")
    parser.add_argument(
        "--load",
        required=True,
        metavar="FILE",
        help=".npy or JSON load [layers, logical experts] in routed tokens (counts: the migration "
        "policy ignores differences within their sampling noise), or a recorded .npz trace",
    )
    parser.add_argument(
        "--previous-load",
        metavar="FILE",
        help="the window before --load, same shape and formats: the migration policy measures how much "
        "of the imbalance lasted from it to --load, prices moves by it and, where most of it fades, plans "
        "for the forecast next window (default: plan for --load as it is)",
    )
    parser.add_argument("--ranks", required=True, type=int, help="EP ranks (must divide the slots)")
    parser.add_argument(
        "--redundant", type=int, default=None, help="redundant slots per layer (default: from --current, else 0)"
    )
    parser.add_argument("--groups", type=int, default=1, help="expert groups (deepseek hierarchy)")
    parser.add_argument("--nodes", type=int, default=1, help="server nodes (deepseek hierarchy)")
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULT_POLICY,
        help="migration (default): change only what the load needs, starting from --current "
        "(or vLLM's initial placement); "
        "deepseek: DeepSeek's EPLB algorithm (as vLLM ships it), with the slots inside each rank "
        "ordered to keep the experts --current already has there in place, so its phy2log equals "
        "DeepSeek's only up to a permutation within each rank (same experts per rank, same loads)",
    )
    parser.add_argument("--current", metavar="FILE", help="current placement JSON (phy2log)")
    parser.add_argument("--bytes-per-expert", type=int, default=1, help="bytes of one expert on one rank")
    parser.add_argument("--staging-budget-bytes", type=int, default=None, help="staging bytes per rank per batch")
    parser.add_argument("--min-layer-gain", type=float, default=0.0, help="skip layers gaining less balancedness")
    parser.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    return parser


def _read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _as_2d(value, path: str, what: str, dtype) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {path}: expected a 2-D numeric array (equal-length rows)") from None
    if arr.ndim != 2:
        raise UsageError(f"{what} {path}: expected a 2-D array, got shape {arr.shape}")
    return arr


def read_load(path: str, flag: str = "--load") -> np.ndarray:
    """``[L, N_log]`` float64 from ``.npy``, JSON, or a recorded trace (``.npz``, windows summed)."""
    if path.endswith(".npz"):
        from eplb_service.trace import TraceError, load_trace

        try:
            value = load_trace(path).aggregate()
        except TraceError as exc:
            raise UsageError(f"{flag} {path}: {exc}") from None
    elif path.endswith(".npy"):
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{flag} {path}: cannot read .npy ({exc})") from None
    else:
        value = _read_json(path, flag)
        if isinstance(value, dict):
            if "load" not in value:
                raise UsageError(f"{flag} {path}: JSON object has no 'load' key")
            value = value["load"]
    return _as_2d(value, path, flag, np.float64)


def read_placement(path: str, flag: str = "--current") -> np.ndarray:
    """``phy2log [L, P]`` from placement JSON (an object with ``phy2log``, or a bare list)."""
    value = _read_json(path, flag)
    if isinstance(value, dict):
        if "phy2log" not in value:
            raise UsageError(f"{flag} {path}: JSON object has no 'phy2log' key")
        value = value["phy2log"]
    arr = _as_2d(value, path, flag, np.float64)
    if not np.all(arr == np.round(arr)):
        raise UsageError(f"{flag} {path}: phy2log entries must be integers")
    return arr.astype(np.int64)


def plan_document(args: argparse.Namespace) -> dict:
    """Plan for parsed ``args`` and return the output document (raises UsageError / ValueError)."""
    load = read_load(args.load)
    num_layers, num_logical = load.shape
    current = read_placement(args.current) if args.current else None
    if args.redundant is None:
        redundant = current.shape[1] - num_logical if current is not None else 0
    else:
        redundant = args.redundant
    if redundant < 0:
        raise UsageError(f"--redundant {redundant} must be >= 0")
    num_physical = num_logical + redundant
    if args.ranks <= 0:
        raise UsageError(f"--ranks {args.ranks} must be a positive integer")
    if num_physical % args.ranks:
        raise UsageError(
            f"--ranks {args.ranks} does not divide the {num_physical} slots per layer "
            f"({num_logical} experts + {redundant} redundant)"
        )
    shape = PlacementShape(num_layers, num_logical, num_physical, args.ranks)
    load = validate_load(load, shape)
    lasting = 1.0
    if args.previous_load:
        previous = read_load(args.previous_load, "--previous-load")
        if previous.shape != load.shape:
            raise UsageError(f"--previous-load has shape {previous.shape}, expected {load.shape} (the shape of --load)")
        lasting = persistence(validate_load(previous, shape), load)
    if current is None:
        current = initial_phy2log(shape)
    elif current.shape != (num_layers, num_physical):
        raise UsageError(
            f"--current has shape {current.shape}, expected ({num_layers}, {num_physical}) "
            f"[layers of --load, {num_logical} experts + {redundant} redundant]"
        )
    plan = plan_rebalance(
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
    )
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
    """Console entry point; returns the exit status (0, or 2 on bad input)."""
    try:
        args = build_parser().parse_args(argv)
        text = json.dumps(plan_document(args)) + "\n"
        if args.out:
            try:
                Path(args.out).write_text(text)
            except OSError as exc:
                raise UsageError(f"--out {args.out}: {exc.strerror or exc}") from None
        else:
            sys.stdout.write(text)
    except (UsageError, ValueError) as exc:
        print(f"eplb-plan: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
