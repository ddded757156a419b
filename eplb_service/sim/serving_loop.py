"""One simulated EP rank: a MoE serving loop with real collectives and a real agent.

Per step and layer: route this rank's tokens to logical experts (skewed, drifting
popularity), map each (token, expert) to a physical slot through the *live* maps (the
replica is picked by token index modulo the replica count, like vLLM's kernel), count
the load per slot, dispatch with an all-to-all on the *serving* gloo group, compute each
token on the rank whose live weight rows hold that slot, send results back, combine,
and compare with a reference computed from the logical experts. Any difference is an
output mismatch: a wrong map, a wrong row, or a torn commit.

The serving group is this process's default group (as vLLM's is); the agent's side
communicator is a separate gloo group on the coordinator's store.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from eplb_service import logutil
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.sim.processes import end_with_parent
from eplb_service.sim.workload import SimModelConfig, expert_weights, popularity
from eplb_service.worker_agent.agent import WorkerAgent
from eplb_service.worker_agent.expert_model import ExpertModel, map_tensors
from eplb_service.worker_agent.transport_gloo import GlooTransport


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world_size: int
    steps: int
    seed: int
    model: SimModelConfig
    coordinator_endpoint: str
    serving_store_port: int
    step_sleep_s: float = 0.0
    idle_at_step: int | None = None
    """Fault scenarios: every rank stops stepping here for ``idle_s`` (an idle engine)."""
    idle_s: float = 0.0
    extra_steps: int = 0
    """Fault scenarios: this rank's step clock starts this many steps ahead (a dummy step
    counted on one rank alone)."""
    log_format: str = "text"
    """``text`` or ``json``: the coordinator process's (:func:`~eplb_service.logutil.active_format`)."""
    deployment: str = ""
    """The agents' deployment id (``Hello.deployment``; ``""``: unknown)."""
    welcome_timeout_s: float = 60.0
    """Longest a rank waits for its agent's ``Welcome`` before it serves anyway (a refused deployment)."""


class SimServingRank:
    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        cfg = spec.model
        self.cfg = cfg
        self.rank, self.world = spec.rank, spec.world_size
        num_physical = cfg.num_logical + cfg.num_redundant
        self.shape = PlacementShape(cfg.num_layers, cfg.num_logical, num_physical, spec.world_size)
        self.spr = self.shape.slots_per_rank
        phy2log = initial_phy2log(self.shape)
        p2l, l2p, cnt = map_tensors(phy2log, cfg.num_logical, cfg.num_redundant + 1)
        # logical reference weights [L, N, H, H] and [L, N, H]
        ref = [
            [expert_weights(cfg, spec.seed, layer, e) for e in range(cfg.num_logical)]
            for layer in range(cfg.num_layers)
        ]
        self.ref_w = torch.stack([torch.stack([w for w, _ in layer]) for layer in ref])
        self.ref_b = torch.stack([torch.stack([b for _, b in layer]) for layer in ref])
        first = self.rank * self.spr
        weights = []
        for layer in range(cfg.num_layers):
            experts = phy2log[layer, first : first + self.spr]
            w = self.ref_w[layer, experts].reshape(self.spr, -1).clone()
            b = self.ref_b[layer, experts].clone()
            weights.append([w, b])
        self.model = ExpertModel(
            expert_weights=weights, phy2log=p2l, log2phy=l2p, logcnt=cnt, rank=self.rank, num_ranks=self.world
        )
        self.load_pass = torch.zeros((cfg.num_layers, num_physical), dtype=torch.int64)
        # The reference the plot compares with: where the same tokens would have gone under
        # the initial maps, had nothing been rebalanced.
        self.init_log2phy, self.init_logcnt = l2p.clone(), cnt.clone()
        self.ref_sent = np.zeros((spec.steps, cfg.num_layers, spec.world_size), dtype=np.int64)
        self.capacity = cfg.tokens_per_rank * cfg.top_k
        self.mismatches = 0
        self.recv_counts = np.zeros((spec.steps, cfg.num_layers), dtype=np.int64)
        self.step_times = np.zeros(spec.steps, dtype=np.float64)
        self._pop_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _popularity(self, layer: int, step: int) -> torch.Tensor:
        key = (layer, self.cfg.popularity_key(step))
        if key not in self._pop_cache:
            self._pop_cache = {k: v for k, v in self._pop_cache.items() if k[1] >= key[1]}
            self._pop_cache[key] = torch.from_numpy(popularity(self.cfg, self.spec.seed, layer, step))
        return self._pop_cache[key]

    def forward(self, step: int) -> None:
        cfg, world, spr = self.cfg, self.world, self.spr
        gen = torch.Generator().manual_seed(((self.spec.seed * 7919 + step) * 1031 + self.rank) & 0x7FFFFFFF)
        tokens = cfg.tokens_per_rank
        x = torch.randint(-3, 4, (tokens, cfg.hidden), generator=gen).to(torch.float32)
        token_ids = torch.arange(tokens) + self.rank * tokens
        for layer in range(cfg.num_layers):
            experts = torch.multinomial(
                self._popularity(layer, step).expand(tokens, -1), cfg.top_k, replacement=False, generator=gen
            )
            gates = torch.randint(1, 4, (tokens, cfg.top_k), generator=gen).to(torch.float32)
            # logical -> physical through the live maps (replica = token index mod count)
            counts = self.model.logcnt[layer][experts]
            replica = (token_ids[:, None] + torch.arange(cfg.top_k)[None, :]) % counts
            slots = self.model.log2phy[layer][experts, replica]
            self.load_pass[layer].scatter_add_(0, slots.reshape(-1), torch.ones(slots.numel(), dtype=torch.int64))
            initial = self.init_log2phy[layer][
                experts, (token_ids[:, None] + torch.arange(cfg.top_k)[None, :]) % self.init_logcnt[layer][experts]
            ]
            self.ref_sent[step, layer] = torch.bincount((initial // spr).reshape(-1), minlength=world).numpy()
            dst = (slots // spr).reshape(-1)
            rows = (slots % spr).reshape(-1)
            flat_x = x.repeat_interleave(cfg.top_k, dim=0)
            # fixed-capacity all-to-all: [world, capacity, H + 1], last column = local row or -1
            order = torch.argsort(dst, stable=True)
            per_dst = torch.bincount(dst, minlength=world)
            starts = torch.cumsum(per_dst, 0) - per_dst
            pos = torch.arange(dst.numel()) - starts[dst[order]]
            send = torch.zeros((world, self.capacity, cfg.hidden + 1), dtype=torch.float32)
            send[:, :, -1] = -1
            send[dst[order], pos, :-1] = flat_x[order]
            send[dst[order], pos, -1] = rows[order].to(torch.float32)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            valid = recv[:, :, -1] >= 0
            self.recv_counts[step, layer] = int(valid.sum())
            out = torch.zeros((world, self.capacity, cfg.hidden), dtype=torch.float32)
            live_w, live_b = self.model.expert_weights[layer]
            got_rows = recv[:, :, -1][valid].to(torch.int64)
            w = live_w[got_rows].view(-1, cfg.hidden, cfg.hidden)
            out[valid] = torch.bmm(recv[:, :, :-1][valid].unsqueeze(1), w).squeeze(1) + live_b[got_rows]
            back = torch.empty_like(out)
            dist.all_to_all_single(back, out)
            y_pairs = torch.empty((dst.numel(), cfg.hidden), dtype=torch.float32)
            y_pairs[order] = back[dst[order], pos]
            y = (y_pairs.view(tokens, cfg.top_k, cfg.hidden) * gates[:, :, None]).sum(1)
            ref_w = self.ref_w[layer][experts]  # [T, k, H, H]
            ref_y = torch.einsum("th,tkhj->tkj", x, ref_w) + self.ref_b[layer][experts]
            ref = (ref_y * gates[:, :, None]).sum(1)
            self.mismatches += int((y != ref).any(dim=1).sum())
            x = torch.remainder(ref, 7) - 3

    def run(self, agent: WorkerAgent, progress=None) -> None:
        hooks = agent.hooks
        hooks.steps_done += self.spec.extra_steps
        for step in range(self.spec.steps):
            if step == self.spec.idle_at_step:
                time.sleep(self.spec.idle_s)
            t0 = time.perf_counter()
            hooks.before_step()
            self.forward(step)
            hooks.after_step(self.load_pass)
            self.load_pass.zero_()
            self.step_times[step] = time.perf_counter() - t0
            if self.spec.step_sleep_s:
                time.sleep(self.spec.step_sleep_s)
            if progress is not None and self.rank == 0 and step % 50 == 0:
                progress.put(("step", step, self.mismatches))


def run_rank(spec: RankSpec, results, progress=None) -> None:
    """Process entry point of one simulated rank: its log lines in the coordinator's format,
    tagged with the rank; an exception that ends it is logged there too, not printed as text.

    Ctrl-C reaches every process of the terminal's group: a rank ignores it and is stopped by the
    simulation's process, which handles it (before, each rank printed a KeyboardInterrupt
    traceback); and a rank ends with that process, however it ends (:func:`end_with_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent()
    # The coordinator's format (its --log-format reaches no variable a spawned child reads); the
    # level from EPLB_SERVICE_LOG_LEVEL, any case as documented, else WARNING (ranks say little).
    try:
        logutil.configure(os.environ.get(logutil.LOG_LEVEL_ENV) or "WARNING", spec.log_format, tag=f"rank {spec.rank}")
    except ValueError:  # the coordinator's --log-level won over a bad variable: it is not this rank's to refuse
        logutil.configure("WARNING", spec.log_format, tag=f"rank {spec.rank}")
    try:
        _run_rank(spec, results, progress)
    except Exception:
        logutil.rank_logger(__name__, spec.rank).exception("stopped by an exception")
        sys.exit(1)  # multiprocessing prints no traceback for SystemExit; the exit code is as before
    _exit_once_reported(results, progress)


def _exit_once_reported(results, progress) -> NoReturn:
    """End this rank's process as soon as its result is in the pipe and its log lines are out.

    Left to the interpreter, the process went on collecting its whole heap at shutdown (torch's
    modules: gdb showed ``Py_FinalizeEx`` in the garbage collector) for 4-9 s after the result
    was sent when 8 ranks exited together on 2 cores, while the parent waited on the joins and
    the run's last lines were silence. Nothing left needs finalizing: the serving group is
    destroyed, the agent stopped, its gloo group torn down aside (a thread that may still hold
    it is why :func:`~eplb_service.worker_agent.transport_gloo.finish_teardowns` exists, and
    ``os._exit`` runs no C++ destructor that could end the process on it)."""
    results.close()
    results.join_thread()  # the result is in the pipe before the process goes
    if progress is not None:
        progress.cancel_join_thread()  # a step count the parent no longer reads is not worth a wait
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(spec: RankSpec, results, progress=None) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore(
        "127.0.0.1", spec.serving_store_port, spec.world_size, False, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("serving", store),
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    sim = SimServingRank(spec)
    agent = WorkerAgent(sim.model, spec.coordinator_endpoint, GlooTransport(), deployment=spec.deployment).start()
    # Serve only once every agent is registered, so load is reported from the first step.
    deadline = time.monotonic() + spec.welcome_timeout_s
    while not agent.welcomed and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.barrier()
    error = None
    try:
        sim.run(agent, progress)
        dist.barrier()
    except Exception as exc:  # report, do not hang the parent
        error = f"rank {spec.rank}: {type(exc).__name__}: {exc}"
        logutil.rank_logger(__name__, spec.rank).exception("serving loop failed")
    time.sleep(0.5)  # let the agent report the last commit before it stops
    agent_alive = agent._thread is not None and agent._thread.is_alive()
    agent.stop()
    results.put(
        {
            "rank": spec.rank,
            "mismatches": sim.mismatches,
            "recv_counts": sim.recv_counts.tolist(),
            "step_time_p50_ms": float(np.percentile(sim.step_times, 50) * 1e3),
            "step_time_p99_ms": float(np.percentile(sim.step_times, 99) * 1e3),
            "commit_stall_max_us": agent.hooks.max_stall_s * 1e6,
            "epoch": agent.hooks.epoch,
            "agent_stats": dict(agent.stats),
            "error": error,
            "phy2log": sim.model.phy2log.numpy().tolist(),
            "commits": list(agent.hooks.commit_log),
            "agent_thread_alive": agent_alive,
            "ref_sent": sim.ref_sent.tolist(),
            "steps_done": agent.hooks.steps_done,
        }
    )
    dist.destroy_process_group()
