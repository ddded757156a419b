"""The agent's commit-kernel warm-up on a real GPU (one is enough).

Skipped without CUDA. On the device: ``python -m pytest -q tests/gpu``; the host time it saves
the serving thread is measured by ``python -m bench.gpu.commit_cold`` (a benchmark, not a test).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

pytestmark = pytest.mark.gpu


def test_warm_up_launches_each_copy_kind_once_per_process_and_the_commit_still_lands():
    from bench.serving_hooks import build_model, commit_now, one_layer_commit
    from eplb_service.worker_agent import staging

    device = torch.device("cuda")
    model, hooks, phy2log, spr = build_model(4, 16, 24, 4, 256, device)
    for k, row in enumerate(model.expert_weights[0][0]):
        row.fill_(k)
    action = one_layer_commit(model, phy2log, spr, 4)
    staged = action.weight_copies[0][2]
    staged.copy_(torch.arange(len(staged), device=device, dtype=staged.dtype)[:, None] + 100)
    staging._WARMED_COPY_KINDS.clear()
    kinds = {(t.dtype, t.dim()) for t in [action.weight_copies[0][0], action.phy2log_rows, action.log2phy_rows]}
    kinds.add((action.logcnt_rows.dtype, action.logcnt_rows.dim()))
    assert staging.warm_commit_kernels(action) == len(kinds)
    assert staging.warm_commit_kernels(action) == 0, "a second plan must not launch the warm-up again"
    before = model.phy2log.clone()
    commit_now(hooks, action, torch.cuda.synchronize)
    assert hooks.epoch == 1
    rows = action.weight_copies[0][1].cpu().numpy()
    live = model.expert_weights[0][0].float().cpu().numpy()
    assert np.array_equal(live[rows, 0], 100 + np.arange(len(rows))), "staged rows did not land at commit"
    assert not torch.equal(model.phy2log, before) and torch.equal(model.phy2log[0].cpu(), action.phy2log_rows[0].cpu())
