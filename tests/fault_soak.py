"""Run the fault suite many times and sum what its safety checks saw: the 20-run soak of issue 13.

    python tests/fault_soak.py --runs 20 --parallel 4 [--out DIR] [-- PYTEST ARGS]

Each run is one ``pytest`` process over the fault scenarios (``tests/test_fault_scenarios.py``
by default). Every scenario that checks the all-or-none invariant appends one line to a
ledger (``sim_cluster.record_in_ledger``), before its asserts, so a run that fails still
counts what it saw. The table at the end separates the two kinds of failure:

- **safety**: an output mismatch, a dead agent thread, an agent loop that reset, ranks that
  committed different plans or hold different maps, a rank that ended in an error (or did
  not report). Any of these exits 1.
- **progress**: a run that failed only on something else (a plan that did not commit in
  time on an overloaded machine, a timeout). Counted and shown; exits 1 as well, since the
  suite is meant to pass, but the table says which kind it was.

Runs in parallel share the machine: keep ``--parallel`` x 5 processes within its cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_fault_scenarios.py"]
SAFETY_KEYS = ("mismatches", "dead_agent_threads", "agent_resets", "split_commits", "maps_differ", "rank_errors")


def run_once(index: int, out: Path, pytest_args: list[str], timeout_s: float) -> dict:
    """One pytest run with its own ledger and log; the summary of both."""
    ledger = out / f"ledger_{index}.jsonl"
    log = out / f"run_{index}.log"
    env = dict(
        os.environ,
        EPLB_SERVICE_FAULT_LEDGER=str(ledger),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    entries = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    tail = log.read_text(errors="replace").strip().splitlines()
    # pytest's short summary ("FAILED path::test - message"); captured log lines also start with "ERROR".
    failed = [
        line.split(" - ")[0].split("::")[-1] for line in tail if line.startswith(("FAILED ", "ERROR ")) and "::" in line
    ]
    return {
        "run": index,
        "rc": rc,
        "seconds": round(time.monotonic() - start, 1),
        "summary": (tail[-1] if tail else "") + (f" ({', '.join(failed)})" if failed else ""),
        "checked": len(entries),
        "plans_committed": sum(e["plans_committed"] for e in entries),
        **{key: sum(int(e.get(key, 0)) for e in entries) for key in SAFETY_KEYS},
    }


def table(rows: list[dict]) -> str:
    """A markdown table, one line per run and a total."""
    head = ["run", "rc", "s", "scenarios checked", "plans committed", *SAFETY_KEYS, "pytest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r["run"]):
        cells = [r["run"], r["rc"], r["seconds"], r["checked"], r["plans_committed"], *(r[k] for k in SAFETY_KEYS)]
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {r['summary']} |")
    totals = [sum(r[k] for r in rows) for k in ("checked", "plans_committed", *SAFETY_KEYS)]
    failed = sum(r["rc"] != 0 for r in rows)
    lines.append(f"| all {len(rows)} | {failed} failed | | " + " | ".join(str(t) for t in totals) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="pytest runs of the fault suite (default: 20)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default: 1)")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="longest one run may take (default: 1500)")
    parser.add_argument("--out", default=None, help="directory for logs, ledgers and table.md (default: a temp dir)")
    parser.add_argument("pytest_args", nargs="*", help=f"after --: what pytest runs (default: {DEFAULT_TESTS})")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.parallel < 1:
        parser.error(f"--runs {args.runs} and --parallel {args.parallel}: expected both >= 1")
    out = Path(args.out or tempfile.mkdtemp(prefix="fault-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    pytest_args = args.pytest_args or DEFAULT_TESTS
    rows: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_once, i + 1, out, pytest_args, args.timeout_s) for i in range(args.runs)]
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            print(f"run {row['run']}: rc {row['rc']} in {row['seconds']} s, {row['summary']}", flush=True)
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print(text)
    unsafe = sum(r[k] for r in rows for k in SAFETY_KEYS)
    print(f"safety violations: {unsafe}; failed runs: {sum(r['rc'] != 0 for r in rows)} of {len(rows)}; logs in {out}")
    return 1 if unsafe or any(r["rc"] != 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
