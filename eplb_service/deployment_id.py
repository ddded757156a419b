"""What a deployment id may be: the one check the wire format, the vLLM plugin's
``EPLB_SERVICE_DEPLOYMENT`` and the agent share.

Its own module, with no imports, because the plugin reads its environment in every vLLM
process before anything heavy (numpy, torch) may be imported.
"""

from __future__ import annotations

DEPLOYMENT_ID_MAX_CHARS = 128
DEPLOYMENT_ID_PATTERN = "^[!-~]*$"
"""Printable ASCII without spaces: the id goes into log lines and the status table as it is."""


def deployment_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a deployment id (naming it and what is expected), or None."""
    if not value:
        return f"deployment id {value!r} is empty; expected 1..{DEPLOYMENT_ID_MAX_CHARS} characters"
    if len(value) > DEPLOYMENT_ID_MAX_CHARS:
        return f"deployment id {value!r} has {len(value)} characters; expected at most {DEPLOYMENT_ID_MAX_CHARS}"
    if not all("!" <= ch <= "~" for ch in value):
        return (
            f"deployment id {value!r} has characters other than printable ASCII; expected letters, digits and "
            "punctuation, no spaces"
        )
    return None
