"""GPU EP-serving harness: one process per GPU, the real coordinator and agents, in phases.

    python -m bench.gpu.harness --world 4 --preset qwen35 --out harness.json [--p2p-json p2p.json]
    python -m bench.gpu.harness --world 2 --device cpu --preset cpu ...   # logic check without a GPU

Each rank process runs :class:`~bench.gpu.moe.MoeStack` (real NCCL all-to-alls on a
torch.distributed serving group, exact output check on every step) and calls its agent's
serving hooks every step; the agent is the product's :class:`WorkerAgent` with the
:class:`CupyNcclTransport` (gloo on CPU). This process hosts the product's
:class:`Coordinator`, whose policy step is replaced by churn plans (:mod:`.churn`).

Phases (all ranks switch at the same step; times are turned into step counts from the
warm-up step time):

- ``prime``: a few seconds of throttled plans right after the warm-up: the process's first
  plans pay one-off costs (allocator segments, first launches); reported apart;
- ``idle``: serving, no plans: the baseline step time;
- ``stream_throttled`` / ``stream_unthrottled``: serving while plans stream continuously
  with the agent's throttle at ``--throttle-*`` / off;
- ``isolated``: steps without serving work (hooks + a tiny all-reduce): the same plans,
  unthrottled, measure the side communicator's streaming rate on quiet links;
- ``soak``: serving with continuous plans for the rest of the time budget (0 hangs,
  0 mismatches, as many rearrangements as fit);
- ``drain``: plans off until every agent and the coordinator are idle;
- ``sync``: stop-the-world rearrangements on the serving group (:mod:`.sync_baseline`),
  the same plan generator, with serving steps between them.

Every step is classified by what really happened on it: ``commit`` (the maps changed at
its boundary), ``streaming`` (the side transport had a session open or moved bytes during
it) or ``quiet``. A watchdog in this process ends the run with a stack dump of every rank
if no rank makes progress for ``--hang-timeout-s`` (counted as a hang).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import faulthandler
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from bench.gpu.churn import churn_rows, register_churn_policy
from bench.gpu.control import HarnessControl, RankProgress, shared_control
from bench.gpu.moe import PRESETS, MoeConfig, MoeStack
from bench.gpu.sync_baseline import stop_the_world
from eplb_service.coordinator.progress import CoordinatorProgress
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.sim.processes import RankProcesses, RankProcessesDied, free_port
from eplb_service.worker_agent.transport_gloo import GlooTransport

log = logging.getLogger("bench.gpu.harness")

SERVING_PHASES = ("prime", "idle", "stream_throttled", "stream_unthrottled", "soak", "sync")


@dataclass(frozen=True)
class HarnessOptions:
    """One harness run.

    Attributes:
        world_size: EP ranks = processes = GPUs.
        device: ``cuda`` (NCCL serving group, CuPy NCCL side transport) or ``cpu`` (gloo both).
        model: the MoE shape.
        warmup_steps: serving steps before anything is measured.
        prime_s: throttled plans after the warm-up, before the idle phase (0 = none).
        idle_s, throttled_s, unthrottled_s, isolated_s, soak_s: phase lengths.
        min_phase_steps: lower bound of every timed phase.
        empty_step_s: host sleep of an ``isolated`` step.
        experts_per_rank: experts each rank receives per layer in a churn plan.
        isolated_experts_per_rank: the same in the ``isolated`` phase.
        isolated_layers_per_batch: layers per staged batch in the ``isolated`` phase (0 = all:
            several NCCL groups per batch, back to back); the other phases stage one layer per batch.
        throttle_bytes_per_s: the agent's throttle in ``stream_throttled`` and ``soak``.
        chunk_bytes, max_ops_per_group: the agents' chunking in the unthrottled phases.
        throttled_chunk_bytes: chunk bytes in the throttled phases (small groups, paced by the
            throttle); switching chunking is done at a drained point (every rank must cut the
            same plan the same way).
        fence_steps, report_interval_steps: the agents' config.
        pack_per_peer: the side transport is the benchmark's
            :class:`~bench.gpu.packed_transport.PackedPerPeerTransport` (each peer's rows in
            one NCCL op per group) instead of the product's.
        max_groups_in_flight: CuPy transport's bound on queued NCCL groups.
        sync_plans: stop-the-world rearrangements (alternately a new plan and its inverse).
        sync_interval_steps: serving steps between two of them.
        hang_timeout_s: no progress on any rank for this long is a hang.
        startup_timeout_s: longest wait for the first step of every rank.
        expert_mode: ``auto``, ``grouped`` or ``loop`` (see :func:`bench.gpu.moe.select_expert_mode`).
        log_level: for the rank processes and the coordinator.
    """

    world_size: int = 4
    device: str = "cuda"
    model: MoeConfig = field(default_factory=lambda: PRESETS["qwen35"])
    warmup_steps: int = 40
    prime_s: float = 3.0
    idle_s: float = 30.0
    throttled_s: float = 40.0
    unthrottled_s: float = 30.0
    isolated_s: float = 15.0
    soak_s: float = 180.0
    min_phase_steps: int = 30
    empty_step_s: float = 0.001
    experts_per_rank: int = 8
    isolated_experts_per_rank: int = 16
    isolated_layers_per_batch: int = 0
    throttle_bytes_per_s: float = 15e9
    chunk_bytes: int = 512 << 20
    throttled_chunk_bytes: int = 48 << 20
    pack_per_peer: bool = False
    max_ops_per_group: int = 256
    fence_steps: int = 8
    report_interval_steps: int = 10
    max_groups_in_flight: int = 2
    sync_plans: int = 12
    sync_interval_steps: int = 5
    hang_timeout_s: float = 60.0
    startup_timeout_s: float = 150.0
    expert_mode: str = "auto"
    log_level: str = "WARNING"
    switch_interval_s: float = 0.0
    """``sys.setswitchinterval`` in the rank processes (0 = Python's default, 5 ms): how long a
    thread waiting for the GIL lets the holder run; an experiment on the agent's GIL cost."""
    side_max_ctas: int | None = None
    """CTA limit of the side communicator (``CupyNcclTransport(max_ctas=...)``; None = NCCL's choice)."""
    profile_steps: int = 0
    """Steps of rank 0 profiled (``torch.profiler``, kernels only) after the idle, throttled and
    unthrottled phases, each in a ``profile_*`` phase of its own (0 = no profiling)."""
    profile_dir: str | None = None
    """Where the profiled windows' Chrome traces are written (None: a temporary directory, deleted)."""
    profile_cpu: bool = False
    """Also record host activity in the profiled windows: the serving thread's CUDA runtime
    calls, time per step by call (heavier traces; the kernel figures stay comparable)."""
    external_stream_gbps: float = 0.0
    """A diagnostic phase ``stream_external`` after ``idle`` (0 = none): no plans, but a thread
    of each rank streams a ring over a second side communicator at this rate (groups of
    ``external_chunk_bytes``, the throttle's device gaps) queuing many groups per host wake-up. The same GPU traffic
    as the agent's throttled streaming with almost none of its host work: what the step
    time does then tells GPU-side interference apart from the agent's host cost."""
    external_chunk_bytes: int = 48 << 20
    """Group size of the ``stream_external`` traffic."""


# -- the CPU side transport, with the sessions the summary reads ------------------------------


class MeteredGlooTransport(GlooTransport):
    """:class:`GlooTransport` that records sessions like :class:`CupyNcclTransport` does."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list = []
        self._session: dict | None = None
        self.bytes_sent_total = self.bytes_received_total = 0

    @property
    def session_active(self) -> bool:
        return self._session is not None

    def _begin(self) -> dict:
        if self._session is None:
            self._session = {"started_at": time.monotonic(), "bytes_sent": 0, "bytes_received": 0, "groups": 0}
        return self._session

    def exchange(self, ops, pace_s: float = 0.0) -> None:
        session = self._begin()
        super().exchange(ops, pace_s)
        for op in ops:
            nbytes = op.tensor.numel() * op.tensor.element_size()
            key = "bytes_sent" if op.is_send else "bytes_received"
            session[key] += nbytes
            if op.is_send:
                self.bytes_sent_total += nbytes
            else:
                self.bytes_received_total += nbytes
        session["groups"] += 1

    def copy_local(self, dst, src) -> None:
        self._begin()
        super().copy_local(dst, src)

    def synchronize(self) -> None:
        super().synchronize()
        session, self._session = self._session, None
        if session is not None:
            session["wall_s"] = session["gpu_s"] = time.monotonic() - session["started_at"]
            self.sessions.append(session)


def _session_dict(session) -> dict:
    return session if isinstance(session, dict) else session.as_dict()


# -- one rank ------------------------------------------------------------------------------------


class RankRunner:
    """The serving loop of one rank through all phases; collects what the summary needs.

    About 370 lines (benchmark code, over the ~300 the product aims at): one step function
    and the phases built from it (drain, profile windows, external streaming, sync
    baseline), which all append to the same per-step rows and phase list.
    """

    def __init__(
        self,
        opts: HarnessOptions,
        rank: int,
        stack: MoeStack,
        agent,
        transport,
        control: HarnessControl,
        progress: RankProgress,
    ) -> None:
        self.opts, self.rank, self.stack, self.agent, self.transport = opts, rank, stack, agent, transport
        self.control, self.progress = control, progress
        self.cuda = stack.device.type == "cuda"
        self.device = stack.device
        self.events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
        )
        self.tick = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.phases: list[dict] = []
        self.rows: dict[str, list] = {
            k: []
            for k in ("phase", "step_s", "hook_host_s", "hook_gpu_s", "commit", "streaming", "mismatches", "cpu_s")
        }
        self.sync_results: list[dict] = []
        self.profiles: dict[str, dict] = {}
        self.serving_port = 0
        self.external_bytes = 0
        self.external_error: str | None = None
        self._serving_streams: set[int] | None = None
        self.notes: list[str] = []
        self.step_s_agreed = 0.0
        self._step_started = time.monotonic()
        self._watchdog_stop = threading.Event()
        threading.Thread(target=self._watchdog, name="harness-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """Dump every thread's stack once if one step runs for half the hang timeout."""
        limit = self.opts.hang_timeout_s * 0.5
        dumped_for = None
        while not self._watchdog_stop.wait(1.0):
            started = self._step_started
            if time.monotonic() - started > limit and dumped_for != started:
                dumped_for = started
                sys.stderr.write(
                    f"[rank {self.rank}] one step has run for {time.monotonic() - started:.0f}s; stacks:\n"
                )
                faulthandler.dump_traceback(all_threads=True)

    # -- helpers ----------------------------------------------------------------------------

    def _all_reduce_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def _enter(
        self,
        name: str,
        plans: bool,
        experts: int | None = None,
        throttle: float | None = None,
        layers_per_batch: int = 1,
    ) -> None:
        if throttle is not None:
            self.agent.override_config(throttle_bytes_per_s=float(throttle))
        if self.rank == 0:
            control = self.control
            if experts is not None:
                control.experts_per_rank = experts
            control.layers_per_batch = layers_per_batch
            control.plans_enabled = plans
            control.phase = len(self.phases)
        self.phases.append(
            {
                "name": name,
                "first_step": self.agent.hooks.steps_done,
                "t": time.monotonic(),
                "throttle_bytes_per_s": self.agent.config.throttle_bytes_per_s,
                "plans": plans,
                "experts_per_rank": experts,
                "layers_per_batch": layers_per_batch,
                "chunk_bytes": self.agent.config.chunk_bytes,
            }
        )
        if self.rank == 0:
            log.warning("phase %s from step %d", name, self.agent.hooks.steps_done)

    def _set_chunking(self, chunk_bytes: int) -> None:
        """Drain (plans off, agents and coordinator idle), then change the agents' chunking."""
        if self.agent.config.chunk_bytes == chunk_bytes:
            return
        if self.phases and self.phases[-1]["plans"]:
            self._enter(f"drain_{len(self.phases)}", plans=False)
            if not self._drain():
                raise RuntimeError("could not drain plans before changing the chunking")
        self.agent.override_config(chunk_bytes=int(chunk_bytes))

    def _keep_config(self) -> None:
        """The phase's throttle and chunking are agent overrides, which a re-Welcome keeps; a
        Welcome handled at the very moment of a change could still put the old values back:
        re-apply them, and say so."""
        want = self.phases[-1] if self.phases else None
        cfg = self.agent.config
        if want and (
            cfg.throttle_bytes_per_s != want["throttle_bytes_per_s"] or cfg.chunk_bytes != want["chunk_bytes"]
        ):
            self.agent.override_config(
                throttle_bytes_per_s=want["throttle_bytes_per_s"], chunk_bytes=want["chunk_bytes"]
            )
            self.notes.append(
                f"agent config differed from the phase's in phase {want['name']} "
                f"(step {self.agent.hooks.steps_done}); re-applied"
            )

    def step(self, serve: bool = True, external: bool = False) -> None:
        hooks, tr = self.agent.hooks, self.transport
        step = hooks.steps_done
        self._keep_config()
        self._step_started = time.monotonic()
        moved0 = tr.bytes_sent_total + tr.bytes_received_total
        active0 = tr.session_active
        epoch0 = hooks.epoch
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        if self.cuda:
            self.events[0].record()
        hooks.before_step()
        if self.cuda:
            self.events[1].record()
        hook_host = time.perf_counter() - t0
        if serve:
            mismatches = self.stack.forward(step)
        else:
            dist.all_reduce(self.tick)
            time.sleep(self.opts.empty_step_s)
            mismatches = None
        hooks.after_step(self.stack.load_pass)
        self.stack.load_pass.zero_()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        t1 = time.perf_counter()
        rows = self.rows
        rows["phase"].append(len(self.phases) - 1)
        rows["step_s"].append(t1 - t0)
        rows["cpu_s"].append(time.thread_time() - cpu0)
        rows["hook_host_s"].append(hook_host)
        rows["hook_gpu_s"].append(self.events[0].elapsed_time(self.events[1]) / 1e3 if self.cuda else hook_host)
        rows["commit"].append(hooks.epoch != epoch0)
        rows["streaming"].append(
            external or bool(active0 or tr.session_active or tr.bytes_sent_total + tr.bytes_received_total != moved0)
        )
        rows["mismatches"].append(int(mismatches) if mismatches is not None else 0)
        self.progress.set(self.rank, step + 1)

    def _steps_for(self, seconds: float) -> int:
        return max(self.opts.min_phase_steps, int(seconds / max(self.step_s_agreed, 1e-4)))

    # -- the phases --------------------------------------------------------------------------

    def run(self) -> None:
        o = self.opts
        self._enter("warmup", plans=False, experts=o.experts_per_rank, throttle=0.0)
        for _ in range(o.warmup_steps):
            self.step()
        tail = self.rows["step_s"][o.warmup_steps // 2 :]
        self.step_s_agreed = self._all_reduce_max(float(np.median(tail)))
        if o.prime_s > 0:
            # The process's first plans pay one-off costs (allocator segments, first launches);
            # they run here, reported on their own (longest serving step), not in a timed phase.
            self._set_chunking(o.throttled_chunk_bytes)
            self._enter("prime", plans=True, experts=o.experts_per_rank, throttle=o.throttle_bytes_per_s)
            for _ in range(self._steps_for(o.prime_s)):
                self.step()
            self._enter("drain_prime", plans=False)
            if not self._drain():
                raise RuntimeError("could not drain the priming plans")
        self._enter("idle", plans=False)
        for _ in range(self._steps_for(o.idle_s)):
            self.step()
        self._profile("idle", plans=False)
        if o.external_stream_gbps > 0 and self.cuda:
            self._external_phase()
        self._set_chunking(o.throttled_chunk_bytes)
        self._enter("stream_throttled", plans=True, experts=o.experts_per_rank, throttle=o.throttle_bytes_per_s)
        for _ in range(self._steps_for(o.throttled_s)):
            self.step()
        self._profile("stream_throttled", plans=True)
        self._set_chunking(o.chunk_bytes)
        self._enter("stream_unthrottled", plans=True, experts=o.experts_per_rank, throttle=0.0)
        for _ in range(self._steps_for(o.unthrottled_s)):
            self.step()
        self._profile("stream_unthrottled", plans=True)
        self._enter(
            "isolated",
            plans=True,
            experts=o.isolated_experts_per_rank,
            throttle=0.0,
            layers_per_batch=o.isolated_layers_per_batch,
        )
        for _ in range(max(o.min_phase_steps, int(o.isolated_s / (o.empty_step_s + 2e-4)))):
            self.step(serve=False)
        self._set_chunking(o.throttled_chunk_bytes)
        self._enter("soak", plans=True, experts=o.experts_per_rank, throttle=o.throttle_bytes_per_s)
        for _ in range(self._steps_for(o.soak_s)):
            self.step()
        self._enter("drain", plans=False)
        if self._drain():
            self._enter("sync", plans=False)
            self._sync_phase()
        self._watchdog_stop.set()

    def _profile(self, after: str, plans: bool) -> None:
        """``profile_steps`` more steps of the phase ``after`` in a phase of their own; rank 0
        records its kernels (their overhead stays out of the timed phases)."""
        steps = self.opts.profile_steps
        if steps <= 0:
            return
        self._enter(f"profile_{after}", plans=plans)
        if self.rank != 0:
            for _ in range(steps):
                self.step()
            return
        from torch.profiler import ProfilerActivity, profile

        from bench.gpu.trace_summary import export_trace, host_api_summary, kernels_of, window_summary

        # on a CPU-only run (the harness's logic check) the host activity is all there is
        activities = ([ProfilerActivity.CUDA] if self.cuda else []) + (
            [ProfilerActivity.CPU] if self.opts.profile_cpu or not self.cuda else []
        )
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
        path = None
        if self.opts.profile_dir is not None:
            os.makedirs(self.opts.profile_dir, exist_ok=True)
            path = os.path.join(self.opts.profile_dir, f"rank0_{after}.json")
        trace = export_trace(prof, path)
        kernels = kernels_of(trace)
        if after == "idle":
            self._serving_streams = {k.stream for k in kernels}
        self.profiles[after] = window_summary(kernels, steps, self._serving_streams)
        if self.opts.profile_cpu:
            self.profiles[after]["host_api"] = host_api_summary(trace, steps, tid=threading.get_native_id())

    def _external_phase(self) -> None:
        """``stream_external`` (see :attr:`HarnessOptions.external_stream_gbps`): a thread streams
        a fixed number of ring rounds, the same on every rank (from the agreed step time), over
        a communicator of its own, while this thread serves as many steps as the other phases;
        steps after the rounds ended count as quiet."""
        o = self.opts
        chunk, groups = o.external_chunk_bytes, 8
        rounds = max(
            1,
            int(self._steps_for(o.throttled_s) * self.step_s_agreed * o.external_stream_gbps * 1e9 / (chunk * groups)),
        )
        self._enter("stream_external", plans=False)
        thread = threading.Thread(
            target=self._external_streamer, args=(chunk, groups, rounds), name="external-streamer", daemon=True
        )
        thread.start()
        for _ in range(self._steps_for(o.throttled_s)):  # the same count on every rank (steps are collective)
            self.step(external=thread.is_alive())
        thread.join(timeout=self.opts.hang_timeout_s)
        if self.external_error:
            raise RuntimeError(f"external streamer: {self.external_error}")

    def _external_streamer(self, chunk: int, groups: int, rounds: int) -> None:
        from eplb_service.protocol import CommInit
        from eplb_service.worker_agent.transport import P2POp
        from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport

        o = self.opts
        t = CupyNcclTransport(self.device, max_groups_in_flight=groups, max_ctas=o.side_max_ctas)
        try:
            t.connect(
                CommInit(
                    generation=9999, store_host="127.0.0.1", store_port=self.serving_port, world_size=o.world_size
                ),
                self.rank,
                120,
            )
            send = torch.ones(chunk * groups, dtype=torch.uint8, device=self.device)
            recv = torch.empty_like(send)
            nxt, prv = (self.rank + 1) % o.world_size, (self.rank - 1) % o.world_size
            pace_s = chunk / (o.external_stream_gbps * 1e9)
            for _ in range(rounds):
                for i in range(groups):
                    t.exchange(
                        [
                            P2POp(True, send[i * chunk : (i + 1) * chunk], nxt, i),
                            P2POp(False, recv[i * chunk : (i + 1) * chunk], prv, i),
                        ],
                        pace_s,
                    )
                t.synchronize()
                self.external_bytes += groups * chunk
        except Exception as exc:  # reported by the serving thread
            self.external_error = f"{type(exc).__name__}: {exc}"
        finally:
            t.abort()

    def _drain(self, max_steps: int = 3000) -> bool:
        # Quiet for a second of steps: the coordinator's idle flag is refreshed every 0.2 s.
        needed = max(3, int(np.ceil(1.0 / max(self.step_s_agreed, 1e-3))))
        quiet = 0
        for _ in range(max_steps):
            self.step()
            busy = self.agent.busy or (self.rank == 0 and not self.control.coordinator_idle)
            quiet = quiet + 1 if self._all_reduce_max(1.0 if busy else 0.0) == 0 else 0
            if quiet >= needed:
                return True
        self.notes.append(f"drain: agents or coordinator still busy after {max_steps} steps; sync baseline skipped")
        return False

    def _sync_phase(self) -> None:
        o = self.opts
        model = self.stack.model
        host = model.phy2log.cpu().numpy().astype(np.int64)
        layers = list(range(host.shape[0]))
        undo_rows = None
        for i in range(o.sync_plans):
            if undo_rows is None:
                rng = np.random.default_rng([o.model.seed, 7777, i])
                new_rows = churn_rows(host, layers, o.experts_per_rank, model.num_ranks, rng)
                undo_rows = host[layers].copy()
            else:
                new_rows, undo_rows = undo_rows, None
            result = stop_the_world(model, host, layers, new_rows, self.rank)
            result["step"] = self.agent.hooks.steps_done
            self.sync_results.append(result)
            for _ in range(o.sync_interval_steps):
                self.step()
        if undo_rows is not None:  # leave the placement the agents know
            self.sync_results.append(
                {
                    **stop_the_world(model, host, layers, undo_rows, self.rank),
                    "step": self.agent.hooks.steps_done,
                    "restore": True,
                }
            )
            for _ in range(o.sync_interval_steps):
                self.step()

    def result(self) -> dict:
        hooks = self.agent.hooks
        return {
            "rank": self.rank,
            "expert_mode": self.stack.expert_mode,
            "phases": self.phases,
            "rows": self.rows,
            "sessions": [_session_dict(s) for s in self.transport.sessions],
            "sync": self.sync_results,
            "agent_stats": dict(self.agent.stats),
            "max_commit_host_stall_s": hooks.max_stall_s,
            "epoch": hooks.epoch,
            "dropped_load_windows": hooks.dropped_windows,
            "transport_aborts": getattr(self.transport, "aborts", 0),
            "step_s_agreed": self.step_s_agreed,
            "notes": self.notes,
            "profiles": self.profiles,
            "external_bytes": self.external_bytes,
        }


def warm_commit_kernels(model) -> None:
    """Launch the commit's kernels once before serving (row 0 onto itself, maps onto themselves).

    With CUDA's lazy module loading, a kernel's first launch can wait for the context to go
    idle; the first commit must not be that launch while side-stream NCCL kernels spin.
    """
    from eplb_service.worker_agent.transport import RecordLayout

    index = torch.zeros(1, dtype=torch.int64, device=model.device)
    for tensors in model.expert_weights[:1]:
        layout = RecordLayout.of(tensors)  # staging rows are strided views of records
        records = torch.empty((1, layout.record_bytes), dtype=torch.uint8, device=model.device)
        for t, offset, size in zip(tensors, layout.offsets, layout.sizes):
            staged = records[:, offset : offset + size].view(t.dtype).view(1, *t.shape[1:])
            staged.copy_(t[:1])
            t.index_copy_(0, index, staged)
    for t in (model.phy2log, model.log2phy, model.logcnt):
        t.index_copy_(0, index, t[:1].clone())
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def rank_main(
    rank: int,
    opts: HarnessOptions,
    endpoint: str,
    serving_port: int,
    control: HarnessControl,
    progress: RankProgress,
    results,
) -> None:
    """Process entry point of one rank."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if opts.switch_interval_s > 0:
        sys.setswitchinterval(opts.switch_interval_s)
    logging.basicConfig(level=opts.log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    error = None
    runner = None
    try:
        from eplb_service.worker_agent.agent import WorkerAgent

        cuda = opts.device == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            torch.set_num_threads(1)
            device = torch.device("cpu")
        store = dist.TCPStore(
            "127.0.0.1", serving_port, opts.world_size, False, timeout=datetime.timedelta(seconds=120)
        )
        kwargs = {"device_id": device} if cuda else {}
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=dist.PrefixStore("serving", store),
            rank=rank,
            world_size=opts.world_size,
            timeout=datetime.timedelta(seconds=180),
            **kwargs,
        )
        cfg = opts.model
        shape = PlacementShape(cfg.num_layers, cfg.num_logical, cfg.num_physical, opts.world_size)
        stack = MoeStack(cfg, rank, opts.world_size, device, initial_phy2log(shape), expert_mode=opts.expert_mode)
        transport = side_transport(opts, device)
        warm_commit_kernels(stack.model)
        agent = WorkerAgent(stack.model, endpoint, transport).start()
        deadline = time.monotonic() + opts.startup_timeout_s
        while not (agent.welcomed and transport.connected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent not welcomed/connected within {opts.startup_timeout_s}s")
            time.sleep(0.01)
        dist.barrier()
        runner = RankRunner(opts, rank, stack, agent, transport, control, progress)
        runner.serving_port = serving_port
        try:
            runner.run()
            dist.barrier()
        finally:
            agent.stop()
    except Exception as exc:  # report, never hang the parent
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
        logging.getLogger(__name__).exception("rank %d failed", rank)
    out = runner.result() if runner is not None else {"rank": rank}
    out["error"] = error
    results.put(out)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def side_transport(opts: HarnessOptions, device: torch.device):
    """The agent's side transport: the product's CuPy NCCL one on CUDA (or the benchmark's
    packed-per-peer variant, ``pack_per_peer``), a metered gloo one on CPU."""
    if device.type != "cuda":
        return MeteredGlooTransport()
    kwargs = {"max_groups_in_flight": opts.max_groups_in_flight, "max_ctas": opts.side_max_ctas}
    if opts.pack_per_peer:
        from bench.gpu.packed_transport import PackedPerPeerTransport

        return PackedPerPeerTransport(device, pack_per_peer=True, **kwargs)
    from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport

    return CupyNcclTransport(device, **kwargs)


# -- the parent: coordinator, processes, watchdog ------------------------------------------------


class ParentWatch:
    """The parent's poll while the ranks run: the coordinator's idle flag to the ranks, the
    hang check (no rank made progress for ``hang_timeout_s``, or for ``startup_timeout_s``
    before every rank's first step: stacks dumped, the wait ends), a log line every 10 s."""

    def __init__(
        self,
        opts: HarnessOptions,
        coordinator,
        control: HarnessControl,
        progress: RankProgress,
        ranks: RankProcesses,
    ) -> None:
        self.opts, self.coordinator, self.control, self.progress, self.ranks = (
            opts,
            coordinator,
            control,
            progress,
            ranks,
        )
        self.hangs: list[dict] = []
        self.last_total, self.last_change = -1, time.monotonic()
        self.last_log = 0.0

    def poll(self) -> bool:
        """One poll of :meth:`RankProcesses.wait`; True (stop waiting) on a hang."""
        state = self.coordinator.progress()
        self.control.coordinator_idle = not state.busy
        now = time.monotonic()
        total = self.progress.total()
        if total != self.last_total:
            self.last_total, self.last_change = total, now
        limit = self.opts.hang_timeout_s if self.progress.all_started() else self.opts.startup_timeout_s
        if now - self.last_change > limit and not self.ranks.done:
            self._hang(state, now)
            return True
        if now - self.last_log > 10:
            self.last_log = now
            log.warning(
                "t=%4.0fs steps %s | committed %d aborted %d | %.1f GiB moved | phase %d",
                now - self.ranks.started_at,
                self.progress.steps(),
                state.committed,
                state.aborted,
                state.bytes_moved / 2**30,
                self.control.phase,
            )
        return False

    def _hang(self, state, now: float) -> None:
        steps = self.progress.steps()
        self.hangs.append(
            {
                "steps": steps,
                "phase": int(self.control.phase),
                "silent_s": round(now - self.last_change, 1),
                "coordinator": {"plan": state.plan_id, "phase": state.plan_phase},
            }
        )
        log.error("HANG: no progress for %.0fs (steps %s); dumping stacks and stopping", now - self.last_change, steps)
        self.ranks.signal_alive(signal.SIGUSR1)


async def _run(opts: HarnessOptions, endpoint: str) -> dict:
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.policy import unregister_policy
    from eplb_service.coordinator.server import Coordinator
    from eplb_service.protocol import AgentConfig

    agent_cfg = AgentConfig(
        report_interval_steps=opts.report_interval_steps,
        fence_steps=opts.fence_steps,
        max_ops_per_group=opts.max_ops_per_group,
        chunk_bytes=opts.chunk_bytes,
        throttle_bytes_per_s=0.0,
    )
    ranks = RankProcesses(opts.world_size, "harness-rank")
    control = shared_control(ranks.ctx)
    progress = RankProgress(ranks.ctx, opts.world_size)
    policy = register_churn_policy(
        lambda: control.plans_enabled,
        lambda: int(control.experts_per_rank),
        seed=opts.model.seed,
        layers_per_batch=lambda: int(control.layers_per_batch),
    )
    cfg = CoordinatorConfig(
        world_size=opts.world_size,
        endpoint=endpoint,
        policy=policy,
        rebalance_interval_steps=1,
        min_window_steps=10,
        load_half_life_steps=100.0,
        min_gain=0.0,
        staging_budget_bytes=max(1, opts.isolated_experts_per_rank) * opts.model.bytes_per_expert,
        agent=agent_cfg,
    )
    coordinator = Coordinator(cfg)
    server = asyncio.create_task(coordinator.serve())
    await coordinator.ready.wait()
    serving_port = free_port()
    serving_store = dist.TCPStore(
        "127.0.0.1",
        serving_port,
        opts.world_size,
        True,
        timeout=datetime.timedelta(seconds=120),
        wait_for_workers=False,
    )
    watch = ParentWatch(opts, coordinator, control, progress, ranks)
    errors: list[str] = []
    try:
        ranks.start(rank_main, lambda r: (r, opts, endpoint, serving_port, control, progress, ranks.results))
        try:
            await ranks.wait(0.2, watch.poll, dead_grace_s=2.0)
        except RankProcessesDied as exc:
            errors.append(str(exc))
        if watch.hangs:
            await asyncio.sleep(3.0)  # the ranks' stack dumps
    finally:
        ranks.stop(join_timeout_s=1 if watch.hangs else 15)
        wall = time.monotonic() - ranks.started_at
        coordinator.stop()
        await server
        unregister_policy(policy)
        del serving_store
    errors.extend(r["error"] for r in ranks.collected if r.get("error"))
    ranked = sorted(ranks.collected, key=lambda r: r["rank"])
    return summarize(opts, coordinator.progress(), ranked, watch.hangs, errors, wall)


# -- the summary -------------------------------------------------------------------------------


def _pct(values, q: float) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return None if values.size == 0 else float(np.percentile(values, q))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 4)


def _dist_ms(values) -> dict:
    return {
        "n": int(len(values)),
        "p50_ms": _ms(_pct(values, 50)),
        "p99_ms": _ms(_pct(values, 99)),
        "max_ms": _ms(_pct(values, 100)),
        "mean_ms": _ms(float(np.mean(values)) if len(values) else None),
    }


def summarize(
    opts: HarnessOptions, coordinator: CoordinatorProgress, ranks: list[dict], hangs: list, errors: list, wall_s: float
) -> dict:
    complete = [r for r in ranks if "rows" in r]
    summary: dict = {
        "world_size": opts.world_size,
        "device": opts.device,
        "model": dataclasses.asdict(opts.model),
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "model"},
        "wall_s": round(wall_s, 1),
        "hangs": len(hangs),
        "hang_details": hangs,
        "errors": errors,
        "coordinator": {
            "committed": coordinator.committed,
            "aborted": coordinator.aborted,
            "diverged": coordinator.diverged,
            "bytes_moved": coordinator.bytes_moved,
            "experts_moved": coordinator.experts_moved,
            "epoch": coordinator.epoch,
        },
    }
    if len(complete) != opts.world_size:
        summary["complete"] = False
        summary["output_mismatches"] = int(sum(sum(r["rows"]["mismatches"]) for r in complete))
        return summary
    summary["complete"] = True
    n = min(len(r["rows"]["step_s"]) for r in complete)
    col = lambda key: np.array([r["rows"][key][:n] for r in complete])  # noqa: E731 - [ranks, steps]
    step_s = col("step_s").max(axis=0)
    hook_gpu = col("hook_gpu_s").max(axis=0)
    hook_host = col("hook_host_s").max(axis=0)
    commit = col("commit").any(axis=0)
    streaming = col("streaming").any(axis=0)
    mismatches = col("mismatches").sum(axis=0)
    cpu_s = col("cpu_s").max(axis=0)
    phase_of = np.array(complete[0]["rows"]["phase"][:n])
    names = [p["name"] for p in complete[0]["phases"]]
    summary["expert_mode"] = complete[0]["expert_mode"]
    summary["step_s_agreed_ms"] = _ms(complete[0]["step_s_agreed"])
    summary["output_mismatches"] = int(mismatches.sum())
    phases = {}
    for index, name in enumerate(names):
        sel = phase_of == index
        quiet = sel & ~commit & ~streaming
        phases[name] = {
            "steps": int(sel.sum()),
            "mismatches": int(mismatches[sel].sum()),
            "commits": int((sel & commit).sum()),
            "all": _dist_ms(step_s[sel]),
            "quiet": _dist_ms(step_s[quiet]),
            "streaming": _dist_ms(step_s[sel & streaming & ~commit]),
            "commit": _dist_ms(step_s[sel & commit]),
            # the serving thread's own CPU time per step (max over ranks): if it stays while the
            # step time grows, the step waited (on the GPU, or for the GIL)
            "serving_cpu_quiet": _dist_ms(cpu_s[quiet]),
            "serving_cpu_streaming": _dist_ms(cpu_s[sel & streaming & ~commit]),
            "throttle_bytes_per_s": complete[0]["phases"][index]["throttle_bytes_per_s"],
            "chunk_bytes": complete[0]["phases"][index].get("chunk_bytes"),
            "experts_per_rank": complete[0]["phases"][index]["experts_per_rank"],
            "layers_per_batch": complete[0]["phases"][index]["layers_per_batch"],
        }
    summary["phases"] = phases
    serving = np.isin(phase_of, [i for i, name in enumerate(names) if name in SERVING_PHASES])
    summary["commit_stall"] = {
        "gpu": _dist_ms(hook_gpu[serving & commit]),
        "host": _dist_ms(hook_host[serving & commit]),
        "max_host_enqueue_ms": _ms(max(r["max_commit_host_stall_s"] for r in complete)),
        "step": _dist_ms(step_s[serving & commit]),
    }
    summary["bandwidth"] = _bandwidth(complete, names)
    summary["sync_baseline"] = _sync_summary(complete, opts)
    summary["agent_stats"] = {
        k: int(sum(r["agent_stats"].get(k, 0) for r in complete))
        for k in sorted({k for r in complete for k in r["agent_stats"]})
    }
    summary["transport_aborts"] = int(sum(r.get("transport_aborts", 0) for r in complete))
    st = summary["agent_stats"]
    summary["agent_cpu_ms_per_batch"] = {
        "staging": round(st.get("stage_cpu_us", 0) / max(1, st.get("staged", 0)) / 1e3, 3),
        "vote": round(st.get("vote_cpu_us", 0) / max(1, st.get("votes", 0)) / 1e3, 3),
        "sections": {
            k[: -len("_cpu_us")]: round(v / max(1, st.get("staged" if k.startswith("stage_") else "votes", 0)) / 1e3, 3)
            for k, v in sorted(st.items())
            if k.endswith("_cpu_us") and k not in ("stage_cpu_us", "vote_cpu_us")
        },
    }
    summary["notes"] = sorted({note for r in complete for note in r["notes"]})
    summary["profile"] = _profile_summary(complete[0].get("profiles", {}), phases)
    summary["external_stream_bytes"] = int(sum(r.get("external_bytes", 0) for r in complete))
    if "soak" in phases:
        soak = phases["soak"]
        soak_steps = phase_of == names.index("soak")
        summary["soak"] = {
            "steps": soak["steps"],
            "rearrangements": soak["commits"],
            "mismatches": soak["mismatches"],
            "seconds": round(float(step_s[soak_steps].sum()), 1),
            "hangs": len(hangs),
        }
    return summary


def _profile_summary(profiles: dict, phases: dict) -> dict:
    """Rank 0's profiled windows, and each streaming window against the idle one."""
    from bench.gpu.trace_summary import compare

    if "idle" not in profiles:
        return {}
    out: dict = {"windows": profiles}
    for name in ("stream_throttled", "stream_unthrottled"):
        if name in profiles:
            cmp = compare(profiles["idle"], profiles[name])
            steps = phases.get(f"profile_{name}", {}).get("all", {})
            base = phases.get("profile_idle", {}).get("all", {})
            cmp["step_ms_p50"] = [base.get("p50_ms"), steps.get("p50_ms")]
            out[name] = cmp
    return out


def _bandwidth(ranks: list[dict], names: list[str]) -> dict:
    """Per phase: each rank's side-stream rate, bytes = max(sent, received) of each session."""
    out = {}
    for index, name in enumerate(names):
        per_rank = []
        for r in ranks:
            begin = r["phases"][index]["t"]
            end = r["phases"][index + 1]["t"] if index + 1 < len(r["phases"]) else float("inf")
            sessions = [s for s in r["sessions"] if begin <= s["started_at"] < end and s["groups"] > 0]
            if not sessions:
                continue
            moved = sum(max(s["bytes_sent"], s["bytes_received"]) for s in sessions)
            gpu = sum(s["gpu_s"] for s in sessions)
            wall = sum(s["wall_s"] for s in sessions)
            per_rank.append(
                {
                    "bytes": moved,
                    "sessions": len(sessions),
                    "gpu_s": gpu,
                    "wall_s": wall,
                    "gbps_gpu": moved / gpu / 1e9 if gpu > 0 else None,
                    "gbps_wall": moved / wall / 1e9 if wall > 0 else None,
                }
            )
        if per_rank:
            gpu_rates = [p["gbps_gpu"] for p in per_rank if p["gbps_gpu"]]
            wall_rates = [p["gbps_wall"] for p in per_rank if p["gbps_wall"]]
            out[name] = {
                "sessions": int(sum(p["sessions"] for p in per_rank)),
                "bytes_per_rank_mean": float(np.mean([p["bytes"] for p in per_rank])),
                "gbps_link_mean": float(np.mean(gpu_rates)) if gpu_rates else None,
                "gbps_link_min": float(np.min(gpu_rates)) if gpu_rates else None,
                "gbps_session_wall_mean": float(np.mean(wall_rates)) if wall_rates else None,
                "per_rank": per_rank,
            }
    return out


def _sync_summary(ranks: list[dict], opts: HarnessOptions) -> dict:
    count = min(len(r["sync"]) for r in ranks)
    if count == 0:
        return {"plans": 0}
    stalls = [max(r["sync"][i]["stall_s"] for r in ranks) for i in range(count)]
    moved = [max(max(r["sync"][i]["bytes_sent"], r["sync"][i]["bytes_received"]) for r in ranks) for i in range(count)]
    measured = stalls[2:] if count > 4 else stalls  # the first ones open NCCL's p2p connections
    return {
        "plans": count,
        "layers_per_plan": opts.model.num_layers,
        "experts_per_rank_per_layer": opts.experts_per_rank,
        "bytes_per_rank_max_mean": float(np.mean(moved)),
        "stall": _dist_ms(measured),
        "stall_all_ms": [_ms(s) for s in stalls],
    }


def run_harness(opts: HarnessOptions) -> dict:
    with tempfile.TemporaryDirectory(prefix="eplb-gpu-harness-") as tmp:
        endpoint = f"ipc://{tmp}/coordinator.sock"
        try:
            import uvloop

            return uvloop.run(_run(opts, endpoint))
        except ImportError:  # pragma: no cover
            return asyncio.run(_run(opts, endpoint))


def _parse(argv: list[str] | None) -> tuple[HarnessOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen35")
    p.add_argument("--layers", type=int, default=None, help="override the preset's MoE layers")
    p.add_argument("--tokens", type=int, default=None, help="override tokens per rank per step")
    p.add_argument("--zipf", type=float, default=None, help="expert popularity skew (0 = uniform)")
    p.add_argument("--seed", type=int, default=0)
    for name in ("idle", "throttled", "unthrottled", "isolated", "soak"):
        p.add_argument(f"--{name}-s", type=float, default=getattr(HarnessOptions, f"{name}_s"))
    p.add_argument("--warmup-steps", type=int, default=HarnessOptions.warmup_steps)
    p.add_argument("--prime-s", type=float, default=HarnessOptions.prime_s)
    p.add_argument("--min-phase-steps", type=int, default=HarnessOptions.min_phase_steps)
    p.add_argument("--experts-per-rank", type=int, default=HarnessOptions.experts_per_rank)
    p.add_argument("--isolated-experts-per-rank", type=int, default=HarnessOptions.isolated_experts_per_rank)
    p.add_argument("--throttle-gbps", type=float, default=None, help="agent throttle in GB/s per rank")
    p.add_argument("--throttle-share", type=float, default=0.05, help="throttle as a share of --p2p-json's peak")
    p.add_argument("--p2p-json", default=None, help="bench.gpu.p2p output: its peak sets the throttle")
    p.add_argument("--chunk-mib", type=int, default=HarnessOptions.chunk_bytes >> 20)
    p.add_argument("--throttled-chunk-mib", type=int, default=HarnessOptions.throttled_chunk_bytes >> 20)
    p.add_argument(
        "--pack",
        choices=("auto", "on", "off"),
        default="off",
        help="also pack the agent's per-tensor blocks into one NCCL op per peer (auto: as --p2p-json recommends)",
    )
    p.add_argument("--max-ops", type=int, default=HarnessOptions.max_ops_per_group)
    p.add_argument("--fence-steps", type=int, default=HarnessOptions.fence_steps)
    p.add_argument("--in-flight", type=int, default=HarnessOptions.max_groups_in_flight)
    p.add_argument("--sync-plans", type=int, default=HarnessOptions.sync_plans)
    p.add_argument("--hang-timeout-s", type=float, default=HarnessOptions.hang_timeout_s)
    p.add_argument("--expert-mode", choices=("auto", "grouped", "loop"), default="auto")
    p.add_argument("--switch-interval-s", type=float, default=0.0, help="sys.setswitchinterval in the rank processes")
    p.add_argument(
        "--side-max-ctas", type=int, default=None, help="CTA limit of the side communicator (default: NCCL's)"
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps of rank 0 after idle/throttled/unthrottled",
    )
    p.add_argument("--profile-dir", default=None, help="keep the profiled windows' Chrome traces here")
    p.add_argument(
        "--profile-cpu", action="store_true", help="profiled windows also record the serving thread's CUDA API calls"
    )
    p.add_argument(
        "--external-stream-gbps",
        type=float,
        default=0.0,
        help="diagnostic phase: ring traffic at this rate from a low-overhead thread, no plans",
    )
    p.add_argument("--external-chunk-mib", type=int, default=HarnessOptions.external_chunk_bytes >> 20)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    args = p.parse_args(argv)
    model = PRESETS[args.preset]
    changes = {
        k: v
        for k, v in (("num_layers", args.layers), ("tokens_per_rank", args.tokens), ("zipf_exponent", args.zipf))
        if v is not None
    }
    model = dataclasses.replace(model, seed=args.seed, **changes)
    throttle = HarnessOptions.throttle_bytes_per_s
    p2p = {}
    if args.p2p_json and os.path.exists(args.p2p_json):
        with open(args.p2p_json) as f:
            p2p = json.load(f)
    if args.throttle_gbps is not None:
        throttle = args.throttle_gbps * 1e9
    elif p2p.get("peak_gbps"):
        throttle = args.throttle_share * p2p["peak_gbps"] * 1e9
    pack = args.pack == "on" or (args.pack == "auto" and bool(p2p.get("recommend_pack_per_peer")))
    opts = HarnessOptions(
        world_size=args.world,
        device=args.device,
        model=model,
        warmup_steps=args.warmup_steps,
        prime_s=args.prime_s,
        idle_s=args.idle_s,
        throttled_s=args.throttled_s,
        unthrottled_s=args.unthrottled_s,
        isolated_s=args.isolated_s,
        soak_s=args.soak_s,
        min_phase_steps=args.min_phase_steps,
        experts_per_rank=args.experts_per_rank,
        isolated_experts_per_rank=args.isolated_experts_per_rank,
        throttle_bytes_per_s=throttle,
        chunk_bytes=args.chunk_mib << 20,
        max_ops_per_group=args.max_ops,
        throttled_chunk_bytes=args.throttled_chunk_mib << 20,
        pack_per_peer=pack,
        fence_steps=args.fence_steps,
        max_groups_in_flight=args.in_flight,
        sync_plans=args.sync_plans,
        hang_timeout_s=args.hang_timeout_s,
        expert_mode=args.expert_mode,
        log_level=args.log_level,
        switch_interval_s=args.switch_interval_s,
        side_max_ctas=args.side_max_ctas,
        profile_steps=args.profile_steps,
        profile_dir=args.profile_dir,
        profile_cpu=args.profile_cpu,
        external_stream_gbps=args.external_stream_gbps,
        external_chunk_bytes=args.external_chunk_mib << 20,
    )
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench.gpu.harness").setLevel(logging.INFO)
    os.environ.setdefault("EPLB_SERVICE_LOG_LEVEL", opts.log_level)
    summary = run_harness(opts)
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    brief = {
        k: summary.get(k)
        for k in ("complete", "hangs", "errors", "output_mismatches", "coordinator", "expert_mode", "soak")
    }
    print(json.dumps(brief, indent=2))
    ok = (
        summary.get("complete")
        and not summary["hangs"]
        and not summary["errors"]
        and summary.get("output_mismatches") == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
