"""Integrations of eplb-service into serving engines (``vllm``)."""
