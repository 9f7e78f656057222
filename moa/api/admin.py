"""``/admin/keys``: the admin HTTP API over the API keys, and the admin key that guards it."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from moa.api.body import parse, read_json
from moa.api.errors import ApiError
from moa.auth import Authenticator
from moa.config import ConfigError
from moa.keys_admin import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_MIN_CHARS,
    VERBS,
    NewKey,
    admin_key_matches,
    change_status,
    create_key,
    key_row,
    key_rows,
    spent_now,
)
from moa.state import KeyExists, StateStore


class Admin:
    """``/admin/keys``: the admin HTTP API, guarded by the admin key (``MOA_ADMIN_KEY``). It
    exists only when that key is set and the service has a state store; otherwise every
    ``/admin`` path is a 404, like any unknown path."""

    def __init__(
        self, store: StateStore, admin_key: str, auth: Authenticator | None, max_body_bytes: int
    ) -> None:
        self.store, self._admin_key, self.auth, self.max_body_bytes = store, admin_key, auth, max_body_bytes

    def guard(self, request: Request) -> None:
        if not admin_key_matches(self._admin_key, request.headers.get("authorization")):
            raise ApiError(
                401,
                "This route needs the admin key: 'Authorization: Bearer <MOA_ADMIN_KEY>'.",
                "invalid_request_error",
                "invalid_api_key",
            )

    def _changed(self) -> None:
        if self.auth is not None:
            self.auth.forget()

    async def create(self, request: Request) -> JSONResponse:
        self.guard(request)
        spec = parse(NewKey, await read_json(request, self.max_body_bytes))
        try:
            key, record = await create_key(self.store, spec)
        except KeyExists as e:
            raise ApiError(409, str(e), "invalid_request_error", "key_exists", "name") from None
        self._changed()
        # The key leaves once, in this response; nothing between here and the client keeps it.
        body = {"key": key, **key_row(record, 0)}
        return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})

    async def list_keys(self, request: Request) -> dict[str, Any]:
        self.guard(request)
        return {"object": "list", "data": await key_rows(self.store)}

    async def show(self, request: Request, name: str) -> dict[str, Any]:
        self.guard(request)
        record = await self.store.key_by_name(name)
        if record is None:
            raise ApiError(404, f"no key named {name!r}", "invalid_request_error", "key_not_found")
        return key_row(record, await spent_now(self.store, record))

    async def change(self, request: Request, name: str, verb: str) -> dict[str, Any]:
        self.guard(request)
        if verb not in VERBS:
            raise ApiError(404, f"unknown action {verb!r}", "invalid_request_error", "not_found")
        done = await change_status(self.store, name, verb)
        if done.outcome == "missing":
            raise ApiError(404, f"no key named {name!r}", "invalid_request_error", "key_not_found")
        if done.outcome == "revoked":
            raise ApiError(409, f"key {name!r} {done.reason}", "invalid_request_error", "key_revoked")
        self._changed()
        assert done.record is not None
        return key_row(done.record, await spent_now(self.store, done.record))


def admin_key_from_env() -> str | None:
    """The admin key, only ever from the environment; a short one is refused, not trusted."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip() or None
    if key is not None and len(key) < ADMIN_KEY_MIN_CHARS:
        raise ConfigError(
            f"{ADMIN_KEY_ENV} is shorter than {ADMIN_KEY_MIN_CHARS} characters: use a random one "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


def add_admin_routes(app: FastAPI, admin: Admin) -> None:
    app.add_api_route("/admin/keys", admin.create, methods=["POST"])
    app.add_api_route("/admin/keys", admin.list_keys, methods=["GET"])
    app.add_api_route("/admin/keys/{name}", admin.show, methods=["GET"])
    app.add_api_route("/admin/keys/{name}/{verb}", admin.change, methods=["POST"])
