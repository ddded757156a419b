"""``eplb-coordinator``: the daemon, the simulated deployment, the status query and CURVE keys.

    eplb-coordinator [serve] --dp 8 [--tp 1] [--endpoint ipc:///run/eplb/coordinator.sock]
    eplb-coordinator [serve] --dp 8 --simulate [--steps 1500] [--seed 0] [--summary-json s.json] [--plot p.png]
    eplb-coordinator status [--endpoint ...] [--json]
    eplb-coordinator keygen DIR

``serve`` is the default command, so deployments written as ``eplb-coordinator --dp 8`` keep working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from eplb_service import logutil
from eplb_service.coordinator import arg_types
from eplb_service.coordinator.config import CoordinatorConfig, check_endpoint, default_endpoint, split_tcp_endpoint
from eplb_service.coordinator.config_file import config_path, load_config_file, peek_log_format
from eplb_service.protocol import AgentConfig
from eplb_service.stop_signals import not_ignored
from eplb_service.units import human_bytes

if TYPE_CHECKING:  # imported where a simulation runs: the daemon never loads it
    from eplb_service.sim.deployment import SimulationOptions

SIM_DEFAULTS = {"rebalance_interval_steps": 100, "min_window_steps": 40, "load_half_life_steps": 100.0}
SIM_STEPS = 1500
"""Serving steps per simulated rank unless ``--steps`` says otherwise."""
SIM_MAX_STEPS = 1_000_000
"""Most ``--steps``: every simulated rank keeps a record of every step (``[steps, layers, ranks]``
int64 and more, gathered in this process), some 300 bytes per step per rank at 8 ranks; a
hundred million steps asked tens of GB of each. A million steps is hours of simulated serving."""


def sim_steps(text: str) -> int:
    """``--steps``: a positive integer up to :data:`SIM_MAX_STEPS`."""
    steps = arg_types.positive_int(text)
    if steps > SIM_MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {SIM_MAX_STEPS} steps, got {steps}")
    return steps


SIM_RANK_BYTES = 300 * 2**20
"""Memory one simulated rank process takes: it imports torch and runs gloo (185-250 MiB resident
each, measured at ``--dp 2`` on CPU), rounded up."""


def sim_memory_problem(world_size: int, available_bytes: int | None) -> str | None:
    """Why ``--simulate`` with ``world_size`` rank processes would not fit this machine's memory,
    or ``None``. Unchecked, ``--simulate --dp 128`` started 128 processes toward ~37 GiB and
    the out-of-memory killer ended some mid-run, each a rank error; ``None`` where the
    available memory is unknown."""
    need = world_size * SIM_RANK_BYTES
    if available_bytes is None or need <= available_bytes:
        return None
    return (
        f"--simulate with {world_size} ranks starts {world_size} processes of about "
        f"{human_bytes(SIM_RANK_BYTES)} each ({human_bytes(need)}), more than the {human_bytes(available_bytes)} "
        f"this machine has available; expected --dp x --tp of at most {available_bytes // SIM_RANK_BYTES} here"
    )


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


MAX_EP_RANKS = 16384
"""Most EP ranks (``--dp`` x ``--tp``) the coordinator takes: far above any EP deployment (hundreds of
GPUs), while its per-rank state stays small. Unbounded, ``--dp 100000000`` (a typo) sat for minutes
with no line, building per-rank state toward hundreds of GB (2.5 GB already at 1000000)."""


SIM_ONLY = ("steps", "seed", "summary_json", "plot", "trace")
"""Flags that only mean something with ``--simulate``; the daemon refuses them rather than ignore them."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, so ``--help`` is the reference for them; descriptions keep their line breaks.

    A default of ``None`` (off, or computed elsewhere) or a switch's ``True``/``False`` says nothing
    useful: such flags say in their own help what happens without them.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


_TOP_EPILOG = """\
Without a command, serve runs: `eplb-coordinator --dp 8` is `eplb-coordinator serve --dp 8`.
  eplb-coordinator --dp 8 [--tp 1] [--metrics-port 9464]     the daemon
  eplb-coordinator --dp 8 --simulate                          a simulated deployment on CPU
  eplb-coordinator status [--json]                            ask a running coordinator
  eplb-coordinator keygen /etc/eplb-service/keys              CURVE keys for tcp:// across hosts
Default endpoint: {endpoint}
`eplb-coordinator COMMAND --help` lists a command's flags.
"""


SERVE_EXIT_STATUS = """\
Exit status: 0 after SIGTERM, SIGINT or SIGHUP (with --simulate: 128 + the signal's number, its
ranks stopped, no summary; one ignored when it started stays ignored: under nohup, SIGHUP); 2 for a
refused flag, --config file or environment variable (one line naming it, before anything starts); 1
if the endpoint or --metrics-port cannot be taken, or, with --simulate, if an output mismatched, a
plan diverged, a rank reported an error, rebalancing halted or --summary-json/--plot could not be
written at the end (the summary is still on stdout)."""
STATUS_EXIT_STATUS = """\
Exit status: 0 with the status printed; 1 if no coordinator answers within --timeout-s or the
endpoint cannot be used, or stdout cannot take the status (one line naming it); 2 for a refused
flag; 141, quietly, if the reader closed the pipe first (`| head -1`), as for a command SIGPIPE ends."""
KEYGEN_EXIT_STATUS = """\
Exit status: 0 with the keys' paths printed; 1 if DIR cannot be created or written, or is not
private to you, or stdout cannot take the paths (one line naming it); 2 for a refused flag; 141,
quietly, if the reader closed the pipe first (the keys are written)."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``serve`` (the default), ``status`` and ``keygen``, each with ``--help``."""
    top = argparse.ArgumentParser(
        prog="eplb-coordinator",
        formatter_class=HelpFormatter,
        usage="%(prog)s [serve] [FLAG ...]\n       %(prog)s status [FLAG ...]\n       %(prog)s keygen DIR",
        description="eplb-service coordinator: plans expert placement for a vLLM EP deployment off the serving path.",
        epilog=_TOP_EPILOG.format(endpoint=default_endpoint()),
    )
    commands = top.add_subparsers(dest="command", title="commands", metavar="COMMAND", prog="eplb-coordinator")
    _add_serve_arguments(
        commands.add_parser(
            "serve",
            formatter_class=HelpFormatter,
            help="run the coordinator daemon (the default command)",
            description="Run the coordinator: agents in every vLLM worker register with it over --endpoint.",
            epilog=SERVE_EXIT_STATUS,
        )
    )
    _add_status_arguments(
        commands.add_parser(
            "status",
            formatter_class=HelpFormatter,
            help="show a running coordinator's status",
            description="Ask a running coordinator for its status: ranks, liveness, epoch, plans, balancedness.",
            epilog=STATUS_EXIT_STATUS,
        )
    )
    _add_keygen_arguments(
        commands.add_parser(
            "keygen",
            formatter_class=HelpFormatter,
            help="create CURVE keys for a coordinator reachable over tcp://",
            description="Create the server and agent CURVE key pairs in DIR (created 0700 if missing; an existing\n"
            "DIR must already be private to you, mode 0700, and is never changed); secret keys are 0600:\n"
            "server.key, server.key_secret, agent.key_secret and clients/agent.key.\n"
            "The coordinator takes --curve-dir DIR; each agent host needs server.key and agent.key_secret.",
            epilog=KEYGEN_EXIT_STATUS,
        )
    )
    return top


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of :func:`build_parser`'s parser (``--config`` fills ``serve``'s defaults)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(f"{parser.prog} has no subcommands; expected one named {command!r}")


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from eplb_service.coordinator.policy import DEFAULT_POLICY, POLICIES

    p.add_argument(
        "--dp",
        type=arg_types.positive_int,
        default=1,
        metavar="N",
        help="vLLM data-parallel size; EP ranks = dp x tp must be the deployment's (agents of another size are "
        "refused, naming both sizes; eplb-sidecar sets it from the vLLM command)",
    )
    p.add_argument(
        "--tp", type=arg_types.positive_int, default=1, metavar="N", help="vLLM tensor-parallel size per DP rank"
    )
    p.add_argument(
        "--endpoint",
        default=None,  # resolved in config_from_args: --simulate tells a chosen endpoint from none
        metavar="URL",
        help=f"ZeroMQ endpoint to bind: ipc://PATH or tcp://HOST:PORT (default: {default_endpoint()}; "
        "with --simulate, a private temporary socket its first line names)",
    )
    p.add_argument(
        "--store-host",
        default=None,
        metavar="HOST",
        # Kept so that old command lines and config files still start; warned about in config_from_args.
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=None,
        metavar="PORT",
        help="serve /metrics, /livez, /readyz and /status on this HTTP port (0 = any free port; default: off)",
    )
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY, help="placement policy")
    p.add_argument(
        "--groups",
        type=arg_types.positive_int,
        default=1,
        metavar="N",
        help="expert groups of the model (DeepSeek's hierarchy: with --nodes, each group's experts stay on one node)",
    )
    p.add_argument(
        "--nodes",
        type=arg_types.positive_int,
        default=1,
        metavar="N",
        help="nodes of the deployment (a divisor of --groups for the hierarchy)",
    )
    p.add_argument(
        "--rebalance-interval-steps",
        type=arg_types.positive_int,
        default=None,
        metavar="STEPS",
        help="steps between rebalance attempts (default: 200; 100 with --simulate)",
    )
    p.add_argument(
        "--min-gain",
        type=arg_types.balancedness_gain,
        default=0.01,
        metavar="GAIN",
        help="minimum projected balancedness gain to start a plan (from 0 to below 1: balancedness is at most 1)",
    )
    p.add_argument(
        "--staging-budget-bytes",
        type=arg_types.positive_int,
        default=1 << 30,
        metavar="BYTES",
        help="staging memory per rank; larger plans go in layer batches",
    )
    p.add_argument(
        "--report-interval-steps",
        type=arg_types.positive_int,
        default=10,
        metavar="STEPS",
        help="steps per load report from each agent",
    )
    p.add_argument(
        "--fence-steps",
        type=arg_types.positive_int,
        default=8,
        metavar="F",
        help="F: commit step = max(vote entry step) + F",
    )
    p.add_argument(
        "--fence-timeout-s",
        type=arg_types.positive_float,
        default=5.0,
        metavar="S",
        help="longest a serving thread waits at the fence",
    )
    p.add_argument(
        "--throttle-bytes-per-s",
        type=arg_types.nonneg_float,
        default=0.0,
        metavar="RATE",
        help="per-rank streaming cap (0 = unthrottled)",
    )
    p.add_argument(
        "--log-level",
        type=arg_types.log_level,
        default=None,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, any case (default: $EPLB_SERVICE_LOG_LEVEL, else INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="json: one JSON object per line (default: a --config file's log-format, else "
        "$EPLB_SERVICE_LOG_FORMAT, else text)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML file of settings (keys = long flag names); flags override it",
    )
    p.add_argument(
        "--curve-dir",
        default=None,
        metavar="DIR",
        help="CURVE keys (eplb-coordinator keygen DIR); required for non-loopback tcp://",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback tcp:// endpoint without CURVE")
    p.add_argument("--record", default=None, metavar="FILE", help="record every load window to this .npz trace")
    p.add_argument(
        "--no-step-clock-check",
        dest="step_clock_check",
        action="store_false",
        default=True,
        help="do not compare the ranks' step clocks (only for ranks that do not serve in lockstep; default: compare)",
    )
    p.add_argument(
        "--initial-placement",
        default=None,
        metavar="FILE",
        help="placement JSON from eplb-plan: move the deployment there first",
    )
    sim = p.add_argument_group("simulated deployment (CPU)")
    sim.add_argument(
        "--simulate",
        action="store_true",
        help="run the coordinator with dp x tp simulated serving ranks and real agents",
    )
    sim.add_argument(
        "--steps",
        type=sim_steps,
        default=None,
        metavar="N",
        help=f"serving steps per rank, at most {SIM_MAX_STEPS} (default: {SIM_STEPS})",
    )
    sim.add_argument(
        "--seed", type=arg_types.nonneg_int, default=None, metavar="N", help="seed of the simulated load (default: 0)"
    )
    sim.add_argument("--summary-json", default=None, metavar="FILE", help="write the run's summary here")
    sim.add_argument(
        "--plot", default=None, metavar="FILE", help="write a PNG of balancedness over time here (needs matplotlib)"
    )
    sim.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="replay this recorded load trace (.npz from --record) instead of the built-in drift",
    )


def _add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        type=arg_types.connect_endpoint,
        default=default_endpoint(),
        metavar="URL",
        help="the coordinator's ZeroMQ endpoint: ipc://PATH or tcp://HOST:PORT",
    )
    p.add_argument("--json", action="store_true", help="print the raw status document instead of the table")
    p.add_argument(
        "--timeout-s", type=arg_types.positive_float, default=3.0, metavar="S", help="how long to wait for an answer"
    )


def _add_keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory",
        metavar="DIR",
        help="directory for the keys (created 0700 if missing, else must be private; keys in it are overwritten)",
    )


def parse_command_line(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``argv`` as ``main`` does: ``serve`` when no command is named, ``--config`` applied under the flags.

    Raises ``ValueError`` for a bad config file; argparse itself exits 2 on a bad flag.
    """
    parser = parser or build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config:
        serve = subcommand_parser(parser, "serve")
        serve.set_defaults(**load_config_file(args.config, serve))
        args = parser.parse_args(argv)
    return args


def check_simulation_flags(args: argparse.Namespace) -> None:
    """``ValueError`` when a ``--simulate``-only flag comes without it: the daemon would ignore
    it silently and wait for agents, which is never what the user asked for."""
    given = [f"--{name.replace('_', '-')}" for name in SIM_ONLY if getattr(args, name) is not None]
    if given and not args.simulate:
        raise ValueError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --simulate; "
            "without it the coordinator waits for real agents"
        )


def check_simulation_endpoint(args: argparse.Namespace) -> None:
    """``ValueError`` for an ``--endpoint`` or ``--curve-dir`` the simulated ranks could not reach.

    The ranks are processes of this host with no CURVE keys: under ``--curve-dir`` they were
    refused by the coordinator's authenticator and the run sat until its timeout, and ``*``
    (any address or port) names nothing they could connect to.
    """
    if not args.simulate:
        return
    if args.curve_dir is not None:
        raise ValueError(
            f"--curve-dir {args.curve_dir!r} with --simulate: the simulated ranks run on this host without CURVE "
            "keys and could not register; drop --curve-dir (a simulation binds a local endpoint)"
        )
    from eplb_service.security import is_local_endpoint  # imports zmq: not at the CLI's start

    endpoint = args.endpoint
    if endpoint is None or not endpoint.startswith("tcp://"):
        return
    if "*" in split_tcp_endpoint(endpoint) or not is_local_endpoint(endpoint):
        raise ValueError(
            f"--endpoint {endpoint!r} with --simulate: the simulated ranks connect from this host without CURVE "
            "keys; expected ipc://PATH or a loopback tcp://127.0.0.1:PORT (or no --endpoint: a private socket)"
        )


def check_output_path(flag: str, path: str) -> None:
    """``ValueError`` unless ``path`` can be written: checked at start, because these files are
    written at the end of a run (or a recording's first flush) and a typo would cost the run."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path!r}: directory {parent!r} is not writable")
    # os.access says yes to root everywhere, and knows nothing of read-only mounts or special
    # filesystems (/proc): open it as the run's end will, leaving what was there as it was.
    existed = os.path.lexists(path)
    if existed and not os.path.isfile(path):  # a device or a FIFO: opening it may block or consume
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | (0 if existed else os.O_CREAT | os.O_EXCL), 0o644)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}") from None
    os.close(fd)
    if not existed:
        os.unlink(path)


def _checked_initial_placement(path: str, world_size: int):
    """The ``--initial-placement`` file's ``phy2log``, checked against the ranks it was planned for."""
    from eplb_service.coordinator.plan_cli import UsageError, read_placement

    try:
        placement = read_placement(path, "--initial-placement")
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    initial, ranks = placement.phy2log, placement.num_ranks
    if ranks is not None and ranks != world_size:
        raise ValueError(
            f"--initial-placement {path}: planned for {ranks} ranks (its num_ranks), but this "
            f"deployment has {world_size} (--dp x --tp); plan it again with eplb-plan --ranks {world_size}"
        )
    if initial.shape[1] % world_size:
        raise ValueError(
            f"--initial-placement {path}: {initial.shape[1]} slots per layer cannot be spread over "
            f"{world_size} ranks (--dp x --tp)"
        )
    return initial


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The ``serve`` command's flags as a validated config; ``ValueError`` names a bad value."""
    if args.store_host is not None:
        logging.getLogger("eplb_service.coordinator").warning(
            "--store-host %s is ignored since protocol 2: rank 0's worker hosts the rendezvous store "
            "(set EPLB_SERVICE_STORE_HOST/EPLB_SERVICE_STORE_PORT in the vLLM workers instead)",
            args.store_host,
        )
    check_simulation_flags(args)
    if args.endpoint is not None:
        check_endpoint(args.endpoint)  # named before the simulation's own checks read it
    check_simulation_endpoint(args)
    for flag, path in (("--summary-json", args.summary_json), ("--plot", args.plot), ("--record", args.record)):
        if path is not None:
            check_output_path(flag, path)
    interval = args.rebalance_interval_steps or (SIM_DEFAULTS["rebalance_interval_steps"] if args.simulate else 200)
    extra = {k: v for k, v in SIM_DEFAULTS.items() if k != "rebalance_interval_steps"} if args.simulate else {}
    world_size = args.dp * args.tp
    if world_size > MAX_EP_RANKS:
        raise ValueError(
            f"--dp {args.dp} x --tp {args.tp} = {world_size} EP ranks; expected at most {MAX_EP_RANKS} "
            "(vLLM's data-parallel size x tensor-parallel size)"
        )
    initial = _checked_initial_placement(args.initial_placement, world_size) if args.initial_placement else None
    return CoordinatorConfig(
        initial_placement=initial,
        world_size=world_size,
        endpoint=default_endpoint() if args.endpoint is None else args.endpoint,  # '' is refused, not the default
        metrics_port=args.metrics_port,
        policy=args.policy,
        num_groups=args.groups,
        num_nodes=args.nodes,
        rebalance_interval_steps=interval,
        min_gain=args.min_gain,
        record_path=args.record,
        curve_dir=args.curve_dir,
        insecure=args.insecure,
        staging_budget_bytes=args.staging_budget_bytes,
        check_step_clock=args.step_clock_check,
        agent=AgentConfig(
            report_interval_steps=args.report_interval_steps,
            fence_steps=args.fence_steps,
            fence_timeout_s=args.fence_timeout_s,
            throttle_bytes_per_s=args.throttle_bytes_per_s,
        ),
        **extra,
    )


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop the daemon cleanly (the plan in flight aborted, agents told, its socket file removed).

SIGHUP is among them because a daemon started from a shell gets it when the terminal or ssh
session closes; its default action killed the daemon with none of that done. One its parent
ignored stays ignored (``nohup``: :mod:`eplb_service.stop_signals`)."""


def _stop_on(coordinator, sig: signal.Signals) -> None:
    coordinator.log.info("%s received: stopping", sig.name)
    coordinator.stop()


def _serve(cfg: CoordinatorConfig) -> int:
    from eplb_service.coordinator.open_files import DAEMON_SOFT_LIMIT
    from eplb_service.coordinator.server import BindError, Coordinator

    async def main() -> None:
        coordinator = Coordinator(cfg, open_files_wanted=DAEMON_SOFT_LIMIT)
        loop = asyncio.get_running_loop()
        taken = not_ignored(STOP_SIGNALS)  # nohup's SIGHUP stays ignored (eplb_service.stop_signals)
        for sig in taken:
            loop.add_signal_handler(sig, _stop_on, coordinator, sig)
        try:
            await coordinator.serve()
        finally:  # uvloop's close leaves them installed, bound to a closed loop (main() called in-process)
            for sig in taken:
                loop.remove_signal_handler(sig)

    import uvloop

    try:
        uvloop.run(main())
    except BindError as exc:
        _fail(str(exc))
        return 1
    return 0


def _simulate(args: argparse.Namespace, cfg: CoordinatorConfig) -> int:
    opts = _simulation_options(args, cfg)
    if isinstance(opts, int):  # refused, its line written
        return opts
    summary, code = _run_simulation(opts, cfg)
    if summary is None:
        return code
    from eplb_service.stdout import ReaderGone, StdoutError, write_stdout

    try:
        write_stdout(json.dumps(summary, indent=2) + "\n")
    except ReaderGone:  # `--simulate | head`: the reader stopped; the run's verdict is still the exit status
        pass
    except StdoutError as exc:
        _fail(f"the summary: {exc}")
        return 1
    if code:  # an output file that could not be written: said after the summary it would have held
        return code
    ok = (
        summary["output_mismatches"] == 0
        and summary["diverged"] == 0
        and not summary["errors"]
        and not summary.get("halted")
        and summary.get("maps_identical_on_all_ranks", True)  # ranks that ended on other maps: half-applied
        and summary.get("maps_match_coordinator") is not False  # what serves is not what was planned
    )
    return 0 if ok else 1


def _simulation_options(args: argparse.Namespace, cfg: CoordinatorConfig) -> SimulationOptions | int:
    """The simulation's options from the flags, or the exit code of a refusal (its line written)."""
    from eplb_service.sim.deployment import SimulationOptions
    from eplb_service.sim.workload import SimModelConfig, shape_for_ranks, shape_for_trace

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _refuse("--plot needs matplotlib: pip install 'eplb-service[plot]'")
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        kinds = FigureCanvasAgg.get_supported_filetypes()
        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if suffix and suffix not in kinds:  # checked before the run, not after it
            return _refuse(
                f"--plot {args.plot!r}: matplotlib cannot write .{suffix} files; "
                f"expected one of {', '.join('.' + k for k in sorted(kinds))}"
            )
    too_big = sim_memory_problem(cfg.world_size, available_memory_bytes())
    if too_big is not None:
        return _refuse(too_big)
    model = shape_for_ranks(SimModelConfig(), cfg.world_size)
    if args.trace:
        from eplb_service.trace import TraceError, load_trace

        try:
            load_trace(args.trace)
        except TraceError as exc:
            return _refuse(str(exc))
        try:
            model = shape_for_trace(SimModelConfig(trace_path=os.path.abspath(args.trace)), cfg.world_size)
        except ValueError as exc:
            return _refuse(f"--trace: {exc}")
    if args.endpoint is not None:  # the user's, claimed as the daemon claims it; else a private temporary one
        problem = _claim_endpoint(cfg.endpoint)
        if problem is not None:
            return problem
    return SimulationOptions(
        coordinator_endpoint=args.endpoint,
        world_size=cfg.world_size,
        steps=args.steps or SIM_STEPS,
        seed=args.seed or 0,
        model=model,
        summary_json=args.summary_json,
        plot=args.plot,
    )


def _run_simulation(opts: SimulationOptions, cfg: CoordinatorConfig) -> tuple[dict | None, int]:
    """``(summary, 0)``; ``(summary, 1)`` where an output file could not be written (said); or
    ``(None, exit code)`` where the run ended without a summary (said, or logged as it stopped)."""
    from eplb_service.coordinator.server import BindError
    from eplb_service.sim.deployment import IncompleteResults, OutputFileError, SimulationStopped, run_simulation
    from eplb_service.sim.processes import RankProcessesDied

    try:
        return run_simulation(opts, cfg), 0
    except RankProcessesDied as exc:  # each rank logged its own error: a traceback here would only bury them
        _fail(f"the simulation stopped: {exc} (each rank's error is logged above)")
    except IncompleteResults as exc:
        _fail(f"the simulation ended without a summary: {exc}")
    except BindError as exc:  # a taken --metrics-port or tcp:// endpoint: before, the run waited forever
        _fail(str(exc))
    except SimulationStopped as exc:  # its line is logged; every rank process is gone
        return None, 128 + exc.signum
    except OutputFileError as exc:
        _fail(f"{exc} (the summary is on stdout)")
        return exc.summary, 1
    return None, 1


def _run_serve(args: argparse.Namespace) -> int:
    try:
        logutil.configure(args.log_level, args.log_format, tag="coordinator")
        cfg = config_from_args(args)
    except ValueError as exc:  # logging may not be configured: the format the flag or variable asked for
        return _refuse(str(exc), args.log_format or logutil.requested_format([]))
    if cfg.num_nodes > 1 and cfg.num_groups % cfg.num_nodes:
        logutil.rank_logger(__name__, "coordinator").warning(
            "--groups %d is not a multiple of --nodes %d: there is no node hierarchy to keep, so the %s policy "
            "places experts on any node (DeepSeek's global policy does the same); pass --groups as a multiple of "
            "--nodes to keep each group's experts on one node",
            cfg.num_groups,
            cfg.num_nodes,
            cfg.policy,
        )
    if args.simulate:
        return _simulate(args, cfg)
    problem = _claim_endpoint(cfg.endpoint)
    return problem if problem is not None else _serve(cfg)


def _claim_endpoint(endpoint: str) -> int | None:
    """Make ``endpoint`` this coordinator's to bind (its private directory made, a stale socket
    removed); the exit code 1, the reason logged, when another process holds it or its directory is unsafe."""
    from eplb_service.coordinator.socket_dir import (
        EndpointUnavailable,
        UnsafeSocketDirectory,
        claim_ipc_endpoint,
        prepare_ipc_dir,
    )

    try:
        prepare_ipc_dir(endpoint)  # before anything talks to a socket there
        removed = claim_ipc_endpoint(endpoint)
    except (EndpointUnavailable, UnsafeSocketDirectory) as exc:
        _fail(str(exc))
        return 1
    if removed:
        logutil.rank_logger(__name__, "coordinator").info("%s", removed)
    return None


def _run_status(args: argparse.Namespace) -> int:
    import zmq

    from eplb_service.coordinator.socket_dir import UnsafeSocketDirectory
    from eplb_service.coordinator.status_client import fetch_status, format_status
    from eplb_service.coordinator.status_doc import status_json
    from eplb_service.protocol import ProtocolError
    from eplb_service.security import SecurityError

    if (refused := _bad_env_format("status")) is not None:
        return refused
    try:
        status = fetch_status(args.endpoint, args.timeout_s)
    except (TimeoutError, ProtocolError, zmq.ZMQError, SecurityError, UnsafeSocketDirectory, ValueError) as exc:
        _fail(str(exc), logutil.requested_format([]), "status")
        return 1
    return _write_result((status_json(status, indent=2) if args.json else format_status(status)) + "\n", "status")


def _run_keygen(args: argparse.Namespace) -> int:
    from eplb_service.security import SecurityError, generate_keys

    if (refused := _bad_env_format("keygen")) is not None:
        return refused
    try:
        paths = generate_keys(args.directory)
    except SecurityError as exc:  # a bad, unsafe or unwritable DIR: named in the message
        _fail(str(exc), logutil.requested_format([]), "keygen")
        return 1
    return _write_result("".join(f"{role}: {path}\n" for role, path in paths.items()), "keygen")


def _bad_env_format(command: str) -> int | None:
    """2, after one line naming it, when ``$EPLB_SERVICE_LOG_FORMAT`` is neither format (``serve``
    and ``eplb-plan`` refuse it as well: a host-wide ``yaml`` was silently taken as text here only)."""
    try:
        logutil.resolved_format(None)
    except ValueError as exc:
        return _refuse(str(exc), "text", command)
    return None


def _write_result(text: str, command: str) -> int:
    """``command``'s result on stdout: 0 once written; quiet and 141 when the reader closed the pipe
    (``status | head -1``); one line and 1 when stdout cannot take it (a full disk)."""
    from eplb_service.stdout import SIGPIPE_EXIT, ReaderGone, StdoutError, write_stdout

    try:
        write_stdout(text)
    except ReaderGone:
        return SIGPIPE_EXIT
    except StdoutError as exc:
        _fail(str(exc), logutil.requested_format([]), command)
        return 1
    return 0


_RUNNERS = {"serve": _run_serve, "status": _run_status, "keygen": _run_keygen}
"""Each subcommand of :func:`build_parser` and what runs it; ``serve`` when none is named."""


_TAGS = {"serve": "coordinator", "status": "status", "keygen": "keygen"}
"""The ``tag`` of each command's error lines: ``status`` and ``keygen`` are not the coordinator talking."""


def _see_help(command: str | None) -> str:
    """What every refusal (exit 2) ends with: the help to read, of ``command`` (``None``: the
    top level's). A value refused after parsing (``--dp`` x ``--tp`` too large, a
    ``--simulate``-only flag, a ``--config`` file's setting) once named the value but not where
    the flags are described, as argparse's own refusals did."""
    return f"(see `eplb-coordinator {command} --help`)" if command else "(see `eplb-coordinator --help`)"


def _refuse(message: str, fmt: str | None = None, command: str = "serve") -> int:
    """``command`` refuses a value: one line (see :func:`_fail` for ``fmt``) ending in the help to
    read, and exit code 2."""
    _fail(f"{message} {_see_help(command)}", fmt, command)
    return 2


def _fail(message: str, fmt: str | None = None, command: str = "serve") -> None:
    """A fatal error of ``command``, in the log format in force (``fmt``: the one asked for, before
    logging is set up). ``serve``'s lines say ``eplb-coordinator``, as the command is usually typed
    without its name; the others name themselves (``eplb-coordinator status: error: ...``)."""
    prog = "eplb-coordinator" if command == "serve" else f"eplb-coordinator {command}"
    logutil.fatal(prog, message, fmt or logutil.active_format(), _TAGS.get(command, "coordinator"))


def command_of(argv: list[str]) -> str | None:
    """The command ``argv`` runs, as :func:`parse_command_line` reads it; ``None`` for an unknown one."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return "serve"
    return argv[0] if argv[0] in _RUNNERS else None


def _one_line_errors(parser: argparse.ArgumentParser, argv: list[str], fmt: str) -> None:
    """A flag argparse refuses is one line naming it and the help to read, in the format asked for
    (a JSON line under json), exit 2, as every other refusal: argparse's own way printed the whole
    usage first (14 lines for ``serve``), burying the one line that says what is wrong."""
    command = command_of(argv)

    def refuser(name: str | None) -> Callable[[str], NoReturn]:
        def refuse(message: str) -> NoReturn:
            _fail(f"{message} {_see_help(name)}", fmt, name or "serve")
            sys.exit(2)

        return refuse

    parser.error = refuser(command)  # type: ignore[method-assign]
    for name in _RUNNERS:
        subcommand_parser(parser, name).error = refuser(name)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before parsing, so that a refused flag or config file comes out as the deployment's lines do:
    # --log-format, else the --config file's log-format, else $EPLB_SERVICE_LOG_FORMAT.
    fmt = logutil.requested_format(argv, peek_log_format(config_path(argv)) if command_of(argv) == "serve" else None)
    parser = build_parser()
    _one_line_errors(parser, argv, fmt)
    try:
        args = parse_command_line(argv, parser)
    except ValueError as exc:  # a bad --config file
        return _refuse(str(exc), fmt)
    return _RUNNERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
