"""Does one coordinator keep up with a deployment at scale? A load-ingest benchmark.

A real :class:`Coordinator` runs in a process of its own (uvloop, as ``eplb-coordinator``
runs it); a few sender processes each drive many DEALER sockets, one per fake rank, with the
traffic a real agent sends: ``Hello`` (a valid placement), a ``Heartbeat`` about every second
with step-clock probes as a 1024-step ring yields, and a ``LoadReport`` (``[layers, slots]``
int64) every ``report_interval_steps`` (10) steps. The ranks step on one shared clock, so their
step clocks agree, and they play the plan protocol (``Staged``, ``Voted`` through a shared
decision file, ``Committed`` at the commit step), so plans are proposed and committed while
loaded.

Measured over the run, after a warm-up: load reports offered (attempted by the senders) and
accepted (``eplb_load_reports_total``), reports the senders could not queue (ZeroMQ high-water
mark), the coordinator's tick lateness (the 20 ms tick's period past 20 ms), its CPU (all its
threads), RSS, the status round trip (``StatusRequest`` on a REQ socket, every 0.5 s) and the
plans proposed / committed / skipped.

    PYTHONPATH=. python bench/coordinator_ingest.py                      # 8, 64, 256 ranks, both shapes
    PYTHONPATH=. python bench/coordinator_ingest.py --ranks 256 --shapes qwen --rate 3 --seconds 20
    PYTHONPATH=. python bench/coordinator_ingest.py --ranks 256 --profile /tmp/coord.prof

Soak (bounded life): ``--soak`` keeps one deployment running for ``--seconds``, restarts a
random rank every ``--restart-every`` seconds (Goodbye, then a new process's Hello; or a
socket reopened with its session), fails a share of plans in staging, and prints RSS and
tick cost per interval.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import heapq
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from eplb_service import protocol

SHAPES = {
    # name: (layers, logical experts, redundant at least)
    "qwen": ("Qwen3.5-397B", 60, 512, 32),
    "deepseek": ("DeepSeek-V3", 58, 256, 32),
}
PROBE_EVERY, PROBE_RADIUS, RING = 32, 3, 1024  # as the agent's serving hooks
SENDER_HWM = 32
"""Frames a fake rank's socket queues before a send is dropped (the agent's default is 1000;
lower here so a coordinator that falls behind shows as drops, not as gigabytes queued)."""


def num_physical(num_logical: int, redundant: int, ranks: int) -> int:
    """Slots: the logical experts plus at least ``redundant``, rounded up to a multiple of ``ranks``."""
    total = num_logical + redundant
    return -(-total // ranks) * ranks


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the coordinator process ------------------------------------------------------------------


def coordinator_main(world: int, endpoint: str, soak: bool) -> None:
    """The coordinator process: commands on stdin (``reset``, ``profile``, ``snap``, ``stop``),
    one JSON answer per line on stdout. Imports ``eplb_service`` from its own PYTHONPATH, so a
    run can compare two source trees (``--baseline``)."""
    import json

    import uvloop

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.server import Coordinator
    from eplb_service.protocol import AgentConfig

    ticks: list[tuple[float, float]] = []  # (period wall s, duration thread-CPU s) of each tick
    handled: dict[str, list[float]] = {}  # message type -> [count, thread-CPU seconds]
    prof = cProfile.Profile()

    class Measured(Coordinator):
        _tick_started = 0.0

        async def _tick(self) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            period = t0 - self._tick_started if self._tick_started else 0.02
            self._tick_started = t0
            await super()._tick()
            ticks.append((period, time.thread_time() - c0))

        def _handle(self, identity, message) -> None:
            c0 = time.thread_time()
            super()._handle(identity, message)
            slot = handled.setdefault(type(message).__name__, [0, 0.0])
            slot[0] += 1
            slot[1] += time.thread_time() - c0

    cfg = CoordinatorConfig(
        world_size=world,
        endpoint=endpoint,
        rebalance_interval_steps=200,
        min_window_steps=50,
        step_clock_grace_s=10.0,
        staging_timeout_s=10.0,
        voting_timeout_s=10.0,
        agent=AgentConfig(),
    )
    state: dict = {}
    out = sys.stdout
    sys.stdout = sys.stderr

    def in_loop(fn):
        done = threading.Event()
        result = []

        def call():
            result.append(fn())
            done.set()

        state["loop"].call_soon_threadsafe(call)
        done.wait(30)
        return result[0] if result else None

    def control() -> None:
        base = (time.perf_counter(), cpu_s(), in_loop(time.thread_time))
        for line in sys.stdin:
            cmd = line.strip()
            coord = state["coordinator"]
            if cmd == "reset":
                ticks.clear()
                handled.clear()
                base = (time.perf_counter(), cpu_s(), in_loop(time.thread_time))
                answer: object = "ok"
            elif cmd == "profile":
                in_loop(prof.enable)
                answer = "ok"
            elif cmd == "snap":
                wall, cpu = time.perf_counter() - base[0], cpu_s() - base[1]
                loop_cpu = in_loop(time.thread_time) - base[2]
                answer = {
                    "wall_s": wall,
                    "cpu_pct": 100 * cpu / wall,
                    "loop_cpu_pct": 100 * loop_cpu / wall,
                    "rss_mib": rss_mib(),
                    "ticks": list(ticks),
                    "handled": {k: list(v) for k, v in handled.items()},
                    "counts": dict(coord.plans.counts),
                    "sizes": in_loop(functools.partial(sizes, coord)),
                }
            elif cmd.startswith("stop"):
                path = cmd[5:].strip()
                if path:
                    in_loop(prof.disable)
                    prof.dump_stats(path)
                state["loop"].call_soon_threadsafe(coord.stop)
                out.write(json.dumps("ok") + "\n")
                out.flush()
                return
            else:
                answer = f"unknown command {cmd!r}"
            out.write(json.dumps(answer) + "\n")
            out.flush()

    async def main() -> None:
        coord = Measured(cfg)
        state["coordinator"], state["loop"] = coord, asyncio.get_running_loop()
        loop_ready = asyncio.get_running_loop().create_task(coord.serve())
        await coord.ready.wait()
        threading.Thread(target=control, daemon=True).start()
        await loop_ready

    uvloop.run(main())


class CoordinatorProcess:
    """The coordinator child, driven over its stdin and stdout."""

    def __init__(self, world: int, endpoint: str, tree: str, soak: bool) -> None:
        import subprocess

        # the tree first (its eplb_service wins), then what the caller's path already had (pyzmq,
        # msgspec installed with --target on a machine without them)
        inherited = os.environ.get("PYTHONPATH", "")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, inherited) if p))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", str(world), endpoint] + (["--soak"] if soak else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def ask(self, cmd: str):
        import json

        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())
        except (BrokenPipeError, json.JSONDecodeError):
            raise RuntimeError(
                f"the coordinator process exited ({self.proc.wait()}) before answering {cmd!r}; its error is above"
            ) from None

    def stop(self, profile: str = "") -> None:
        self.ask(f"stop {profile}")
        self.proc.wait(15)


def sizes(coord) -> dict[str, int]:
    """Lengths of the containers that could grow over a long life."""
    rec = coord.recorder
    return {
        "outcomes": len(coord.plans.outcomes),
        "plan_numbers": len(coord.plans._numbers),
        "processes": len(coord.router.registrar.processes),
        "placements": len(coord.book.placements),
        "segments": len(coord.book.window.segments) if coord.book.window else 0,
        "clock_ranks": len(coord.guard.step_clock.clocks),
        "commit_steps": len(coord.guard.epoch_watch.commit_steps),
        "registry": len(coord.registry.agents),
        "identities": len(coord.registry._by_identity),
        "tasks": len(coord._tasks),
        "recorder_open": len(rec._open) if rec else 0,
        "recorder_closed": len(rec._closed) if rec else 0,
        "status_bytes": len(protocol.encode(coord.router.status_reply())),
    }


# -- fake agents ------------------------------------------------------------------------------


@dataclass
class FakeRank:
    rank: int
    sock: zmq.Socket
    pid: int
    session: int = 0
    welcomed: bool = False
    epoch: int = 0
    comm_generation: int = -1
    plan: tuple[int, int] | None = None  # (plan_id, commit step) once voted
    last_report_step: int = 0
    restarts: int = 0


class Sender:
    """One process driving many fake ranks on one shared step clock."""

    def __init__(self, args: dict, ranks: list[int], counters, decision_dir: str, t0: float) -> None:
        self.a = args
        self.ctx = zmq.Context()
        self.t0 = t0  # wall time at which step 0 ended
        self.step_s = args["step_s"]
        self.decision_dir = decision_dir
        self.counters = counters  # shared: offered, sent, dropped
        layers, logical, physical = args["layers"], args["logical"], args["physical"]
        world = args["world"]
        self.model = protocol.ModelShape(
            num_layers=layers, num_logical=logical, num_physical=physical, num_ranks=world, bytes_per_expert=1 << 20
        )
        phy2log = np.tile(np.arange(physical) % logical, (layers, 1)).astype(np.int64)
        self.phy2log = protocol.NDArray.from_numpy(phy2log)
        rng = self.rng = np.random.default_rng(ranks[0])
        # skewed, as routed tokens are: a few hot slots per layer
        pop = rng.lognormal(0, 1.0, size=(layers, physical))
        counts = rng.poisson(pop / pop.sum(axis=1, keepdims=True) * 8192 * 10).astype(np.int64)
        self.slot_load = protocol.NDArray.from_numpy(counts)
        self.ranks = {r: self._open(r, os.getpid() * 1000 + r) for r in ranks}
        self.poller = zmq.Poller()
        for fr in self.ranks.values():
            self.poller.register(fr.sock, zmq.POLLIN)
        self.by_sock = {fr.sock: fr for fr in self.ranks.values()}
        self.retries: list[tuple[float, int]] = []

    def _open(self, rank: int, pid: int) -> FakeRank:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"rank-{rank}-{os.urandom(6).hex()}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SENDER_HWM)
        sock.connect(self.a["endpoint"])
        return FakeRank(rank, sock, pid)

    def step(self) -> int:
        return max(0, int((time.time() - self.t0) / self.step_s))

    def send(self, fr: FakeRank, message, count: str | None = None) -> None:
        if count == "report":
            self.counters[0] += 1
        try:
            fr.sock.send(protocol.encode(message), zmq.NOBLOCK)
            if count == "report":
                self.counters[1] += 1
        except zmq.Again:
            if count == "report":
                self.counters[2] += 1

    def hello(self, fr: FakeRank, resume: int = 0) -> None:
        fr.welcomed = False
        self.send(
            fr,
            protocol.Hello(
                protocol_version=protocol.PROTOCOL_VERSION,
                rank=fr.rank,
                model=self.model,
                phy2log=self.phy2log,
                epoch=fr.epoch,
                step=self.step(),
                transport="nccl",
                node=f"bench-{os.getpid()}",
                pid=fr.pid,
                store_host="127.0.0.1" if fr.rank == 0 else "",
                store_port=29500 if fr.rank == 0 else 0,
                resume_session=resume,
            ),
        )

    def heartbeat(self, fr: FakeRank, step: int) -> None:
        wall_minus_mono = time.time() - time.monotonic()
        newest = step - 2
        first = -(-max(PROBE_RADIUS, step - RING + PROBE_EVERY) // PROBE_EVERY) * PROBE_EVERY
        steps = [k for k in range(first, newest - PROBE_RADIUS + 1, PROBE_EVERY) if k >= PROBE_RADIUS]
        ends = np.add.outer(np.asarray(steps, dtype=np.float64), np.arange(-PROBE_RADIUS, PROBE_RADIUS + 1))
        ends = self.t0 + ends * self.step_s - wall_minus_mono + self.rng.uniform(-5e-4, 5e-4, ends.shape)
        times = ends.tolist()
        self.send(
            fr,
            protocol.Heartbeat(
                rank=fr.rank,
                step=step,
                epoch=fr.epoch,
                comm_generation=fr.comm_generation,
                session=fr.session,
                clock=protocol.StepClock(
                    probe_steps=steps, times=times, radius=PROBE_RADIUS, wall_minus_mono=wall_minus_mono
                ),
                counters={"committed": fr.epoch},
            ),
        )

    def report(self, fr: FakeRank, step: int) -> None:
        begin = fr.last_report_step
        fr.last_report_step = step
        if not fr.welcomed or begin >= step:
            return
        self.send(
            fr,
            protocol.LoadReport(
                rank=fr.rank,
                epoch=fr.epoch,
                step_begin=begin,
                step_end=step,
                slot_load=self.slot_load,
                session=fr.session,
            ),
            "report",
        )

    def decide(self, plan_id: int, step: int) -> int:
        """The plan's commit step, first writer wins (the agents' decision record)."""
        path = os.path.join(self.decision_dir, str(plan_id))
        tmp = f"{path}.{os.getpid()}.{random.random()}"
        with open(tmp, "w") as f:
            f.write(str(step + 8))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        os.unlink(tmp)
        with open(path) as f:
            return int(f.read())

    def on_message(self, fr: FakeRank, msg, step: int) -> None:
        if isinstance(msg, protocol.Welcome):
            fr.welcomed, fr.session = True, msg.session
            if msg.comm is not None:
                fr.comm_generation = msg.comm.generation
        elif isinstance(msg, protocol.CommInit):
            fr.comm_generation = msg.generation
        elif isinstance(msg, protocol.Reject):
            if msg.code in ("unknown_agent", "stale_session"):
                self.hello(fr)
            elif msg.code == "rank_taken":  # our own Goodbye is still on its way: ask again, as agents do
                fr.welcomed = False
                self.retries.append((time.monotonic() + 1.0, fr.rank))
        elif isinstance(msg, protocol.Plan):
            fail = self.a["fail_every"] and msg.plan_id % self.a["fail_every"] == 0 and fr.rank == 0
            if fail:
                self.send(fr, protocol.Failed(rank=fr.rank, plan_id=msg.plan_id, reason="bench", session=fr.session))
            else:
                self.send(
                    fr,
                    protocol.Staged(
                        rank=fr.rank, plan_id=msg.plan_id, bytes_received=0, duration_s=0.0, session=fr.session
                    ),
                )
        elif isinstance(msg, protocol.VoteNow):
            commit = self.decide(msg.plan_id, step)
            fr.plan = (msg.plan_id, commit)
            self.send(
                fr,
                protocol.Voted(rank=fr.rank, plan_id=msg.plan_id, commit_step=commit, ok=True, session=fr.session),
            )
        elif isinstance(msg, protocol.AbortPlan):
            if fr.plan is None:
                self.send(
                    fr,
                    protocol.Aborted(
                        rank=fr.rank, plan_id=msg.plan_id, reason="aborted", session=fr.session, code=msg.code
                    ),
                )

    def commit_due(self, fr: FakeRank, step: int) -> None:
        if fr.plan is not None and step >= fr.plan[1]:
            plan_id, commit = fr.plan
            fr.plan = None
            fr.epoch += 1
            self.send(
                fr,
                protocol.Committed(
                    rank=fr.rank, plan_id=plan_id, commit_step=commit, epoch=fr.epoch, stall_s=0.0, session=fr.session
                ),
            )

    def restart(self, fr: FakeRank) -> None:
        """A worker restart (Goodbye, new process) or a socket reopened with its session."""
        fr.restarts += 1
        self.poller.unregister(fr.sock)
        del self.by_sock[fr.sock]
        process_restart = random.random() < 0.5
        if process_restart:
            self.send(fr, protocol.Goodbye(rank=fr.rank, reason="bench restart", session=fr.session))
        fr.sock.close(linger=100 if process_restart else 0)
        new = self._open(fr.rank, fr.pid + 1_000_000 if process_restart else fr.pid)
        new.epoch, new.comm_generation, new.last_report_step = fr.epoch, -1, fr.last_report_step
        new.restarts = fr.restarts
        self.ranks[fr.rank] = new
        self.poller.register(new.sock, zmq.POLLIN)
        self.by_sock[new.sock] = new
        self.hello(new, resume=0 if process_restart else fr.session)

    def run(self, stop_at: float) -> None:
        interval = self.a["report_every"]
        events: list[tuple[float, int, int]] = []  # (due, kind, rank): 0 heartbeat, 1 report check
        now = time.monotonic()
        for fr in self.ranks.values():
            self.hello(fr)
            heapq.heappush(events, (now + random.random(), 0, fr.rank))
            heapq.heappush(events, (now + random.random() * self.step_s * interval, 1, fr.rank))
        next_restart = now + self.a["restart_every"] if self.a["restart_every"] else float("inf")
        while time.monotonic() < stop_at:
            timeout = max(0.0, min(events[0][0] - time.monotonic(), 0.05)) if events else 0.05
            for sock, _ in self.poller.poll(timeout * 1000):
                fr = self.by_sock.get(sock)
                if fr is None:
                    continue
                step = self.step()
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_message(fr, protocol.decode(frame), step)
            now = time.monotonic()
            step = self.step()
            while events and events[0][0] <= now:
                due, kind, rank = heapq.heappop(events)
                fr = self.ranks[rank]
                self.commit_due(fr, step)
                if kind == 0:
                    if fr.welcomed:
                        self.heartbeat(fr, step)
                    heapq.heappush(events, (due + 1.0, 0, rank))
                else:
                    if step - fr.last_report_step >= interval:
                        self.report(fr, step)
                    heapq.heappush(events, (due + self.step_s * interval, 1, rank))
            for due, rank in [r for r in self.retries if r[0] <= now]:
                self.retries.remove((due, rank))
                self.hello(self.ranks[rank])
            if now > next_restart:
                next_restart = now + self.a["restart_every"]
                self.restart(random.choice(list(self.ranks.values())))
        for fr in self.ranks.values():
            fr.sock.close(0)
        self.ctx.term()


def sender_main(args: dict, ranks: list[int], counters, decision_dir: str, t0: float, stop_at_wall: float) -> None:
    sender = Sender(args, ranks, counters, decision_dir, t0)
    sender.run(time.monotonic() + (stop_at_wall - time.time()))


# -- the driver -------------------------------------------------------------------------------


def status(ctx: zmq.Context, endpoint: str, timeout_s: float = 5.0) -> tuple[dict | None, float]:
    import json

    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    t0 = time.perf_counter()
    sock.send(protocol.encode(protocol.StatusRequest()))
    if not sock.poll(timeout_s * 1000):
        sock.close(0)
        return None, float("inf")
    reply = protocol.decode(sock.recv())
    rtt = time.perf_counter() - t0
    sock.close(0)
    return json.loads(reply.status_json), rtt


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def run_case(shape: str, world: int, args, tree: str, label: str) -> dict:
    name, layers, logical, redundant = SHAPES[shape]
    physical = num_physical(logical, redundant, world)
    step_s = 1.0 / (args.rate * 10)
    tmp = tempfile.mkdtemp(prefix="eplb-ingest-")
    endpoint = f"ipc://{tmp}/coord.sock"
    coord = CoordinatorProcess(world, endpoint, tree, args.soak)
    ctx = zmq.Context()
    for _ in range(100):
        doc, _ = status(ctx, endpoint, 1.0)
        if doc is not None:
            break
    spawn = mp.get_context("spawn")
    total = args.warmup + args.seconds + 60
    t_start = time.time()
    counters = spawn.Array("q", 3)
    senders = min(args.senders, world)
    sa = {
        "endpoint": endpoint,
        "world": world,
        "layers": layers,
        "logical": logical,
        "physical": physical,
        "step_s": step_s,
        "report_every": 10,
        "fail_every": args.fail_every,
        "restart_every": args.restart_every * senders if args.restart_every else 0,
    }
    decisions = os.path.join(tmp, "decisions")
    os.mkdir(decisions)
    procs = [
        spawn.Process(
            target=sender_main,
            args=(sa, list(range(i, world, senders)), counters, decisions, t_start - 1.0, t_start + total),
            daemon=True,
        )
        for i in range(senders)
    ]
    for p in procs:
        p.start()
    deadline = time.time() + 60  # every rank registered, the side communicator "built"
    while time.time() < deadline:
        doc, _ = status(ctx, endpoint)
        if doc and all(r and r["alive"] and r["comm_generation"] == doc["comm_generation"] for r in doc["ranks"]):
            break
        time.sleep(0.5)
    time.sleep(args.warmup)
    if args.profile:
        coord.ask("profile")
    coord.ask("reset")
    offered0 = list(counters)
    rtts: list[float] = []
    t0 = last_soak = time.time()
    while time.time() - t0 < args.seconds:
        _, rtt = status(ctx, endpoint)
        rtts.append(rtt)
        time.sleep(0.5)
        if args.soak and time.time() - last_soak >= args.soak_every:
            last_soak = time.time()
            snap = coord.ask("snap")
            recent = [d for _, d in snap["ticks"][-500:]]
            print(
                f"  t={time.time() - t0:5.0f}s rss={snap['rss_mib']:.1f} MiB tick CPU median "
                f"{1e3 * statistics.median(recent) if recent else float('nan'):.2f} ms plans {snap['counts']} "
                f"sizes {snap['sizes']}",
                flush=True,
            )
    snap = coord.ask("snap")
    offered1 = list(counters)
    _, rtt = status(ctx, endpoint)
    rtts.append(rtt)
    coord.stop(f"{args.profile}.{label}" if args.profile else "")
    for p in procs:
        p.terminate()
        p.join(5)
    ctx.destroy(0)
    wall = snap["wall_s"]
    periods = [p for p, _ in snap["ticks"]]
    handled = snap["handled"]
    reports, report_cpu = handled.get("LoadReport", [0, 0.0])
    beats, beat_cpu = handled.get("Heartbeat", [0, 0.0])
    offered_msgs = world * args.rate + world / 1.0  # reports and heartbeats a second at the target
    handled_msgs = (reports + beats) / wall
    return {
        "tree": label,
        "shape": name,
        "ranks": world,
        "slots": physical,
        "report_kib": layers * physical * 8 / 1024,
        "target": world * args.rate,
        "offered": (offered1[0] - offered0[0]) / wall,
        "sender_dropped": (offered1[2] - offered0[2]) / wall,
        "accepted": reports / wall,
        "lr_ms": 1e3 * report_cpu / max(1, reports),
        "hb_ms": 1e3 * beat_cpu / max(1, beats),
        "loop_cpu": snap["loop_cpu_pct"],
        "loop_at_target": snap["loop_cpu_pct"] * offered_msgs / max(handled_msgs, 1e-9),
        "tick_late_p50": 1e3 * (pct(periods, 50) - 0.02),
        "tick_late_p99": 1e3 * (pct(periods, 99) - 0.02),
        "cpu_pct": snap["cpu_pct"],
        "rss_mib": snap["rss_mib"],
        "status_p50": 1e3 * pct(rtts, 50),
        "status_max": 1e3 * max(rtts),
        "plans": snap["counts"],
        "sizes": snap["sizes"],
    }


def table(rows: list[dict]) -> str:
    cols = [
        "tree",
        "shape",
        "ranks",
        "slots",
        "report KiB",
        "reports/s target",
        "offered",
        "accepted",
        "sender drops/s",
        "CPU ms/report",
        "CPU ms/heartbeat",
        "loop CPU %",
        "loop CPU % at target",
        "tick late p50 / p99 ms",
        "process CPU %",
        "RSS MiB",
        "status RTT p50 / max ms",
        "plans proposed / committed",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        p = r["plans"]
        lines.append(
            f"| {r['tree']} | {r['shape']} | {r['ranks']} | {r['slots']} | {r['report_kib']:.0f} | {r['target']:.0f} | "
            f"{r['offered']:.0f} | {r['accepted']:.0f} | {r['sender_dropped']:.0f} | {r['lr_ms']:.3f} | "
            f"{r['hb_ms']:.3f} | {r['loop_cpu']:.0f} | {r['loop_at_target']:.0f} | "
            f"{r['tick_late_p50']:.1f} / {r['tick_late_p99']:.1f} | {r['cpu_pct']:.0f} | {r['rss_mib']:.0f} | "
            f"{r['status_p50']:.1f} / {r['status_max']:.0f} | {p['proposed']} / {p['committed']} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        coordinator_main(int(sys.argv[2]), sys.argv[3], "--soak" in sys.argv)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="8,64,256", help="comma-separated EP rank counts")
    ap.add_argument("--shapes", default="qwen,deepseek", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--rate", type=float, default=3.0, help="load reports per second per rank (step = 1/(10 rate))")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per case")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--senders", type=int, default=3, help="sender processes")
    ap.add_argument(
        "--baseline", default="", help="another source tree (a checkout's root): each case runs on it, then on this one"
    )
    ap.add_argument("--fail-every", type=int, default=0, help="plan ids divisible by this fail in staging")
    ap.add_argument("--restart-every", type=float, default=0.0, help="seconds between rank restarts (soak)")
    ap.add_argument("--soak", action="store_true", help="print RSS, tick cost and container sizes as it runs")
    ap.add_argument("--soak-every", type=float, default=15.0)
    ap.add_argument("--profile", default="", help="write a cProfile of the coordinator's event loop to PATH.<tree>")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("before", os.path.abspath(args.baseline)), ("after", here)] if args.baseline else [("this", here)]
    rows = []
    for shape in args.shapes.split(","):
        for world in (int(x) for x in args.ranks.split(",")):
            for label, tree in trees:
                print(f"# {label}: {shape} x {world} ranks ...", file=sys.stderr, flush=True)
                row = run_case(shape, world, args, tree, label)
                rows.append(row)
                print(f"#   sizes at the end: {row['sizes']}", file=sys.stderr, flush=True)
    print(
        f"\n{os.cpu_count()} CPUs, {args.senders} sender processes, {args.rate:g} reports/s/rank, "
        f"{args.seconds:g} s measured per case\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
