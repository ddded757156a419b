"""GPU EP-serving harness of eplb-service (see ``bench/run_gpu_suite.sh`` and ``bench/RESULTS.md``).

- :mod:`.moe`: the MoE serving stack with real all-to-alls and an exact output check;
- :mod:`.churn`: the rearrangement plans the harness drives through the real coordinator;
- :mod:`.sync_baseline`: stop-the-world rearrangement on the serving group (vLLM sync mode);
- :mod:`.harness`: one process per GPU, the phases, the watchdog, the summary;
- :mod:`.control`: what the harness's processes share (phase switches, step counts), by name;
- :mod:`.packed_transport`: the side transport with each peer's ops packed into one (``--pack on``);
- :mod:`.p2p`: the side communicator's correctness, abort/rebuild and peer-to-peer peak;
- :mod:`.report`: JSON to the markdown table.

Everything also runs on CPU (gloo, float32, tiny shapes) so the logic can be tested
without a GPU.
"""
