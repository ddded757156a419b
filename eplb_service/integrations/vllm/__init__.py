"""eplb-service inside vLLM: the ``vllm.general_plugins`` entry point and its adapter.

- :mod:`.config`: the ``EPLB_SERVICE_*`` environment variables (the plugin is inert
  without ``EPLB_SERVICE_ENDPOINT``).
- :mod:`.adapter`: the one module that knows vLLM's attribute paths and versions.
- :mod:`.plugin`: ``register()`` (the entry point) and the per-worker binding that
  attaches an agent to vLLM's ``EplbState``.

Nothing here imports vLLM at module import time.
"""
