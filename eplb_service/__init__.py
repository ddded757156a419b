"""eplb-service: an asynchronous background expert-parallel load balancer for vLLM."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("eplb-service")
except _metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
