"""Cost of the serving-thread hooks, per call, on this machine's CPU (or a GPU if present).

    python bench/serving_hooks.py [--layers 60] [--physical 544] [--ranks 8] [--device cpu|cuda]

Prints a table: microseconds per call of ``after_step`` (load fold-in, and with a snapshot
every ``report_interval_steps``), ``before_step`` with nothing pending and with a vote in
flight before the fence, and a commit of a 1-layer plan (after the agent's kernel warm-up; the
first commit of a process is ``bench/gpu/commit_cold.py``'s). The step itself is not timed:
this is the overhead our hooks add to each serving step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.expert_model import ExpertModel, map_tensors
from eplb_service.worker_agent.schedule import build_schedule
from eplb_service.worker_agent.serving_hooks import CommitAction, CommitTicket, ServingHooks
from eplb_service.worker_agent.staging import StagingArea, prepare_commit, warm_commit_kernels


def timed(fn, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(0.99 * (len(samples) - 1))] * 1e6


def build_model(
    layers: int, logical: int, physical: int, ranks: int, row_bytes: int, device: torch.device
) -> tuple[ExpertModel, ServingHooks, np.ndarray, int]:
    """Rank 0's model (one bf16 weight tensor per layer) and its hooks; also ``bench/gpu/commit_cold.py``'s."""
    shape = PlacementShape(layers, logical, physical, ranks)
    phy2log = initial_phy2log(shape)
    spr = shape.slots_per_rank
    p2l, l2p, cnt = map_tensors(phy2log, shape.num_logical, shape.num_redundant + 1, device)
    weights = [[torch.zeros((spr, row_bytes // 2), dtype=torch.bfloat16, device=device)] for _ in range(layers)]
    model = ExpertModel(expert_weights=weights, phy2log=p2l, log2phy=l2p, logcnt=cnt, rank=0, num_ranks=ranks)
    hooks = ServingHooks(model, report_interval_steps=10, fence_steps=8, fence_timeout_s=5.0)
    return model, hooks, phy2log, spr


def one_layer_commit(model: ExpertModel, phy2log: np.ndarray, spr: int, ranks: int) -> CommitAction:
    """A plan that reverses rank 0's slots in layer 0, prepared as the agent prepares it."""
    new = phy2log[[0]].copy()
    new[0, :spr] = new[0, :spr][::-1]
    sched = build_schedule(phy2log[[0]], new, ranks)
    area = StagingArea(model, sched.per_rank[0])
    return prepare_commit(model, 1, [0], new, area)


def commit_now(hooks: ServingHooks, action: CommitAction, sync) -> float:
    """Host time of one commit at the next step boundary (the device idle before and after)."""
    ticket = CommitTicket(action=action)
    ticket.vote_entry_step = hooks.steps_done
    ticket.resolve(Decision.commit_at(hooks.steps_done, rank=0))
    hooks.ticket = ticket
    sync()
    t0 = time.perf_counter()
    hooks.before_step()
    elapsed = time.perf_counter() - t0
    sync()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--logical", type=int, default=512)
    ap.add_argument("--physical", type=int, default=544)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--row-bytes", type=int, default=4096, help="bytes per expert row in this benchmark")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, hooks, phy2log, spr = build_model(
        args.layers, args.logical, args.physical, args.ranks, args.row_bytes, device
    )
    load = torch.ones((args.layers, args.physical), dtype=torch.int64, device=device)

    def after():
        hooks.after_step(load)
        while hooks.snapshots:  # play the agent thread: hand buffers back
            hooks.free_buffers.append(hooks.snapshots.popleft().buffer_index)

    class WithoutRing(ServingHooks):
        """``after_step`` as it was before the step-clock ring (protocol 1), for the side-by-side row."""

        def after_step(self, load_pass):
            if load_pass is not None:
                self.load_acc.add_(load_pass)
            self.steps_done += 1
            if self.steps_done - self._acc_begin >= self.report_interval_steps:
                self._snapshot()

    old = WithoutRing(model, report_interval_steps=10, fence_steps=8, fence_timeout_s=5.0)

    def after_old():
        old.after_step(load)
        while old.snapshots:
            old.free_buffers.append(old.snapshots.popleft().buffer_index)

    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # interleaved twice: the ratio between the two rows is what counts
        rows.append(("after_step (fold load, snapshot every 10, step-clock ring)",) + timed(after, args.n))
        rows.append(("after_step without the step-clock ring (protocol 1)",) + timed(after_old, args.n))
    rows.append(("before_step, nothing pending",) + timed(hooks.before_step, args.n))
    action = one_layer_commit(model, phy2log, spr, args.ranks)
    ticket = CommitTicket(action=action)
    ticket.vote_entry_step = 10**9  # a vote in flight, fence far away
    hooks.ticket = ticket
    rows.append(("before_step, vote in flight (before fence)",) + timed(hooks.before_step, args.n))
    warm_commit_kernels(action)  # as the agent does when it arms the commit
    commits = sorted(commit_now(hooks, action, sync) for _ in range(200))
    rows.append(
        (
            f"commit of 1 layer ({len(action.weight_copies[0][1])} rows, host time)",
            statistics.median(commits) * 1e6,
            commits[int(0.99 * (len(commits) - 1))] * 1e6,
        )
    )
    print(
        f"serving hooks on {device} ({torch.__version__}), shape L={args.layers} P={args.physical} ranks={args.ranks}\n"
    )
    print("| hook | p50 µs | p99 µs |\n|---|---:|---:|")
    for name, p50, p99 in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
