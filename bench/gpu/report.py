"""The results table: ``p2p.json`` + ``harness.json`` -> markdown (and the targets of issue 4).

python -m bench.gpu.report --p2p p2p.json --harness harness.json [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import sys


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _delta(value, base) -> str:
    if value is None or not base:
        return "n/a"
    return f"{(value / base - 1) * 100:+.1f}%"


def _met(ok) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def build_table(p2p: dict | None, harness: dict | None) -> tuple[str, dict]:
    """Markdown and a dict of the target verdicts: the side link, then the harness's phases,
    commits and bandwidth, then the run itself; each part in a function of its own."""
    lines = ["| measurement | value | target | verdict |", "|---|---|---|---|"]
    verdicts: dict = {}
    peak = (p2p or {}).get("peak_gbps")
    if p2p:
        lines += _p2p_rows(p2p, peak)
    if not harness or not harness.get("phases"):
        if harness:
            lines.append(
                f"| harness | incomplete: hangs {harness.get('hangs')}, errors {harness.get('errors')} | | **missed** |"
            )
        return "\n".join(lines), verdicts
    idle = harness["phases"].get("idle", {}).get("all", {})
    base50, base99 = idle.get("p50_ms"), idle.get("p99_ms")
    lines += _step_time_rows(harness, peak, base50, base99, verdicts)
    lines += _commit_and_bandwidth_rows(harness, p2p, peak, base50, base99, verdicts)
    lines += _run_rows(harness, verdicts)
    lines += profile_lines(harness.get("profile") or {})
    return "\n".join(lines), verdicts


def _p2p_rows(p2p: dict, peak) -> list[str]:
    lines: list[str] = []
    chunked = ", ".join(f"{c} MiB: {_f(v, 0)}" for c, v in p2p.get("chunked_ring_gbps_mean", {}).items())
    lines.append(
        f"| side p2p peak (CuPy NCCL, GB/s per GPU, one direction; the highest of the patterns) | **{_f(peak, 1)}** (pair, one way {_f(p2p.get('pair_gbps'), 1)}; "
        f"ring, every GPU sending and receiving at once {_f(p2p.get('ring_gbps_mean'), 1)}; all-pairs {_f(p2p.get('all_pairs_gbps_mean'), 1)}; ring in chunks: {chunked}) | | |"
    )
    ap = p2p.get("agent_pattern_gbps_mean")
    if ap:
        lines.append(
            f"| agent-shaped group (8 experts x (16 + 8) MiB to one peer), GB/s per GPU | separate ops {_f(ap['separate_ops'], 1)}, "
            f"packed per peer {_f(ap['packed_per_peer'], 1)}, one pre-packed op {_f(ap['one_op_bound'], 1)}, "
            f"**agent blocks (gather on the pack stream + one op per tensor) {_f(ap.get('blocks'), 1)}** "
            f"(correct: {p2p.get('agent_pattern_blocks_correct')}) | | |"
        )
    sweep = p2p.get("cta_sweep")
    if sweep:
        cells = "; ".join(
            f"{row['max_ctas'] or 'NCCL default'}: ring {_f(row['ring_gbps_mean'], 0)}, blocks {_f(row['blocks_gbps_mean'], 0)} GB/s, "
            f"CTAs {', '.join(f'{v}' for k, v in row['ctas'].items())}"
            for row in sweep
        )
        lines.append(
            f"| side communicator CTA limit (max_ctas): ring / agent-block rate, CTAs per NCCL kernel | {cells} | | |"
        )
    pr = p2p.get("paced_ring")
    if pr:
        lines.append(
            f"| throttle gaps on the device ({pr['chunks']:.0f} x {pr['chunk_mib']:.0f} MiB ring groups, {pr['gap_s'] * 1e3:.1f} ms gap each) | "
            f"{_f(pr['gbps'], 1)} GB/s (expected {_f(pr['expected_gbps'], 1)}) | | |"
        )
    lines.append(
        f"| side transport checks (bit-exact exchange, stream fence, vote, abort + rebuild) | exchange {p2p.get('exchange_ok')}, "
        f"fence {p2p.get('fence_ok')}, vote {p2p.get('vote_ok')}, abort/rebuild {p2p.get('abort_ok')} | all true | {_met(p2p.get('ok'))} |"
    )
    return lines


def _step_time_rows(harness: dict, peak, base50, base99, verdicts: dict) -> list[str]:
    lines: list[str] = []
    ph = harness["phases"]
    idle = ph.get("idle", {}).get("all", {})
    lines.append(
        f"| step time, no rearrangement (idle phase) p50 / p99 | {_f(base50, 3)} / {_f(base99, 3)} ms ({idle.get('n')} steps) | | |"
    )
    for name, label in (
        ("stream_throttled", "throttled"),
        ("stream_unthrottled", "unthrottled"),
        ("soak", "soak, throttled"),
    ):
        phase = ph.get(name)
        if not phase:
            continue
        st = phase["streaming"]
        throttle = phase.get("throttle_bytes_per_s") or 0
        share = f", {throttle / 1e9 / peak * 100:.0f}% of peak" if throttle and peak else ""
        tl = f"{throttle / 1e9:.0f} GB/s{share}" if throttle else "off"
        if phase.get("chunk_bytes"):
            tl += f", {phase['chunk_bytes'] >> 20} MiB chunks"
        target = name == "stream_throttled"
        ok = None
        if target and st.get("p50_ms") and base50:
            ok = st["p50_ms"] <= base50 * 1.02 and st["p99_ms"] <= base99 * 1.05
            verdicts["step_time_while_streaming"] = {
                "p50_delta": st["p50_ms"] / base50 - 1,
                "p99_delta": st["p99_ms"] / base99 - 1,
                "met": ok,
            }
        lines.append(
            f"| step time while streaming ({label}, throttle {tl}) p50 / p99 | {_f(st.get('p50_ms'), 3)} / {_f(st.get('p99_ms'), 3)} ms "
            f"({_delta(st.get('p50_ms'), base50)} / {_delta(st.get('p99_ms'), base99)}; {st.get('n')} steps) | "
            f"{'<= +2% / +5%' if target else ''} | {_met(ok) if target else ''} |"
        )
    cpu = harness.get("agent_cpu_ms_per_batch")
    if cpu:
        per_phase = "; ".join(
            f"{name}: quiet {_f(ph[name].get('serving_cpu_quiet', {}).get('p50_ms'), 2)} / streaming "
            f"{_f(ph[name].get('serving_cpu_streaming', {}).get('p50_ms'), 2)}"
            for name in ("stream_throttled", "stream_unthrottled", "soak")
            if name in ph
        )
        lines.append(
            f"| host CPU: agent thread per batch (staging / vote); serving thread per step p50 | {_f(cpu['staging'], 2)} / "
            f"{_f(cpu['vote'], 2)} ms; {per_phase} ms | | |"
        )
    serving = [
        name for name in ph if name in ("prime", "idle", "stream_throttled", "stream_unthrottled", "soak", "sync")
    ]
    longest = max((ph[name]["all"].get("max_ms") or 0, name) for name in serving) if serving else (None, None)
    lines.append(
        f"| longest serving step (any serving phase, the priming plans included) | {_f(longest[0], 1)} ms ({longest[1]}) | | |"
    )
    if "prime" in ph:
        lines.append(
            f"| priming plans (the process's first, one-off costs) step time p50 / max | {_f(ph['prime']['all'].get('p50_ms'), 2)} / "
            f"{_f(ph['prime']['all'].get('max_ms'), 1)} ms ({ph['prime']['commits']} commits) | | |"
        )
    return lines


def _commit_and_bandwidth_rows(harness: dict, p2p: dict | None, peak, base50, base99, verdicts: dict) -> list[str]:
    lines: list[str] = []
    cs = harness["commit_stall"]
    lines.append(
        f"| step time at commit steps p50 / p99 | {_f(cs['step'].get('p50_ms'), 3)} / {_f(cs['step'].get('p99_ms'), 3)} ms "
        f"({_delta(cs['step'].get('p50_ms'), base50)} / {_delta(cs['step'].get('p99_ms'), base99)}; {cs['step'].get('n')} commits) | | |"
    )
    gpu = cs["gpu"]
    ok = None if gpu.get("max_ms") is None else gpu["max_ms"] <= 1.0
    verdicts["commit_stall"] = {
        "p50_ms": gpu.get("p50_ms"),
        "p99_ms": gpu.get("p99_ms"),
        "max_ms": gpu.get("max_ms"),
        "met": ok,
    }
    lines.append(
        f"| commit stall (serving stream, hook start to end incl. copies; max over ranks) p50 / p99 / max | "
        f"{_f(gpu.get('p50_ms'), 3)} / {_f(gpu.get('p99_ms'), 3)} / {_f(gpu.get('max_ms'), 3)} ms "
        f"(host enqueue max {_f(cs.get('max_host_enqueue_ms'), 3)} ms) | <= 1 ms | {_met(ok)} |"
    )
    bw = harness.get("bandwidth", {})
    for name, label, is_target in (
        ("isolated", "unthrottled, links otherwise idle", True),
        ("stream_unthrottled", "unthrottled, while serving", False),
        ("stream_throttled", "throttled, while serving", False),
    ):
        b = bw.get(name)
        if not b:
            continue
        link = b.get("gbps_link_mean")
        wall = b.get("gbps_session_wall_mean")
        both = (p2p or {}).get("peak_both_ways_gbps")
        frac = f" = {link / peak * 100:.0f}% of peak" if link and peak else ""
        if link and both:
            frac += f" ({link / both * 100:.0f}% of the both-ways ring peak)"
        ok = None
        if is_target and link and peak:
            ok = link >= 0.85 * peak
            verdicts["streaming_bandwidth"] = {"gbps": link, "peak_gbps": peak, "fraction": link / peak, "met": ok}
        lines.append(
            f"| streaming rate ({label}): side stream busy / whole batch incl. host work | {_f(link, 1)}{frac} / {_f(wall, 1)} GB/s "
            f"({b.get('sessions')} batches) | {'>= 85% of peak' if is_target else ''} | {_met(ok) if is_target else ''} |"
        )
    return lines


def _run_rows(harness: dict, verdicts: dict) -> list[str]:
    lines: list[str] = []
    gpu = harness["commit_stall"]["gpu"]
    opts = harness.get("options", {})
    lines.append(
        f"| harness config | {harness['world_size']} ranks, {harness['model']['num_layers']} layers x {harness['model']['num_physical']} "
        f"physical experts, hidden {harness['model']['hidden']}, MoE intermediate {harness['model']['intermediate']}, "
        f"{harness['model']['tokens_per_rank']} tokens x top-{harness['model']['top_k']} per rank, {harness['model']['dtype']}; "
        f"experts {harness.get('expert_mode')}; pack per peer {opts.get('pack_per_peer')}; groups in flight {opts.get('max_groups_in_flight')}; "
        f"fence {opts.get('fence_steps')} steps | | |"
    )
    co = harness["coordinator"]
    lines.append(
        f"| bytes moved (cross-rank, whole run) | {co['bytes_moved'] / 2**30:.1f} GiB in {co['committed']} committed rearrangements "
        f"({co['aborted']} aborted, {co['diverged']} diverged) | | |"
    )
    sb = harness.get("sync_baseline", {})
    if sb.get("plans"):
        per_plan = sb["layers_per_plan"]
        async_total = (gpu.get("p50_ms") or 0) * per_plan
        lines.append(
            f"| sync baseline (stop-the-world, one batched send/recv per layer on the serving group): stall p50 / max "
            f"for a plan of {per_plan} layers x {sb['experts_per_rank_per_layer']} experts/rank "
            f"({sb['bytes_per_rank_max_mean'] / 2**20:.0f} MiB per rank) | {_f(sb['stall'].get('p50_ms'), 2)} / {_f(sb['stall'].get('max_ms'), 2)} ms "
            f"(async: {per_plan} commits x {_f(gpu.get('p50_ms'), 3)} ms = {_f(async_total, 3)} ms of serving stall) | | |"
        )
    soak = harness.get("soak", {})
    ok = (
        harness.get("hangs") == 0
        and harness.get("output_mismatches") == 0
        and harness.get("complete")
        and not harness.get("errors")
    )
    verdicts["hangs_mismatches"] = {
        "hangs": harness.get("hangs"),
        "mismatches": harness.get("output_mismatches"),
        "met": ok,
    }
    lines.append(
        f"| soak: rearrangements under serving, hangs, output mismatches (whole run) | {soak.get('rearrangements')} in "
        f"{soak.get('seconds')} s of soak ({co['committed']} in the run); hangs {harness.get('hangs')}; mismatches "
        f"{harness.get('output_mismatches')} (every step, every token) | 0 hangs, 0 mismatches | {_met(ok)} |"
    )
    return lines


def profile_lines(profile: dict) -> list[str]:
    """Rows of the profiled windows: serving kernels' GPU time per step, idle against streaming."""
    out = []
    for name, label in (("stream_throttled", "throttled"), ("stream_unthrottled", "unthrottled")):
        cmp = profile.get(name)
        if not cmp:
            continue
        idle_ms, stream_ms = cmp["serving_kernel_ms_per_step"]
        steps = cmp.get("step_ms_p50") or [None, None]
        top = "; ".join(
            f"{r['kernel']} {r['added_ms_per_step']:+.2f} ms (x{_f(r['mean_ratio'], 2)})"
            for r in cmp["top_changes"][:4]
        )
        ctas = (
            ", ".join(f"{k} {v}" for k, v in cmp.get("side_kernel_ctas", {}).items() if "ncclDevKernel" in k) or "n/a"
        )
        out.append(
            f"| profile, rank 0 ({label} vs idle): step p50; serving-stream kernel time per step; side kernels per step; "
            f"largest changes; side NCCL CTAs | {_f(steps[0], 2)} -> {_f(steps[1], 2)} ms; {_f(idle_ms, 2)} -> {_f(stream_ms, 2)} ms "
            f"({_delta(stream_ms, idle_ms)}); {_f(cmp['side_kernel_ms_per_step'], 2)} ms; {top}; {ctas} | | |"
        )
        if cmp.get("host_api_ms_per_step"):
            base, now = cmp["host_api_ms_per_step"]
            calls = "; ".join(
                f"{r['call']} {r['idle_ms_per_step']:.2f} -> {r['streaming_ms_per_step']:.2f} ms"
                for r in cmp["host_api_top_changes"][:4]
            )
            out.append(
                f"| profile, rank 0 ({label} vs idle): serving thread's CUDA API time per step; largest changes | "
                f"{_f(base, 2)} -> {_f(now, 2)} ms; {calls} | | |"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.report")
    p.add_argument("--p2p", default=None)
    p.add_argument("--harness", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    def load(path):
        if not path:
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    table, verdicts = build_table(load(args.p2p), load(args.harness))
    text = table + "\n\n```json\n" + json.dumps(verdicts, indent=2) + "\n```\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
