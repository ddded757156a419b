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
        self.init_log2phy, self.init_logcnt = l2p.numpy().copy(), cnt.numpy().copy()
        self.ref_sent = np.zeros((spec.steps, cfg.num_layers, spec.world_size), dtype=np.int64)
        self.capacity = cfg.tokens_per_rank * cfg.top_k
        self.mismatches = 0
        self.recv_counts = np.zeros((spec.steps, cfg.num_layers), dtype=np.int64)
        self.step_times = np.zeros(spec.steps, dtype=np.float64)
        self._pop_cache: dict[tuple[int, int], np.ndarray] = {}
        # numpy views of the live tensors (CPU tensors share their memory with these): the agent
        # writes maps and rows in place and never reassigns them (``ExpertModel``), so a view
        # made once always reads what serving would. Small arrays cost numpy about a microsecond
        # an operation where torch takes 5-20: the forward pass below was 7 ms a step in torch,
        # and with 4-8 ranks sharing 2 cores that CPU set the pace of every simulated deployment.
        self._maps = (self.model.log2phy.numpy(), self.model.logcnt.numpy())
        self._rows = [[t.numpy() for t in layer] for layer in self.model.expert_weights]
        self._load = self.load_pass.numpy()
        self._ref_w, self._ref_b = self.ref_w.numpy(), self.ref_b.numpy()
        # The all-to-all buffers, reused every layer: ``[world, capacity, H + 1]``, the last
        # column the local row (or -1 for padding), and ``[world, capacity, H]`` back.
        self._send, self._recv = (torch.empty((self.world, self.capacity, cfg.hidden + 1)) for _ in range(2))
        self._out, self._back = (torch.empty((self.world, self.capacity, cfg.hidden)) for _ in range(2))

    def _popularity(self, layer: int, step: int) -> np.ndarray:
        """``[N_log]`` probabilities of ``layer`` at ``step``, cached while they hold."""
        key = (layer, self.cfg.popularity_key(step))
        if key not in self._pop_cache:
            self._pop_cache = {k: v for k, v in self._pop_cache.items() if k[1] >= key[1]}
            self._pop_cache[key] = popularity(self.cfg, self.spec.seed, layer, step)
        return self._pop_cache[key]

    def forward(self, step: int) -> None:
        cfg, world, spr = self.cfg, self.world, self.spr
        tokens, top_k, hidden = cfg.tokens_per_rank, cfg.top_k, cfg.hidden
        rng = np.random.default_rng([self.spec.seed, step, self.rank])
        x = rng.integers(-3, 4, (tokens, hidden)).astype(np.float32)
        # replica = token index mod count, as vLLM's kernel picks it
        pick = (np.arange(tokens) + self.rank * tokens)[:, None] + np.arange(top_k)[None, :]
        if top_k > cfg.num_logical:  # as torch.multinomial refused it: there are not that many distinct experts
            raise ValueError(f"top_k={top_k} distinct experts per token, but the model has {cfg.num_logical}")
        log2phy, logcnt = self._maps
        send, recv, out, back = self._send.numpy(), self._recv.numpy(), self._out.numpy(), self._back.numpy()
        for layer in range(cfg.num_layers):
            # top_k distinct experts per token drawn by popularity, without replacement (as
            # torch.multinomial does): the first k to arrive in a race of exponential clocks
            # with rates the popularity (an expert a trace never saw arrives never: rate 0)
            with np.errstate(divide="ignore"):
                arrivals = rng.standard_exponential((tokens, cfg.num_logical)) / self._popularity(layer, step)
            experts = np.argsort(arrivals, axis=1)[:, :top_k]
            gates = rng.integers(1, 4, (tokens, top_k)).astype(np.float32)
            # logical -> physical through the live maps
            slots = log2phy[layer][experts, pick % logcnt[layer][experts]]
            self._load[layer] += np.bincount(slots.reshape(-1), minlength=self._load.shape[1])
            initial = self.init_log2phy[layer][experts, pick % self.init_logcnt[layer][experts]]
            self.ref_sent[step, layer] = np.bincount((initial // spr).reshape(-1), minlength=world)
            dst = (slots // spr).reshape(-1)
            rows = (slots % spr).reshape(-1)
            # fixed-capacity all-to-all, each destination's pairs in token order
            order = np.argsort(dst, kind="stable")
            per_dst = np.bincount(dst, minlength=world)
            to = dst[order]
            pos = np.arange(dst.size) - (np.cumsum(per_dst) - per_dst)[to]
            send.fill(0.0)
            send[:, :, -1] = -1
            send[to, pos, :-1] = np.repeat(x, top_k, axis=0)[order]
            send[to, pos, -1] = rows[order]
            dist.all_to_all_single(self._recv, self._send)
            valid = recv[:, :, -1] >= 0
            self.recv_counts[step, layer] = int(valid.sum())
            live_w, live_b = self._rows[layer]
            got_rows = recv[:, :, -1][valid].astype(np.int64)
            w = live_w[got_rows].reshape(-1, hidden, hidden)
            out.fill(0.0)
            out[valid] = np.matmul(recv[:, :, :-1][valid][:, None, :], w)[:, 0] + live_b[got_rows]
            dist.all_to_all_single(self._back, self._out)
            y_pairs = np.empty((dst.size, hidden), dtype=np.float32)
            y_pairs[order] = back[to, pos]
            y = (y_pairs.reshape(tokens, top_k, hidden) * gates[:, :, None]).sum(1)
            # the reference, from the logical experts' own weights (integers: exact in float32)
            ref_y = np.matmul(x[:, None, None, :], self._ref_w[layer][experts])[:, :, 0] + self._ref_b[layer][experts]
            ref = (ref_y * gates[:, :, None]).sum(1)
            self.mismatches += int((y != ref).any(axis=1).sum())
            x = np.remainder(ref, 7) - 3

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
