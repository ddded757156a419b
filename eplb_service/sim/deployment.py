"""The simulated deployment: the real coordinator plus N real agent processes on CPU.

``eplb-coordinator --dp 8 --simulate`` runs this: the coordinator on this process's
event loop, one spawned process per EP rank running :mod:`.serving_loop` with its
agent, live progress while it runs, and a summary (JSON, optional PNG) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from eplb_service import logutil
from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator
from eplb_service.placement import model_balancedness
from eplb_service.sim.processes import RankProcesses, drain, free_port
from eplb_service.sim.serving_loop import RankSpec, run_rank
from eplb_service.sim.workload import SimModelConfig
from eplb_service.stop_signals import not_ignored
from eplb_service.units import human_bytes

RANK_PRELOAD = ("torch", "torch.distributed", "eplb_service.sim.serving_loop")
"""What the rank processes' fork server imports once for all of them (``RankProcesses``' ``preload``)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationOptions:
    world_size: int = 8
    steps: int = 1500
    seed: int = 0
    model: SimModelConfig = SimModelConfig()
    summary_json: str | None = None
    plot: str | None = None
    progress_interval_s: float = 2.0
    timeout_s: float = 900.0
    coordinator_endpoint: str | None = None
    """Bind the coordinator here (default: a private temporary ipc:// socket)."""
    agent_endpoint: str | None = None
    """Where the agents connect, if not straight to the coordinator (tests put a lossy proxy there)."""


def measured_balancedness(recv_counts: np.ndarray, begin: int, end: int) -> float:
    """Balancedness of the tokens ranks really processed in steps ``[begin, end)``.

    ``recv_counts``: ``[ranks, steps, L]``; per layer, load per rank summed over the
    steps, then sum of means / sum of maxes as in :func:`model_balancedness`.
    """
    window = recv_counts[:, begin:end, :].sum(axis=1)  # [ranks, L]
    return model_balancedness(window.T)


def simulation_config(opts: SimulationOptions, base: CoordinatorConfig | None, endpoint: str) -> CoordinatorConfig:
    """Coordinator settings scaled to a short CPU run unless the caller chose others."""
    if base is None:
        return CoordinatorConfig(
            world_size=opts.world_size,
            endpoint=endpoint,
            rebalance_interval_steps=100,
            min_window_steps=40,
            load_half_life_steps=100,
            min_gain=0.01,
        )
    return base.replace(world_size=opts.world_size, endpoint=endpoint)


async def _run(opts: SimulationOptions, cfg: CoordinatorConfig) -> dict:
    coordinator = Coordinator(cfg)
    # Ranks stop after a fixed number of steps: start no plan that could not finish before.
    coordinator.drain_at_step = opts.steps - cfg.agent.fence_steps - 4 * cfg.agent.report_interval_steps - 20
    server = asyncio.create_task(coordinator.serve())
    ready = asyncio.create_task(coordinator.ready.wait())
    await asyncio.wait({server, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():  # serve() ended before it was ready: a taken port or endpoint (BindError)
        ready.cancel()
        await server
        raise RuntimeError("the coordinator stopped before it was ready")
    ranks = RankProcesses(opts.world_size, "sim-rank", preload=RANK_PRELOAD)
    progress = ranks.ctx.Queue()
    serving_port = free_port()
    import datetime

    from torch.distributed import TCPStore  # the serving group's store, distinct from the agents'

    serving_store = TCPStore(
        "127.0.0.1", serving_port, opts.world_size, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
    )
    deployment = f"sim-{secrets.token_hex(8)}"  # a known id: no other deployment's ranks can join it
    specs = [
        RankSpec(
            rank=r,
            world_size=opts.world_size,
            steps=opts.steps,
            seed=opts.seed,
            model=opts.model,
            coordinator_endpoint=opts.agent_endpoint or cfg.endpoint,
            serving_store_port=serving_port,
            log_format=logutil.active_format(),
            deployment=deployment,
        )
        for r in range(opts.world_size)
    ]
    watch = ProgressLog(opts, coordinator, progress)
    stopped_by: list[int] = []
    try:
        # Handled before the first rank starts: a signal while they start (a few tens of ms, longer
        # on a loaded machine) was lost, or killed this process by the default action mid-spawn.
        _stop_on_signals(coordinator, stopped_by)
        # Started with SIGINT blocked, which a child keeps from its first instruction: a terminal's
        # Ctrl-C reaches the whole process group, and a rank still importing printed a traceback.
        with _sigint_blocked():
            ranks.start(run_rank, lambda r: (specs[r], ranks.results, progress))
        await ranks.wait(0.1, lambda: bool(stopped_by) or watch.poll(), timeout_s=opts.timeout_s)
    finally:
        # the coordinator keeps serving on this loop meanwhile; a stopped run does not wait for ranks
        await ranks.stop_async(join_timeout_s=1 if stopped_by else 10)
        wall = time.monotonic() - ranks.started_at
        coordinator.stop()
        await server
        del serving_store
        _stop_handling_signals()
    if stopped_by:
        raise SimulationStopped(stopped_by[0])
    _say_if_nothing_was_tried(coordinator, opts, cfg, wall)
    return _summary(opts, coordinator, sorted(ranks.collected, key=lambda r: r["rank"]), wall)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked on this thread within; one that arrives meanwhile is delivered on the way out.

    Blocked, not ignored: a process started within inherits the mask (across exec, as it would
    an ignored disposition), so a rank still importing takes no Ctrl-C (it ignores SIGINT once
    it runs), while this process loses none. With SIGINT ignored here, a Ctrl-C during the ranks'
    start was dropped and the run went on to its end."""
    if not hasattr(signal, "pthread_sigmask"):  # not on Windows: nothing to block with
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_on_signals(coordinator: Coordinator, stopped_by: list[int]) -> None:
    """From now on :data:`STOP_SIGNALS` stop the run: ``stopped_by`` gets each one's number.

    Before, Ctrl-C printed a traceback from every rank and the coordinator, and a SIGTERM to the
    coordinator alone (``timeout``, ``kill``, a supervisor) killed it by the default action and
    left every rank process running, blocked, for good. Only on the main thread (where Python
    can take signals); elsewhere the caller stops the run as it likes."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        if not stopped_by:
            coordinator.log.warning("%s received: stopping the simulation and its ranks (no summary)", sig.name)
        stopped_by.append(int(sig))

    for sig in not_ignored(STOP_SIGNALS):  # one the parent ignored stays ignored (nohup's SIGHUP)
        loop.add_signal_handler(sig, stop, sig)


def _stop_handling_signals() -> None:
    """:func:`_stop_on_signals` undone (the loop puts back Python's own handling), so that a
    caller that runs simulations in a process of its own (tests) keeps its Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)


def _say_if_nothing_was_tried(
    coordinator: Coordinator, opts: SimulationOptions, cfg: CoordinatorConfig, wall_s
) -> None:
    """A run too short for any plan would otherwise end with "committed 0" and no word why."""
    counts = coordinator.counts
    if counts["proposed"] or counts["skipped"] or coordinator.halted_reason:
        return
    log.warning(
        "no plan was tried in %d steps (%.1fs): the coordinator plans once the side communicator is built and "
        "%d steps of load arrived (min_window_steps), then every %d steps (rebalance_interval_steps), and starts "
        "none after step %d so that each can finish before the ranks stop; run more --steps",
        opts.steps,
        wall_s,
        cfg.min_window_steps,
        cfg.rebalance_interval_steps,
        max(0, coordinator.drain_at_step or 0),
    )


class ProgressLog:
    """What the simulation says while it runs: registration, then a line every
    ``progress_interval_s`` (step, balancedness, plans, bytes moved, epoch, mismatches)."""

    def __init__(self, opts: SimulationOptions, coordinator: Coordinator, progress) -> None:
        self.opts, self.coordinator, self.progress = opts, coordinator, progress
        self.registering = RegistrationProgress(opts.world_size)
        self.step = self.mismatches = 0
        self.last_line = 0.0

    def poll(self) -> bool:
        """One poll of :meth:`RankProcesses.wait`; never asks to stop early."""
        for update in drain(self.progress):  # only the newest counts
            _, self.step, self.mismatches = update
        now = time.monotonic()
        state = self.coordinator.progress()
        if state.epoch < 0:
            self.registering.update(state.agents_alive)
            return False
        self.registering.done()
        if now - self.last_line >= self.opts.progress_interval_s:
            self.last_line = now
            bal = self.coordinator.current_balancedness()
            log.info(
                "step %d/%d | balancedness %s | plans committed %d aborted %d | moved %s | epoch %d | mismatches %d",
                self.step,
                self.opts.steps,
                f"{bal[0]:.3f}" if bal else "n/a",
                state.committed,
                state.aborted,
                human_bytes(state.bytes_moved),
                state.epoch,
                self.mismatches,
            )
        return False


class RegistrationProgress:
    """Start-up, said once: what the run waits for, then a bar on a terminal or a line per new agent."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.shown = -1
        self.finished = False
        self.tty = sys.stderr.isatty()
        log.info(
            "starting %d rank processes: each imports torch, builds its model and registers its agent with the "
            "coordinator (10-40 s on a small CPU machine); serving starts once all %d are registered",
            world_size,
            world_size,
        )

    def update(self, registered: int) -> None:
        if registered == self.shown:
            return
        self.shown = registered
        if self.tty:
            bar = "#" * registered + "." * (self.world_size - registered)
            sys.stderr.write(f"\ragents registered [{bar}] {registered}/{self.world_size}")
            sys.stderr.flush()
        elif registered:
            log.info("%d/%d agents registered", registered, self.world_size)

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            if self.tty:
                sys.stderr.write("\n")
            log.info("all %d agents registered; serving", self.world_size)


def _coordinators_placement(coordinator: Coordinator) -> np.ndarray | None:
    """The placement of the coordinator's epoch (the last one every rank agreed on, or a plan
    committed since); ``None`` before the ranks first agreed (no placement to hold their maps against)."""
    epoch = coordinator.epoch
    return None if epoch < 0 else coordinator.book.placements.get(epoch)


class IncompleteResults(RuntimeError):
    """The ranks' results do not cover every rank once: no summary is made of them."""


class SimulationStopped(RuntimeError):
    """SIGINT, SIGTERM or SIGHUP stopped the run before its end (logged; every rank process gone)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class OutputFileError(RuntimeError):
    """``--summary-json`` or ``--plot`` could not be written at the end; ``summary`` is the run's."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a simulation: the ranks are stopped (none is left running), no summary."""


def _summary(opts: SimulationOptions, coordinator: Coordinator, ranks: list[dict], wall_s: float) -> dict:
    """The run's summary from one result per rank (``ranks``, in rank order) and the coordinator.

    Raises :class:`IncompleteResults` unless ``ranks`` holds exactly ranks 0 to world_size - 1:
    a summary of some ranks would count their mismatches and errors only, and call the maps of
    the ranks it has "identical on all ranks"."""
    reported = [r["rank"] for r in ranks]
    if reported != list(range(opts.world_size)):
        raise IncompleteResults(
            f"results from ranks {reported}, expected one from each of ranks 0 to {opts.world_size - 1}"
        )
    recv = np.array([r["recv_counts"] for r in ranks])
    # [src, steps, L, dst] -> what each rank would have received under the initial maps
    reference = np.array([r["ref_sent"] for r in ranks]).sum(axis=0).transpose(2, 0, 1)
    tenth = max(1, opts.steps // 10)
    commits = [o for o in coordinator.outcomes if o.phase == "committed"]
    placements = {json.dumps(r["phy2log"]) for r in ranks}
    agreed = _coordinators_placement(coordinator)
    return {
        "ranks": opts.world_size,
        "steps": opts.steps,
        "seed": opts.seed,
        "wall_s": round(wall_s, 2),
        "committed": coordinator.counts["committed"],
        "aborted": coordinator.counts["aborted"],
        "abort_codes": [o.code for o in coordinator.outcomes if o.phase == "aborted"],
        "diverged": coordinator.counts["diverged"],
        "skipped_no_gain": coordinator.counts["skipped"],
        "output_mismatches": int(sum(r["mismatches"] for r in ranks)),
        "balancedness_initial": round(measured_balancedness(recv, 0, tenth), 4),
        "balancedness_final": round(measured_balancedness(recv, opts.steps - tenth, opts.steps), 4),
        "balancedness_final_without_rebalancing": round(
            measured_balancedness(reference, opts.steps - tenth, opts.steps), 4
        ),
        "bytes_moved": coordinator.bytes_moved_total,
        "experts_moved": coordinator.experts_moved_total,
        "final_epoch": coordinator.epoch,
        "maps_identical_on_all_ranks": len(placements) == 1,
        "maps_match_coordinator": None
        if agreed is None
        else all(r["epoch"] == coordinator.epoch and np.array_equal(r["phy2log"], agreed) for r in ranks),
        "commit_steps": [o.commit_step for o in commits],
        "commit_stall_max_us": round(max(r["commit_stall_max_us"] for r in ranks), 1),
        "step_time_p50_ms": round(float(np.median([r["step_time_p50_ms"] for r in ranks])), 3),
        "step_time_p99_ms": round(float(max(r["step_time_p99_ms"] for r in ranks)), 3),
        "errors": [r["error"] for r in ranks if r["error"]],
        "halted": coordinator.halted_reason,
        "model": asdict(opts.model),
        "_recv_counts": recv,
        "_reference_counts": reference,
    }


def plot_balancedness(
    summary: dict, recv: np.ndarray, path: str, block: int = 20, reference: np.ndarray | None = None
) -> None:
    """Balancedness per block of steps, commits marked; ``reference``: the same tokens under the
    initial maps (no rebalancing), so the plot shows what rebalancing bought."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = recv.shape[1]
    xs = [begin + block / 2 for begin in range(0, steps - block + 1, block)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if reference is not None:
        ax.plot(
            xs,
            [measured_balancedness(reference, int(x - block / 2), int(x + block / 2)) for x in xs],
            color="tab:gray",
            lw=1,
            label="same load, no rebalancing",
        )
    ax.plot(
        xs,
        [measured_balancedness(recv, int(x - block / 2), int(x + block / 2)) for x in xs],
        label=f"with eplb-service ({block}-step blocks)",
    )
    for i, step in enumerate(summary["commit_steps"]):
        ax.axvline(step, color="tab:green", alpha=0.4, lw=1, label="commit" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("mean / max rank load")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"eplb-service simulation: {summary['ranks']} ranks, seed {summary['seed']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_simulation(opts: SimulationOptions, base: CoordinatorConfig | None = None) -> dict:
    """Run the whole simulated deployment; returns the summary (also written if asked)."""
    with tempfile.TemporaryDirectory(prefix="eplb-sim-") as tmp:
        endpoint = opts.coordinator_endpoint or f"ipc://{tmp}/coordinator.sock"
        cfg = simulation_config(opts, base, endpoint)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a dependency
            runner = asyncio.run
        summary = runner(_run(opts, cfg))
    recv = summary.pop("_recv_counts")
    reference = summary.pop("_reference_counts")
    try:
        if opts.summary_json:
            with open(opts.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    except OSError as exc:  # checked writable at start; a full disk or a file removed since is not
        raise OutputFileError(f"--summary-json {opts.summary_json}: {exc.strerror or exc}", summary) from None
    try:
        if opts.plot:
            plot_balancedness(summary, recv, opts.plot, reference=reference)
    except OSError as exc:
        raise OutputFileError(f"--plot {opts.plot}: {exc.strerror or exc}", summary) from None
    return summary
