"""``eplb-coordinator``: the daemon, the simulated deployment, and the status query.

    eplb-coordinator --dp 8 [--tp 1] [--endpoint ipc:///run/eplb/coordinator.sock]
    eplb-coordinator --dp 8 --simulate [--steps 1500] [--seed 0] [--summary-json s.json] [--plot p.png]
    eplb-coordinator status [--endpoint ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from eplb_service import logutil
from eplb_service.coordinator.config import CoordinatorConfig, default_endpoint
from eplb_service.protocol import AgentConfig

SIM_DEFAULTS = {"rebalance_interval_steps": 100, "min_window_steps": 40, "load_half_life_steps": 100.0}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eplb-coordinator", description="eplb-service coordinator: plans expert placement for a vLLM EP deployment off the serving path.")
    p.add_argument("--dp", type=_positive_int, default=1, help="vLLM data-parallel size (EP ranks = dp x tp)")
    p.add_argument("--tp", type=_positive_int, default=1, help="vLLM tensor-parallel size per DP rank")
    p.add_argument("--endpoint", default=None, help=f"ZeroMQ endpoint to bind (default {default_endpoint()})")
    p.add_argument("--store-host", default="127.0.0.1",
                   help="ignored since protocol 2: rank 0's worker hosts the rendezvous store (EPLB_SERVICE_STORE_HOST/_PORT there)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0 = any free port)")
    p.add_argument("--policy", default="migration", help="placement policy: migration (default) or deepseek")
    p.add_argument("--groups", type=_positive_int, default=1, help="expert groups (hierarchical deepseek policy)")
    p.add_argument("--nodes", type=_positive_int, default=1, help="nodes of the deployment")
    p.add_argument("--rebalance-interval-steps", type=_positive_int, default=None, help="steps between rebalance attempts (default 200; 100 with --simulate)")
    p.add_argument("--min-gain", type=float, default=0.01, help="minimum projected balancedness gain to start a plan")
    p.add_argument("--staging-budget-bytes", type=_positive_int, default=1 << 30, help="staging memory per rank; larger plans go in layer batches")
    p.add_argument("--report-interval-steps", type=_positive_int, default=10, help="steps per load report from each agent")
    p.add_argument("--fence-steps", type=_positive_int, default=8, help="F: commit step = max(vote entry step) + F")
    p.add_argument("--fence-timeout-s", type=float, default=5.0, help="longest a serving thread waits at the fence")
    p.add_argument("--throttle-bytes-per-s", type=float, default=0.0, help="per-rank streaming cap (0 = unthrottled)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one JSON object per line")
    p.add_argument("--config", default=None, help="TOML file of settings (keys = long flag names); flags override it")
    sim = p.add_argument_group("simulated deployment (CPU)")
    sim.add_argument("--simulate", action="store_true", help="run the coordinator with dp x tp simulated serving ranks and real agents")
    sim.add_argument("--steps", type=_positive_int, default=1500, help="serving steps per rank")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--summary-json", default=None, help="write the run's summary here")
    sim.add_argument("--plot", default=None, help="write a PNG of balancedness over time here (needs matplotlib)")
    sim.add_argument("--trace", default=None, help="replay this recorded load trace (.npz from --record) instead of the built-in drift")
    p.add_argument("--curve-dir", default=None, help="CURVE keys (eplb-coordinator keygen DIR); required for non-loopback tcp://")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback tcp:// endpoint without CURVE")
    p.add_argument("--record", default=None, help="record every load window to this .npz trace")
    p.add_argument("--no-step-clock-check", dest="step_clock_check", action="store_false",
                   help="do not compare the ranks' step clocks (only for ranks that do not serve in lockstep)")
    p.add_argument("--initial-placement", default=None, help="placement JSON from eplb-plan: move the deployment there first")
    return p


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    interval = args.rebalance_interval_steps or (SIM_DEFAULTS["rebalance_interval_steps"] if args.simulate else 200)
    extra = {k: v for k, v in SIM_DEFAULTS.items() if k != "rebalance_interval_steps"} if args.simulate else {}
    initial = None
    if args.initial_placement:
        from eplb_service.coordinator.plan_cli import UsageError, read_placement

        try:
            initial = read_placement(args.initial_placement, "--initial-placement")
        except UsageError as exc:
            raise ValueError(str(exc)) from None
    return CoordinatorConfig(
        initial_placement=initial,
        world_size=args.dp * args.tp, endpoint=args.endpoint or default_endpoint(), store_host=args.store_host,
        metrics_port=args.metrics_port, policy=args.policy, num_groups=args.groups, num_nodes=args.nodes,
        rebalance_interval_steps=interval, min_gain=args.min_gain, record_path=args.record,
        curve_dir=args.curve_dir, insecure=args.insecure, staging_budget_bytes=args.staging_budget_bytes,
        check_step_clock=args.step_clock_check,
        agent=AgentConfig(report_interval_steps=args.report_interval_steps, fence_steps=args.fence_steps,
                          fence_timeout_s=args.fence_timeout_s, throttle_bytes_per_s=args.throttle_bytes_per_s),
        **extra,
    )


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Settings from a TOML file, keyed by long flag names (``dp``, ``metrics-port``...)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path!r} is not valid TOML: {exc}") from None
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    settings = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise ValueError(f"config file {path!r}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        action = known[dest]
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise ValueError(f"config file {path!r}: {key} = {value!r}: {exc}") from None
        settings[dest] = value
    return settings


def _serve(cfg: CoordinatorConfig) -> int:
    from eplb_service.coordinator.server import Coordinator

    async def main() -> None:
        coordinator = Coordinator(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coordinator.stop)
        await coordinator.serve()

    import uvloop
    uvloop.run(main())
    return 0


def _simulate(args: argparse.Namespace, cfg: CoordinatorConfig) -> int:
    from eplb_service.sim.deployment import SimulationOptions, run_simulation
    from eplb_service.sim.workload import SimModelConfig, shape_for_trace

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("eplb-coordinator: error: --plot needs matplotlib: pip install 'eplb-service[plot]'", file=sys.stderr)
            return 2
    model = SimModelConfig()
    if args.trace:
        from eplb_service.trace import TraceError, load_trace

        try:
            load_trace(args.trace)
        except TraceError as exc:
            print(f"eplb-coordinator: error: {exc}", file=sys.stderr)
            return 2
        model = shape_for_trace(SimModelConfig(trace_path=os.path.abspath(args.trace)), cfg.world_size)
    opts = SimulationOptions(world_size=cfg.world_size, steps=args.steps, seed=args.seed, model=model,
                             summary_json=args.summary_json, plot=args.plot)
    summary = run_simulation(opts, cfg)
    print(json.dumps(summary, indent=2))
    ok = summary["output_mismatches"] == 0 and summary["diverged"] == 0 and not summary["errors"]
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "keygen":
        if len(argv) != 2:
            print("usage: eplb-coordinator keygen DIR", file=sys.stderr)
            return 2
        from eplb_service.security import generate_keys

        for role, path in generate_keys(argv[1]).items():
            print(f"{role}: {path}")
        return 0
    if argv and argv[0] == "status":
        from eplb_service.coordinator.status_client import main as status_main
        return status_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config:
            parser.set_defaults(**load_config_file(args.config, parser))
            args = parser.parse_args(argv)
        logutil.configure(args.log_level, args.log_format)
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"eplb-coordinator: error: {exc}", file=sys.stderr)
        return 2
    return _simulate(args, cfg) if args.simulate else _serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
