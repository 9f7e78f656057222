"""What the client commands (``moa bench``, ``moa eval --service``) say when the service refuses
them: a 401 or a 403 in a results table ("errors: 401: 2") tells a newcomer nothing about the
key they did not send, or the permission it lacks."""

from __future__ import annotations

import os

API_KEY_ENV = "MOA_API_KEY"


def api_key(given: str | None, env: str = API_KEY_ENV) -> str | None:
    """The key a client command sends: ``--api-key``, else the variable (``MOA_API_KEY``)."""
    return given or os.environ.get(env) or None


def auth_advice(status: int | str) -> str | None:
    """What a 401 or 403 from a moa service means and what to do about it (None for others)."""
    code = str(status)
    if code == "401":
        return (
            "401 means the service wants an API key (one exists in its key store): pass one with "
            f"--api-key KEY or {API_KEY_ENV}=KEY (`moa keys create NAME` makes one)"
        )
    if code == "403":
        return (
            "403 means the key was refused for this request: moa.detail (the per-call costs "
            "moa bench and moa eval read) needs a key made with `moa keys create NAME --detail`; "
            "a key's presets, models or budget may also exclude it (`moa keys show NAME`)"
        )
    return None
