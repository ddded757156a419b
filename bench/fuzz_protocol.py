"""Protocol fuzz at scale (the CI run does a few hundred cases of the same properties).

    python bench/fuzz_protocol.py [--cases 100000]

Three streams, each ``--cases`` long: raw random bytes, well-typed messages of every type
mutated at the byte level, and well-typed messages fed to a live coordinator's handlers.
Prints a table: cases, outcomes, crashes (must be 0), wall time and peak RSS growth.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb_service import protocol
from eplb_service.testing.protocol_fuzz import HandlerHarness, check_frame, message_strategy, mutate


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(name: str, test, cases: int, outcomes: dict) -> dict:
    crashes = []
    t0, rss0 = time.perf_counter(), rss_mib()
    wrapped = settings(
        max_examples=cases, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )(test)
    try:
        wrapped()
    except Exception as exc:  # a crash is a finding: report it, do not hide it
        crashes.append(f"{type(exc).__name__}: {exc}"[:300])
    return {
        "stream": name,
        "cases": sum(outcomes.values()),
        **dict(outcomes),
        "crashes": len(crashes),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rss_growth_mib": round(rss_mib() - rss0, 1),
        "first_crash": crashes[:1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100_000)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the coordinator logs every refusal; millions of lines help nobody
    rows = []

    raw: dict = {}

    @given(st.binary(max_size=4096))
    def raw_bytes(frame):
        outcome = check_frame(frame)
        raw[outcome] = raw.get(outcome, 0) + 1

    rows.append(run("raw bytes", raw_bytes, args.cases, raw))

    mutated: dict = {}

    @given(message_strategy(), st.data())
    def mutated_messages(message, data):
        frame = protocol.encode(message)
        try:
            assert protocol.decode(frame) == message
        except protocol.ProtocolError:  # the value breaks a declared constraint: refused, as it must be
            pass
        outcome = check_frame(mutate(frame, data))
        mutated[outcome] = mutated.get(outcome, 0) + 1

    rows.append(run("mutated messages", mutated_messages, args.cases, mutated))

    handled: dict = {}
    harness = HandlerHarness()

    @given(message_strategy(), st.sampled_from([b"rank-0", b"rank-1", b"stranger"]))
    def coordinator_handlers(message, identity):
        harness.feed(message, identity)
        handled["handled"] = handled.get("handled", 0) + 1

    rows.append(run("coordinator handlers", coordinator_handlers, args.cases, handled))

    print(f"protocol fuzz, {args.cases} cases per stream\n")
    print("| stream | cases | outcomes | crashes | wall s | peak RSS growth MiB |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        outcomes = ", ".join(
            f"{k} {v}"
            for k, v in r.items()
            if k not in ("stream", "cases", "crashes", "wall_s", "rss_growth_mib", "first_crash")
        )
        print(f"| {r['stream']} | {r['cases']} | {outcomes} | {r['crashes']} | {r['wall_s']} | {r['rss_growth_mib']} |")
        if r["first_crash"]:
            print(f"  first crash: {r['first_crash'][0]}")


if __name__ == "__main__":
    main()
