"""Worker extension for the e2e test (``LLM(worker_extension_cls=...)``): read the
plugin's state in each worker, and perturb one expert for the control run."""

from __future__ import annotations

import torch


class EplbTestExtension:
    def _binding(self):
        from eplb_service.integrations.vllm.plugin import binding_of

        binding = binding_of(self.model_runner.eplb_state)
        if binding is None:
            raise RuntimeError("the eplb-service plugin did not attach in this worker")
        return binding

    def eplb_status(self) -> dict:
        return self._binding().status()

    def eplb_status_to_file(self, directory: str) -> None:
        """Write :meth:`eplb_status` to ``directory/worker-<rank>.json``: ``vllm serve``'s
        ``/collective_rpc`` runs on every DP engine but answers with the first engine's results only
        (vLLM 0.32 ``v1/engine/core_client.py:1699-1701``)."""
        import json
        import os

        status = self.eplb_status()
        with open(os.path.join(directory, f"worker-{status['rank']}.json"), "w") as f:
            json.dump(status, f)

    def eplb_profile_step(self) -> None:
        """The EPLB step vLLM's profile run makes (``_dummy_run(is_profile=True)``): it must
        reach vLLM's own profile-time rearrangement, which reserves the transfer memory."""
        self.model_runner.eplb_step(is_dummy=True, is_profile=True)

    def eplb_scale_expert(self, layer: int, expert: int, factor: float) -> int:
        """Multiply every local replica of logical ``expert`` in ``layer`` by ``factor``; returns rows touched.

        The originals are kept so that :meth:`eplb_restore_experts` can put them back. The
        arguments may come as strings (``vllm serve``'s ``/collective_rpc`` passes only strings).
        """
        layer, expert, factor = int(layer), int(expert), float(factor)
        binding = self._binding()
        model = binding.agent.model
        spr = model.phy2log.shape[1] // model.num_ranks
        local = model.phy2log[layer, model.rank * spr : (model.rank + 1) * spr]
        rows = torch.nonzero(local == expert).flatten()
        saved = self.__dict__.setdefault("_eplb_saved_rows", [])
        for tensor in model.expert_weights[layer]:
            saved.append((tensor, rows, tensor[rows].clone()))
            tensor[rows] = tensor[rows] * factor
        return int(rows.numel())

    def eplb_restore_experts(self) -> None:
        for tensor, rows, values in self.__dict__.pop("_eplb_saved_rows", []):
            tensor[rows] = values

    def eplb_maps_consistent(self) -> dict:
        """This worker's live maps, and whether vLLM's ``logical_to_physical_map`` and
        ``logical_replica_count`` are exactly what its ``physical_to_logical_map`` implies."""
        from eplb_service.placement import logical_replica_count, logical_to_physical

        view = self._binding().view
        phy2log = view.phy2log.cpu().numpy()
        num_logical = view.shape.num_logical
        width = int(view.log2phy.shape[2])
        return {
            "phy2log": phy2log.tolist(),
            "log2phy_ok": bool((view.log2phy.cpu().numpy() == logical_to_physical(phy2log, num_logical, width)).all()),
            "logcnt_ok": bool((view.logcnt.cpu().numpy() == logical_replica_count(phy2log, num_logical)).all()),
        }
