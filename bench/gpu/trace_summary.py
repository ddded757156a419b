"""Where the GPU time of a serving step goes, from PyTorch profiler traces (Chrome JSON).

The harness profiles a few steps of rank 0 in three windows: ``idle`` (no plans), and
while plans stream throttled and unthrottled. This module turns the exported traces into
numbers a reader can compare: kernel time per step on each stream, which streams are the
serving ones (every stream with kernels in the idle window: compute and the serving
group's NCCL stream) and which are the side transport's (kernels only while streaming),
how much slower each serving kernel ran while the side traffic flowed, and how many CTAs
the side communicator's kernels were launched with.

Pure functions over the parsed JSON: testable without a GPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    ts_us: float
    dur_us: float
    ctas: int
    """Grid size (x*y*z): thread blocks the kernel was launched with."""


def kernels_of(trace: dict) -> list[Kernel]:
    """The GPU kernels of a Chrome trace exported by ``torch.profiler``."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") != "kernel":
            continue
        args = ev.get("args", {})
        grid = args.get("grid") or [1, 1, 1]
        ctas = 1
        for g in grid:
            ctas *= int(g)
        out.append(
            Kernel(
                name=str(ev.get("name", "?")),
                stream=int(args.get("stream", ev.get("tid", -1))),
                ts_us=float(ev.get("ts", 0.0)),
                dur_us=float(ev.get("dur", 0.0)),
                ctas=ctas,
            )
        )
    return out


def load_kernels(path: str) -> list[Kernel]:
    with open(path) as f:
        return kernels_of(json.load(f))


def export_trace(prof, path: str | None = None) -> dict:
    """A finished ``torch.profiler`` run's Chrome trace as parsed JSON.

    The profiler only exports to a file: it goes to ``path`` (kept) or to a temporary file
    (deleted).
    """
    if path is not None:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory(prefix="eplb-trace-") as directory:
        return export_trace(prof, os.path.join(directory, "trace.json"))


def short_name(name: str, width: int = 60) -> str:
    """A kernel name without template arguments, cut to ``width`` characters."""
    depth, kept = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            kept.append(ch)
    text = "".join(kept).replace("void ", "").strip()
    text = text.split("(")[0] or name
    return text[:width]


def window_summary(kernels: list[Kernel], steps: int, serving_streams: set[int] | None = None) -> dict:
    """Per stream and per kernel name: time per step; the side kernels' CTA counts.

    ``serving_streams`` (from the idle window) splits the streams into serving and side;
    ``None`` means this window *is* the idle one and all its streams are serving streams.
    """
    steps = max(steps, 1)
    by_stream: dict[int, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(list)
    side_ctas: dict[str, set[int]] = defaultdict(set)
    streams = {k.stream for k in kernels}
    serving = streams if serving_streams is None else serving_streams
    for k in kernels:
        by_stream[k.stream] += k.dur_us
        if k.stream in serving:
            by_name[short_name(k.name)].append(k.dur_us)
        else:
            side_ctas[short_name(k.name)].add(k.ctas)
    serving_us = sum(v for s, v in by_stream.items() if s in serving)
    side_us = sum(v for s, v in by_stream.items() if s not in serving)
    return {
        "steps": steps,
        "serving_streams": sorted(serving & streams),
        "side_streams": sorted(streams - serving),
        "serving_kernel_ms_per_step": serving_us / steps / 1e3,
        "side_kernel_ms_per_step": side_us / steps / 1e3,
        "stream_ms_per_step": {str(s): v / steps / 1e3 for s, v in sorted(by_stream.items())},
        "serving_kernels": {
            name: {"per_step": len(d) / steps, "mean_us": sum(d) / len(d), "ms_per_step": sum(d) / steps / 1e3}
            for name, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
        },
        "side_kernel_ctas": {name: sorted(c) for name, c in sorted(side_ctas.items())},
    }


def compare(idle: dict, streaming: dict, top: int = 8) -> dict:
    """How the serving kernels changed between the idle window and a streaming one."""
    rows = []
    for name, base in idle["serving_kernels"].items():
        other = streaming["serving_kernels"].get(name)
        if other is None:
            continue
        rows.append(
            {
                "kernel": name,
                "idle_ms_per_step": base["ms_per_step"],
                "streaming_ms_per_step": other["ms_per_step"],
                "mean_ratio": other["mean_us"] / base["mean_us"] if base["mean_us"] else None,
                "added_ms_per_step": other["ms_per_step"] - base["ms_per_step"],
            }
        )
    rows.sort(key=lambda r: -abs(r["added_ms_per_step"]))
    base_ms = idle["serving_kernel_ms_per_step"]
    host = {}
    if "host_api" in idle and "host_api" in streaming:
        a, b = idle["host_api"], streaming["host_api"]
        calls = [
            {
                "call": name,
                "idle_ms_per_step": a["calls"].get(name, {}).get("ms_per_step", 0.0),
                "streaming_ms_per_step": b["calls"].get(name, {}).get("ms_per_step", 0.0),
            }
            for name in set(a["calls"]) | set(b["calls"])
        ]
        calls.sort(key=lambda r: -abs(r["streaming_ms_per_step"] - r["idle_ms_per_step"]))
        host = {"host_api_ms_per_step": [a["ms_per_step"], b["ms_per_step"]], "host_api_top_changes": calls[:top]}
    return {
        **host,
        "serving_kernel_ms_per_step": [base_ms, streaming["serving_kernel_ms_per_step"]],
        "serving_kernel_change": (streaming["serving_kernel_ms_per_step"] / base_ms - 1) if base_ms else None,
        "side_kernel_ms_per_step": streaming["side_kernel_ms_per_step"],
        "side_kernel_ctas": streaming["side_kernel_ctas"],
        "top_changes": rows[:top],
    }


def host_api_summary(trace: dict, steps: int, tid: int | None = None, top: int = 12) -> dict:
    """CUDA runtime/driver calls on the host (``torch.profiler`` CPU activity): time per step by name.

    ``tid`` keeps one thread's calls (the serving thread's OS thread id); ``None`` keeps all.
    Where the serving thread's launches slow down while side traffic flows, this says which
    calls took the time (a launch waiting on a driver lock, a synchronisation spinning longer).
    """
    steps = max(steps, 1)
    by_name: dict[str, list[float]] = defaultdict(list)
    threads = set()
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        threads.add(ev.get("tid"))
        if tid is not None and ev.get("tid") != tid:
            continue
        by_name[str(ev.get("name", "?"))].append(float(ev.get("dur", 0.0)))
    if tid is not None and not by_name and threads:
        return host_api_summary(trace, steps, tid=None, top=top)  # the profiler named threads otherwise: all of them
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "steps": steps,
        "tid": tid,
        "threads_seen": len(threads),
        "ms_per_step": sum(sum(d) for d in by_name.values()) / steps / 1e3,
        "calls": {
            name: {"per_step": len(d) / steps, "mean_us": sum(d) / len(d), "ms_per_step": sum(d) / steps / 1e3}
            for name, d in rows
        },
    }
