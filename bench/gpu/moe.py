"""The harness's MoE stack: real dispatch/combine all-to-alls, experts where the maps say.

Per step, layer and rank: every token picks ``top_k`` logical experts; each (token,
expert) pair goes to a physical slot through the *live* maps (replica = pair index modulo
the replica count, like vLLM's kernel), its load is counted, the pairs are dispatched with
an all-to-all on the serving group, computed with the weight rows the destination rank
really holds (one grouped GEMM per weight matrix over the rank's local slots), sent back
with a second all-to-all, combined, and compared *exactly* with a reference computed from
the logical expert alone. Any wrong map, wrong row, torn commit or corrupted transfer is
an output mismatch.

Why exact comparison is meaningful here: weights and activations are small integers, so
every product and partial sum is an integer far below 2**24 (exact in the fp32 accumulators
of cuBLAS/CUTLASS, in any order, split-K included) and every value stored in bf16 is an
integer of magnitude <= 256 (exactly representable, no rounding anywhere). Two computations
of the same function agree bit for bit; different experts disagree almost surely.

Weights, a fixed function of (seed, layer, logical expert ``e``):
- per layer, base matrices ``B13 [2I, H]`` and ``B2 [H, I]`` with entries in {-1, 0, 1};
- per expert, sign vectors ``s_e [H]`` and ``u_e [H]`` in {-1, +1};
- ``W13_e = B13 * s_e[None, :]`` (vLLM's w13 layout ``[2I, H]``), ``W2_e = B2 * u_e[:, None]``.

Expert function: ``y = W2_e @ act(W13_e @ x)`` with ``act(g, v) = clamp(v, -1, 1) * [g mod 4 == 0]``
(``g``, ``v`` the two halves of the first product), so the reference can use the base
matrices: ``y = u_e * (B2 @ act(B13 @ (s_e * x)))``: no per-expert weights needed on the
checking rank. Token activations ``x`` are in {-1, 0, 1} with about 128 non-zeros per row,
so ``|W13_e @ x| <= 256``; ``act`` is in {-1, 0, 1} with about a quarter non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.placement import PlacementShape
from eplb_service.worker_agent.expert_model import ExpertModel, map_tensors


@dataclass(frozen=True)
class MoeConfig:
    """Shape of the harness's MoE stack (per EP rank where it says so).

    Attributes:
        num_layers: MoE layers with expert load balancing.
        num_logical: logical experts per layer.
        num_physical: physical slots per layer (logical + redundant); EP ranks divide it.
        hidden: ``H``, the model dimension.
        intermediate: ``I``, the MoE intermediate size (w13 is ``[2I, H]``, w2 ``[H, I]``).
        tokens_per_rank: tokens each rank routes per layer per step.
        top_k: experts per token.
        dtype: weight and activation dtype (``bfloat16`` on GPU, ``float32`` for CPU runs).
        zipf_exponent: expert popularity skew (0 = uniform).
        seed: weights and routing seed.
    """

    num_layers: int = 4
    num_logical: int = 512
    num_physical: int = 544
    hidden: int = 4096
    intermediate: int = 1024
    tokens_per_rank: int = 1024
    top_k: int = 10
    dtype: str = "bfloat16"
    zipf_exponent: float = 0.0
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bytes_per_expert(self) -> int:
        return 3 * self.hidden * self.intermediate * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def x_density(self) -> float:
        return min(1.0, 128.0 / self.hidden)


PRESETS = {
    # Qwen3.5-397B-A17B per rank: 512 experts + 32 redundant, hidden 4096, MoE intermediate 1024,
    # 10 routed experts per token, bf16; a few layers.
    "qwen35": MoeConfig(),
    "medium": MoeConfig(
        num_layers=2, num_logical=64, num_physical=72, hidden=1024, intermediate=512, tokens_per_rank=512, top_k=8
    ),
    "small": MoeConfig(
        num_layers=2, num_logical=16, num_physical=24, hidden=256, intermediate=128, tokens_per_rank=128, top_k=4
    ),
    "cpu": MoeConfig(
        num_layers=2,
        num_logical=8,
        num_physical=12,
        hidden=32,
        intermediate=16,
        tokens_per_rank=16,
        top_k=2,
        dtype="float32",
    ),
}


def _seed(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x7F4A7C15) & 0x7FFF_FFFF_FFFF
    return value


def activation(first: torch.Tensor, intermediate: int) -> torch.Tensor:
    """``act(g, v)`` on ``first [n, 2I]`` (``g`` = first half, ``v`` = second): values in {-1, 0, 1}."""
    gate, up = first[:, :intermediate], first[:, intermediate:]
    return up.clamp(-1, 1) * (torch.remainder(gate, 4) == 0).to(first.dtype)


class ExpertWeights:
    """The fixed weights of one layer: base matrices and per-expert sign vectors."""

    def __init__(self, cfg: MoeConfig, layer: int, device: torch.device) -> None:
        gen = torch.Generator(device=device)
        dtype = cfg.torch_dtype
        H, I, N = cfg.hidden, cfg.intermediate, cfg.num_logical
        gen.manual_seed(_seed(cfg.seed, layer, 1))
        self.b13 = torch.randint(-1, 2, (2 * I, H), generator=gen, device=device, dtype=torch.int8).to(dtype)
        gen.manual_seed(_seed(cfg.seed, layer, 2))
        self.b2 = torch.randint(-1, 2, (H, I), generator=gen, device=device, dtype=torch.int8).to(dtype)
        gen.manual_seed(_seed(cfg.seed, layer, 3))
        self.s = (torch.randint(0, 2, (N, H), generator=gen, device=device, dtype=torch.int8) * 2 - 1).to(dtype)
        gen.manual_seed(_seed(cfg.seed, layer, 4))
        self.u = (torch.randint(0, 2, (N, H), generator=gen, device=device, dtype=torch.int8) * 2 - 1).to(dtype)

    def rows(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Live rows for logical ``experts [n]``: ``(w13 [n, 2I, H], w2 [n, H, I])``, contiguous."""
        w13 = self.b13.unsqueeze(0) * self.s.index_select(0, experts).unsqueeze(1)
        w2 = self.b2.unsqueeze(0) * self.u.index_select(0, experts).unsqueeze(2)
        return w13.contiguous(), w2.contiguous()


def experts_grouped(
    xs: torch.Tensor, rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, intermediate: int, align: int = 16
) -> torch.Tensor:
    """Expert outputs for ``xs [n, H]`` sorted by local slot ``rows [n]`` (ascending), no host sync.

    Each slot's rows are placed at a multiple of ``align`` in a zero-padded buffer (the last
    group absorbs the slack), then one ``torch._grouped_mm`` per weight matrix.
    """
    n, hidden = xs.shape
    slots = w13.shape[0]
    counts = torch.bincount(rows, minlength=slots)
    padded = (counts + align - 1) // align * align
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    starts = torch.cumsum(counts, 0) - counts
    dest = padded_starts.index_select(0, rows) + (torch.arange(n, device=xs.device) - starts.index_select(0, rows))
    total = n + (align - 1) * slots
    total += (-total) % align
    buf = torch.zeros((total, hidden), dtype=xs.dtype, device=xs.device)
    buf.index_copy_(0, dest, xs)
    offs = padded_ends.to(torch.int32)
    offs[-1] = total
    first = torch._grouped_mm(buf, w13.transpose(1, 2), offs=offs)
    second = torch._grouped_mm(activation(first, intermediate), w2.transpose(1, 2), offs=offs)
    return second.index_select(0, dest)


def experts_loop(
    xs: torch.Tensor, rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, intermediate: int
) -> torch.Tensor:
    """The same as :func:`experts_grouped` with one GEMM pair per slot (one host sync)."""
    counts = torch.bincount(rows, minlength=w13.shape[0]).tolist()
    out = torch.empty((xs.shape[0], w2.shape[1]), dtype=xs.dtype, device=xs.device)
    begin = 0
    for slot, count in enumerate(counts):
        if count:
            seg = xs[begin : begin + count]
            out[begin : begin + count] = activation(seg @ w13[slot].T, intermediate) @ w2[slot].T
            begin += count
    return out


def select_expert_mode(cfg: MoeConfig, device: torch.device, requested: str = "auto") -> str:
    """``grouped`` when ``torch._grouped_mm`` runs here and matches the loop bit for bit, else ``loop``."""
    if requested in ("grouped", "loop"):
        return requested
    if device.type != "cuda" or cfg.dtype != "bfloat16" or not hasattr(torch, "_grouped_mm"):
        return "loop"
    try:
        weights = ExpertWeights(cfg, layer=10_000, device=device)
        experts = torch.arange(min(5, cfg.num_logical), device=device)
        w13, w2 = weights.rows(experts)
        gen = torch.Generator(device=device).manual_seed(1)
        rows = torch.sort(torch.randint(0, len(experts), (77,), generator=gen, device=device)).values
        xs = (
            torch.randint(-1, 2, (77, cfg.hidden), generator=gen, device=device)
            * (torch.rand((77, cfg.hidden), generator=gen, device=device) < cfg.x_density)
        ).to(w13.dtype)
        ok = torch.equal(
            experts_grouped(xs, rows, w13, w2, cfg.intermediate), experts_loop(xs, rows, w13, w2, cfg.intermediate)
        )
        return "grouped" if ok else "loop"
    except Exception:  # no kernel for this device or dtype
        return "loop"


class MoeStack:
    """One EP rank's layers: live weights and maps (an :class:`ExpertModel`) plus the checker.

    Args:
        cfg: the shape.
        rank, world_size: EP rank and size; the serving group is torch.distributed's default group.
        device: this rank's device.
        phy2log: ``[L, P]`` initial placement.
        expert_mode: ``grouped``, ``loop`` or ``auto`` (see :func:`select_expert_mode`).
    """

    def __init__(
        self,
        cfg: MoeConfig,
        rank: int,
        world_size: int,
        device: torch.device,
        phy2log: np.ndarray,
        expert_mode: str = "auto",
    ) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.shape = PlacementShape(cfg.num_layers, cfg.num_logical, cfg.num_physical, world_size)
        self.spr = self.shape.slots_per_rank
        if device.type == "cuda":
            # Split-K reductions in bf16 would round partial sums; keep them in fp32.
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        self.layers = [ExpertWeights(cfg, layer, device) for layer in range(cfg.num_layers)]
        first = rank * self.spr
        weights = []
        for layer, lw in enumerate(self.layers):
            experts = torch.from_numpy(np.ascontiguousarray(phy2log[layer, first : first + self.spr])).to(device)
            weights.append(list(lw.rows(experts)))
        width = self.shape.num_redundant + 1
        p2l, l2p, cnt = map_tensors(phy2log, cfg.num_logical, width, device)
        self.model = ExpertModel(
            expert_weights=weights, phy2log=p2l, log2phy=l2p, logcnt=cnt, rank=rank, num_ranks=world_size
        )
        self.expert_mode = select_expert_mode(cfg, device, expert_mode)
        pairs = cfg.tokens_per_rank * cfg.top_k
        self.load_pass = torch.zeros((cfg.num_layers, cfg.num_physical), dtype=torch.int64, device=device)
        self._ones = torch.ones(pairs, dtype=torch.int64, device=device)
        pair = torch.arange(pairs, device=device)
        self._pair_token = pair // cfg.top_k
        self._replica_base = self._pair_token + rank * cfg.tokens_per_rank + pair % cfg.top_k
        self._gen = torch.Generator(device=device)
        self._log_pop = self._popularity(device)

    def _popularity(self, device: torch.device) -> torch.Tensor | None:
        if self.cfg.zipf_exponent <= 0:
            return None
        rng = np.random.default_rng(self.cfg.seed)
        weights = np.empty(self.cfg.num_logical)
        weights[rng.permutation(self.cfg.num_logical)] = (
            1.0 / np.arange(1, self.cfg.num_logical + 1) ** self.cfg.zipf_exponent
        )
        return torch.from_numpy(np.log(weights / weights.sum())).to(device=device, dtype=torch.float32)

    def _route(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [T, H], experts [T, k] int64, gates [T, k] fp32)`` for this rank, step and layer."""
        cfg, dev, gen = self.cfg, self.device, self._gen
        gen.manual_seed(_seed(cfg.seed, step, layer, self.rank))
        T, H, N = cfg.tokens_per_rank, cfg.hidden, cfg.num_logical
        scores = torch.rand((T, N), generator=gen, device=dev)
        if self._log_pop is not None:  # Gumbel top-k: k distinct experts, drawn by popularity
            scores = self._log_pop - torch.log(-torch.log(scores.clamp_min(1e-12)))
        experts = scores.topk(cfg.top_k, dim=1).indices
        keep = torch.rand((T, H), generator=gen, device=dev) < cfg.x_density
        x = (torch.randint(-1, 2, (T, H), generator=gen, device=dev) * keep).to(cfg.torch_dtype)
        gates = torch.randint(1, 4, (T, cfg.top_k), generator=gen, device=dev).to(torch.float32)
        return x, experts, gates

    def _experts(self, layer: int, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.model.expert_weights[layer]
        if xs.shape[0] == 0:
            return torch.empty((0, self.cfg.hidden), dtype=xs.dtype, device=xs.device)
        if self.expert_mode == "grouped":
            return experts_grouped(xs, rows, w13, w2, self.cfg.intermediate)
        return experts_loop(xs, rows, w13, w2, self.cfg.intermediate)

    def forward(self, step: int) -> torch.Tensor:
        """One serving step over all layers; returns the number of mismatched tokens (device scalar).

        Also counts each pair's physical slot into :attr:`load_pass` ``[L, P]``.
        """
        cfg, world, spr, model = self.cfg, self.world, self.spr, self.model
        T, k, H = cfg.tokens_per_rank, cfg.top_k, cfg.hidden
        mismatches = torch.zeros((), dtype=torch.int64, device=self.device)
        for layer in range(cfg.num_layers):
            x, experts, gates = self._route(step, layer)
            flat = experts.reshape(-1)
            counts = model.logcnt[layer].index_select(0, flat)
            slots = model.log2phy[layer][flat, self._replica_base % counts]
            self.load_pass[layer].index_add_(0, slots, self._ones)
            order = torch.argsort(slots)
            sorted_slots = slots.index_select(0, order)
            send_counts = torch.bincount(torch.div(sorted_slots, spr, rounding_mode="floor"), minlength=world)
            send_x = x.index_select(0, self._pair_token.index_select(0, order))
            send_rows = torch.remainder(sorted_slots, spr).to(torch.int32)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts)
            splits = torch.cat([send_counts, recv_counts]).tolist()  # the one host sync per layer
            in_splits, out_splits = splits[:world], splits[world:]
            received = sum(out_splits)
            recv_x = torch.empty((received, H), dtype=x.dtype, device=x.device)
            dist.all_to_all_single(recv_x, send_x, out_splits, in_splits)
            recv_rows = torch.empty(received, dtype=torch.int32, device=x.device)
            dist.all_to_all_single(recv_rows, send_rows, out_splits, in_splits)
            rows = recv_rows.to(torch.int64)
            by_row = torch.argsort(rows, stable=True)
            computed = self._experts(layer, recv_x.index_select(0, by_row), rows.index_select(0, by_row))
            out_rows = torch.empty_like(computed)
            out_rows.index_copy_(0, by_row, computed)
            back = torch.empty((T * k, H), dtype=x.dtype, device=x.device)
            dist.all_to_all_single(back, out_rows, in_splits, out_splits)
            pairs_y = torch.empty_like(back)
            pairs_y.index_copy_(0, order, back)
            y = (pairs_y.view(T, k, H).float() * gates.unsqueeze(2)).sum(1)
            # the logical reference, from the base matrices and the experts' sign vectors
            lw = self.layers[layer]
            xr = x.repeat_interleave(k, dim=0) * lw.s.index_select(0, flat)
            ref_pairs = (activation(xr @ lw.b13.T, cfg.intermediate) @ lw.b2.T) * lw.u.index_select(0, flat)
            ref = (ref_pairs.view(T, k, H).float() * gates.unsqueeze(2)).sum(1)
            mismatches += (y != ref).any(dim=1).sum()
        return mismatches
