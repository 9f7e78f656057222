"""The simulator's ASGI app: the three providers' routes, fault injection, pacing, admin API.

A bare ASGI callable rather than a framework app: benchmarks push hundreds of requests per second
through it, and it needs direct control of the connection (watching for disconnects while it
sleeps, and cutting a stream without its terminal events).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError

from moa.simulator.anthropic_wire import AnthropicWire
from moa.simulator.embed_wire import gemini_embeddings, openai_embeddings
from moa.simulator.gemini_wire import GeminiWire
from moa.simulator.llamacpp_wire import LlamaCppWire, listing_entry, ollama_entry, props
from moa.simulator.openai_wire import OpenAIWire
from moa.simulator.profile import (
    Faults,
    FaultSpec,
    HangFault,
    RateFault,
    SimProfile,
    SlowFault,
    StallFault,
)
from moa.simulator.state import GenerationBill, SimState
from moa.simulator.wire import (
    BadRequest,
    Completion,
    Err,
    SimRequest,
    Wire,
    answer,
    context_overflow,
    dumps,
    is_invalid_key,
    loads,
    prompt_tokens,
    random_id,
)
from moa.textcheck import first_unencodable
from moa.tokens import approx_tokens

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# Models listed by the models endpoints besides those named in the profile or already called.
KNOWN_MODELS = (
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4o-mini",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
)
_ERROR_FAULTS = {"error_429": Err.RATE_LIMIT, "error_500": Err.SERVER, "error_503": Err.UNAVAILABLE}
# Faults that spoil the response body: the request does not count as completed.
_BROKEN_BODY = frozenset({"malformed_json", "wrong_content_type", "cut_stream"})
_MAX_BODY = 32 * 1024 * 1024
_MALFORMED_PREFIX = b"{'simulator': malformed, "
_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>Bad Gateway</h1><p>The upstream server returned an invalid response "
    b"(simulated).</p></body></html>\n"
)

OPENAI, ANTHROPIC, GEMINI = OpenAIWire(), AnthropicWire(), GeminiWire()
# The OpenAI protocol as llama.cpp's llama-server speaks it, for models profiled as one.
LLAMACPP = LlamaCppWire()

# Set while a request deliberately leaves its response unfinished (a cut stream, a shutdown), so
# uvicorn's complaint about that is dropped; real errors are still logged.
_CUTTING: contextvars.ContextVar[bool] = contextvars.ContextVar("moa_simulator_cutting", default=False)


class _QuietDeliberateCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_CUTTING.get() and "ASGI callable returned without" in str(record.msg))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDeliberateCuts) for f in logger.filters):
        logger.addFilter(_QuietDeliberateCuts())


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class _DisconnectWatcher:
    """Cancels the request's task when the client disconnects, so sleeps and hangs end promptly.

    Started once the body is read (uvicorn's ``receive`` then blocks until the connection drops);
    ``finished`` is set before the last send so a disconnect after the answer cancels nothing.
    """

    __slots__ = ("_target", "_task", "finished", "fired")

    def __init__(self, receive: Receive, target: asyncio.Task[Any]) -> None:
        self.fired = False
        self.finished = False
        self._target = target
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finished:
            self.fired = True
            self._target.cancel()

    def stop(self) -> None:
        self.finished = True
        self._task.cancel()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise BadRequest("Request body too large.")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SimulatorApp:
    """ASGI callable; ``state`` holds the live profile and counters (see ``moa.simulator.state``)."""

    def __init__(self, profile: SimProfile) -> None:
        self.state = SimState(profile)
        self._active: set[asyncio.Task[Any]] = set()
        self._closing = False
        _install_log_filter()

    def close_requests(self) -> None:
        """Make every request in progress end now (call in the server's loop, before shutting down).

        Waiting requests answer 503, streams are cut; without this a hanging request would hold
        the server's graceful shutdown until its timeout.
        """
        self._closing = True
        for task in self._active:
            task.cancel()

    def _headers(self, wire: Wire, request_id: str, service_s: float = 0.0) -> Headers:
        """A response's own headers: its request id, and what it says of the time spent on it."""
        service = wire.service_headers(service_s, self.state.profile.simulator_service_header)
        return [*wire.request_id_headers(request_id), *service]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                await self._route(scope, receive, send)
            except _ClientGone:
                return
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST":
            if path == "/v1/chat/completions":
                return await self._generate(OPENAI, scope, receive, send)
            if path == "/v1/messages":
                return await self._generate(ANTHROPIC, scope, receive, send)
            if path == "/v1/embeddings":
                return await self._embed(OPENAI, scope, receive, send)
            for prefix in ("/v1beta/models/", "/v1/models/"):
                if path.startswith(prefix):
                    model, _, action = path[len(prefix) :].rpartition(":")
                    if action in ("embedContent", "batchEmbedContents") and model:
                        return await self._embed(GEMINI, scope, receive, send, model, action)
                    if action in ("generateContent", "streamGenerateContent") and model:
                        stream = action == "streamGenerateContent"
                        return await self._generate(GEMINI, scope, receive, send, model, stream)
        if path.startswith("/admin/"):
            return await self._admin(method, path[len("/admin/") :], receive, send)
        if method == "GET":
            if path in ("/v1/models", "/v1beta/models"):
                return await self._list_models(scope, send, path)
            if path == "/props":
                return await self._props(send)
            if path in ("/", "/healthz"):
                return await _respond(send, 200, dumps({"status": "ok", "service": "moa provider simulator"}))
        wire = GEMINI if path.startswith("/v1beta") else OPENAI
        request_id = "req_" + random_id(24)
        body = wire.error(Err.NOT_FOUND, f"Invalid URL ({method} {path})", request_id)
        await _respond(send, 404, body, self._headers(wire, request_id))

    # -- embeddings ------------------------------------------------------------------------------

    async def _embed(
        self,
        wire: Wire,
        scope: Scope,
        receive: Receive,
        send: Send,
        path_model: str = "",
        action: str = "",
    ) -> None:
        """OpenAI's and Gemini's embedding routes: the same key checks and error bodies as generation."""
        request_id = "req_" + random_id(24)
        base: Headers = self._headers(wire, request_id)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))) if wire is GEMINI else {}
        try:
            raw = await _read_body(receive)
            key = wire.api_key(headers, query)
            if key is None or is_invalid_key(key):
                status, body = (
                    wire.missing_key(request_id) if key is None else wire.invalid_key(key, request_id)
                )
                return await _respond(send, status, body, base)
            try:
                payload = loads(raw)
            except (ValueError, RecursionError):
                raise BadRequest("We could not parse the JSON body of your request (simulated).") from None
            if wire is GEMINI:
                out = gemini_embeddings(path_model, action, payload)
            else:
                out = openai_embeddings(payload)
        except BadRequest as e:
            error = wire.error(Err.BAD_REQUEST, e.message, request_id, e.param, e.code)
            return await _respond(send, wire.status(Err.BAD_REQUEST), error, base)
        self.state.embedding_requests += 1
        await _respond(send, 200, dumps(out), base)

    # -- generation ------------------------------------------------------------------------------

    async def _generate(
        self,
        wire: Wire,
        scope: Scope,
        receive: Receive,
        send: Send,
        path_model: str | None = None,
        stream: bool = False,
    ) -> None:
        request_id = "req_" + random_id(24)
        base: Headers = self._headers(wire, request_id)

        async def fail(kind: Err, message: str, param: str | None = None, code: str | None = None) -> None:
            await _respond(send, wire.status(kind), wire.error(kind, message, request_id, param, code), base)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))) if wire is GEMINI else {}
        try:
            raw = await _read_body(receive)
        except BadRequest as e:
            return await fail(Err.BAD_REQUEST, e.message)
        key = wire.api_key(headers, query)
        if key is None or is_invalid_key(key):
            status, body = wire.missing_key(request_id) if key is None else wire.invalid_key(key, request_id)
            return await _respond(send, status, body, base)
        try:
            body = loads(raw)
        except (ValueError, RecursionError):
            return await fail(
                Err.BAD_REQUEST, "We could not parse the JSON body of your request (simulated)."
            )
        where = first_unencodable(body)
        if where is not None:
            # The real APIs' JSON parsers refuse a lone surrogate escape as invalid JSON.
            return await fail(
                Err.BAD_REQUEST,
                "We could not parse the JSON body of your request: lone surrogate in a string "
                f"at {where} (simulated).",
            )
        try:
            req = wire.parse(body, path_model, stream)
        except BadRequest as e:
            return await fail(e.kind, e.message, e.param, e.code)
        profile = self.state.model_profile(req.model)
        if wire is OPENAI and profile.server == "llama.cpp":
            wire, base = LLAMACPP, self._headers(LLAMACPP, request_id)
        refusal = wire.refusal(req, profile)
        overflow = (
            context_overflow(req, profile) if isinstance(wire, OpenAIWire) and refusal is None else None
        )
        refused = refusal.message if refusal else overflow[1]["error"]["message"] if overflow else None
        self.state.record_request(wire.name, req, refused)
        if refusal is not None:
            return await fail(refusal.kind, refusal.message, refusal.param, refusal.code)
        if overflow is not None:  # the prompt does not fit the window this model is served with
            return await _respond(send, overflow[0], dumps(overflow[1]), base)
        await self._serve(wire, req, request_id, receive, send)

    async def _serve(
        self, wire: Wire, req: SimRequest, request_id: str, receive: Receive, send: Send
    ) -> None:
        state = self.state
        st = state.begin(req.model)
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        watcher: _DisconnectWatcher | None = None
        bill: GenerationBill | None = None
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if self._closing:
                await self._fault_error(wire, req, request_id, Err.UNAVAILABLE, None, send)
                return
            mp = state.model_profile(req.model)
            picked = state.pick_fault(req.model, mp.faults)
            fault, spec = picked if picked else (None, None)
            if fault is not None:
                st.faults[fault] += 1
            if fault in _ERROR_FAULTS:
                await self._fault_error(wire, req, request_id, _ERROR_FAULTS[fault], spec, send)
                return
            cached = state.cached_tokens(req, prompt_tokens(req))
            c = answer(
                req,
                mp,
                cached_tokens=cached,
                id=wire.new_id(),
                created=int(time.time()),
                authors=state.author,
                call_id=lambda: wire.call_id(req.model),
            )
            if c.tool_fault is not None:
                st.faults["tool_" + c.tool_fault] += 1
            if c.json_fault is not None:
                st.faults["json_" + c.json_fault] += 1
            if not c.judged:
                state.remember_author(c.text, req.model)  # so a simulated judge knows who wrote it
            tps = mp.tokens_per_s / (spec.factor if isinstance(spec, SlowFault) else 1.0)
            prefill = (c.prompt_tokens - c.cached_tokens) / mp.prefill_tokens_per_s
            ttft = state.jitter(mp.ttft_s + prefill, mp.jitter)
            gen = state.jitter(c.completion_tokens / tps, mp.jitter)
            watcher = _DisconnectWatcher(receive, task)
            loop = asyncio.get_running_loop()
            bill = GenerationBill(c.prompt_tokens, c.completion_tokens, streaming=req.stream)
            hang_s = 0.0
            if isinstance(spec, HangFault):
                if spec.hang_s is None:
                    await asyncio.Event().wait()  # no answer: only the client leaving ends this
                hang_s = spec.hang_s or 0.0
                await asyncio.sleep(hang_s)
            headers = self._headers(wire, request_id, hang_s + ttft + gen)
            bill.generating_from, bill.generation_s = loop.time() + ttft, gen
            if fault == "wrong_content_type":
                await asyncio.sleep(ttft + gen)
                bill.finished = True
                watcher.finished = True
                await _respond(tracked_send, 200, _HTML, headers, b"text/html; charset=utf-8")
            elif req.stream:
                stall = spec.after_tokens if isinstance(spec, StallFault) else None
                await self._stream(
                    wire, req, c, headers, ttft, gen, fault, watcher, tracked_send, bill, stall
                )
            else:
                if isinstance(spec, StallFault):
                    # It writes about ``after_tokens`` tokens, then nothing: billed for those.
                    bill.completion_tokens = min(spec.after_tokens, c.completion_tokens)
                    bill.generation_s = gen * bill.completion_tokens / max(c.completion_tokens, 1)
                    await asyncio.Event().wait()  # only the client leaving ends this
                await asyncio.sleep(ttft + gen)
                bill.finished = True
                body = wire.response(req, c)
                if fault == "malformed_json":
                    body = _MALFORMED_PREFIX + body[1:]
                elif fault == "cut_stream":
                    body = body[: len(body) // 2]
                watcher.finished = True
                await _respond(tracked_send, 200, body, headers)
            if fault not in _BROKEN_BODY:
                st.completed += 1
        except asyncio.CancelledError:
            st.cancelled += 1
            if watcher is not None and watcher.fired:
                task.uncancel()  # our own cancellation: the client left, nothing more to do
                return
            if not self._closing:
                raise
            task.uncancel()
            if watcher is not None:
                watcher.finished = True
            if started:
                _CUTTING.set(True)  # shutting down mid-stream: the connection just closes
            else:
                await self._fault_error(wire, req, request_id, Err.UNAVAILABLE, None, send)
        finally:
            if bill is not None:
                bill.charge(st, asyncio.get_running_loop().time())
            if watcher is not None:
                watcher.stop()
            st.in_flight -= 1
            self._active.discard(task)

    async def _fault_error(
        self, wire: Wire, req: SimRequest, request_id: str, kind: Err, spec: FaultSpec | None, send: Send
    ) -> None:
        headers: Headers = self._headers(wire, request_id)
        if kind is Err.RATE_LIMIT:
            # The wait goes where the provider puts it: a header, rate-limit headers, or the body.
            retry_after = spec.retry_after_s if isinstance(spec, RateFault) else None
            hint, body = wire.rate_limited(req.model, retry_after, request_id, time.time())
            headers.extend(hint)
        else:
            body = wire.error(kind, wire.fault_message(kind, req.model, None), request_id)
        await _respond(send, wire.status(kind), body, headers)

    async def _stream(
        self,
        wire: Wire,
        req: SimRequest,
        c: Completion,
        headers: Headers,
        ttft: float,
        gen: float,
        fault: str | None,
        watcher: _DisconnectWatcher,
        send: Send,
        bill: GenerationBill,
        stall: int | None = None,
    ) -> None:
        """Send the answer as the provider's event stream, paced at the model's tokens per second;
        ``bill`` counts the text sent (what a stream cut short is billed for). With ``stall``, the
        pieces up to about that many tokens, then nothing until the client leaves."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", wire.stream_content_type),
                    (b"cache-control", b"no-cache"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": wire.stream_head(req, c), "more_body": True})
        events = wire.stream_events(req, c)
        pieces = [text for text, _ in events]
        total = max(sum(map(len, pieces)), 1)
        due, acc = [], 0
        for p in pieces:
            acc += len(p)
            due.append(start + ttft + gen * acc / total)
        cut_at = len(pieces) // 2 if fault == "cut_stream" else len(pieces)
        if stall is not None:
            reached = (k for k in range(len(pieces)) if approx_tokens("".join(pieces[:k])) >= stall)
            cut_at = next(reached, len(pieces))
        if fault == "cut_stream" and not pieces:
            await asyncio.sleep(ttft)
        i = 0
        while i < cut_at:
            wait = due[i] - loop.time()
            if wait > 0.001:
                await asyncio.sleep(wait)
            now = loop.time() + 0.002
            batch, first = bytearray(), i
            while i < cut_at and due[i] <= now:
                batch += events[i][1]
                i += 1
            if fault == "malformed_json":
                batch = bytearray(batch.replace(b"data: {", b"data: " + _MALFORMED_PREFIX, 1))
                watcher.finished = True
                await send({"type": "http.response.body", "body": bytes(batch), "more_body": False})
                bill.sent_text += "".join(pieces[first:i])
                return
            await send({"type": "http.response.body", "body": bytes(batch), "more_body": True})
            bill.sent_text += "".join(pieces[first:i])
        if stall is not None:
            await asyncio.Event().wait()  # only the client leaving ends this
        if fault == "cut_stream":
            # Return without ending the body: uvicorn closes the connection mid-stream, as a network
            # failure would, and the client never sees the terminal events.
            _CUTTING.set(True)
            return
        if not pieces:
            await asyncio.sleep(max(0.0, start + ttft - loop.time()))
        watcher.finished = True
        bill.finished = True
        await send({"type": "http.response.body", "body": wire.stream_tail(req, c), "more_body": False})

    # -- models list -----------------------------------------------------------------------------

    def _model_names(self) -> list[str]:
        names = dict.fromkeys(KNOWN_MODELS)
        names.update(dict.fromkeys(m for m in self.state.profile.models if not any(ch in m for ch in "*?[")))
        names.update(dict.fromkeys(self.state.stats))
        return list(names)

    async def _list_models(self, scope: Scope, send: Send, path: str) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        names = self._model_names()
        if path == "/v1beta/models":
            models: list[dict[str, Any]] = [
                {
                    "name": f"models/{n}",
                    "displayName": n,
                    "supportedGenerationMethods": ["generateContent", "countTokens"],
                }
                for n in names
            ]
            return await _respond(send, 200, dumps({"models": models}))
        if "anthropic-version" in headers:
            data = [
                {"type": "model", "id": n, "display_name": n, "created_at": "2025-01-01T00:00:00Z"}
                for n in names
            ]
            body = {"data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}
            return await _respond(send, 200, dumps(body))
        key = OPENAI.api_key(headers, {})
        own = OPENAI.service_headers(0.0, self.state.profile.simulator_service_header)
        if key is None or is_invalid_key(key):
            status, refusal = OPENAI.missing_key("") if key is None else OPENAI.invalid_key(key, "")
            return await _respond(send, status, refusal, own)
        listing: list[dict[str, Any]] = []
        # llama.cpp lists its model a second time, Ollama's way, in a ``models`` array before
        # OpenAI's ``data``; the simulator's one listing carries it when a model is served so.
        ollama: list[dict[str, Any]] = []
        for n in names:
            entry: dict[str, Any] = {
                "id": n,
                "object": "model",
                "created": 1735689600,
                "owned_by": "simulator",
            }
            mp = self.state.model_profile(n)
            if mp.server == "vllm" and mp.context_window is not None:
                entry |= {"owned_by": "vllm", "root": n, "parent": None, "max_model_len": mp.context_window}
            elif mp.server == "llama.cpp" and mp.context_window is not None:
                entry = listing_entry(n, mp.context_window, int(time.time()))
                ollama.append(ollama_entry(n))
            listing.append(entry)
        head: dict[str, Any] = {"models": ollama} if ollama else {}
        await _respond(send, 200, dumps(head | {"object": "list", "data": listing}), own)

    async def _props(self, send: Send) -> None:
        """llama.cpp's ``GET /props``: the server's one model and its per-slot window
        (``default_generation_settings.n_ctx``), for the first model profiled as a llama.cpp
        server; 404 when there is none, as on any other server."""
        for name, mp in self.state.profile.models.items():
            if mp.server == "llama.cpp" and mp.context_window is not None:
                return await _respond(send, 200, dumps(props(name, mp.context_window)))
        return await _respond(
            send, 404, dumps({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        )

    # -- admin -----------------------------------------------------------------------------------

    async def _admin(self, method: str, route: str, receive: Receive, send: Send) -> None:
        state = self.state
        raw = await _read_body(receive) if method in ("POST", "PUT") else b""
        try:
            payload = loads(raw) if raw.strip() else None
        except ValueError:
            return await _respond(send, 400, dumps({"detail": "the body is not valid JSON"}))
        try:
            result = self._admin_action(state, method, route, payload)
        except ValidationError as e:
            detail = [{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
            return await _respond(send, 422, dumps({"detail": detail}))
        except LookupError as e:
            return await _respond(send, 404, dumps({"detail": str(e)}))
        await _respond(send, 200, dumps(result))

    @staticmethod
    def _admin_action(state: SimState, method: str, route: str, payload: Any) -> Any:
        if route == "stats" and method == "GET":
            return state.snapshot()
        if route == "requests" and method == "GET":
            return {"requests": list(state.recent_requests)}
        if route == "reset" and method == "POST":
            if isinstance(payload, Mapping) and payload.get("profile") is not None:
                state.set_profile(SimProfile.model_validate(payload["profile"]))
            state.reset_counters()
            return {"reset": True}
        if route == "profile":
            if method == "GET":
                return state.profile.model_dump(mode="json")
            if method == "PUT":
                state.set_profile(SimProfile.model_validate(payload or {}))
                return state.profile.model_dump(mode="json")
        if route == "faults" and method in ("GET", "DELETE"):
            if method == "DELETE":
                state.clear_faults()
            return {k: v.model_dump(mode="json", exclude_none=True) for k, v in state.profile.faults.items()}
        if route.startswith("faults/"):
            pattern = route[len("faults/") :]
            if method == "PUT":
                faults = Faults.model_validate(payload or {})
                state.set_faults(pattern, faults)
                return {"model": pattern, "faults": faults.model_dump(mode="json", exclude_none=True)}
            if method == "DELETE":
                if not state.clear_faults(pattern):
                    raise LookupError(f"no fault override for {pattern!r}")
                return {"model": pattern, "deleted": True}
            if method == "GET":
                return state.model_profile(pattern).faults.model_dump(mode="json", exclude_none=True)
        raise LookupError(f"no admin route {method} /admin/{route}")


def create_app(profile: SimProfile | None = None) -> SimulatorApp:
    """The simulator as an ASGI app, for any ASGI server (``SimulatorServer`` runs it on uvicorn)."""
    return SimulatorApp(profile or SimProfile())
