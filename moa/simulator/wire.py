"""What the three wire protocols share: the normalised request, the answer, error kinds, JSON codec.

Each protocol module (``openai_wire``, ``anthropic_wire``, ``gemini_wire``) parses its own request
format into a ``SimRequest`` and renders a ``Completion`` (or an error) in its own response format;
the app in between knows nothing about any one provider.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from moa.simulator.continuation import continue_text, split_continuation
from moa.simulator.images import Image, acknowledgement, vision_capable
from moa.simulator.judge import Authors, judge_reply
from moa.simulator.profile import ModelProfile
from moa.simulator.structured import OutputFormat, document, instructed
from moa.simulator.text import compose, style_for
from moa.simulator.tools import ToolCall, ToolUse, answer_from_results, preamble_text, propose
from moa.tokens import approx_message_tokens, approx_tokens, truncate_to_tokens

try:  # orjson is faster on the hot path but is not a declared dependency
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - depends on the environment
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: bytes) -> Any:
        return json.loads(data)


# Any key that starts with this is refused as a real API refuses a wrong key (each protocol in its
# own words, echoing the key as that API does); every other key is accepted.
INVALID_KEY = "sim-invalid-key"


def is_invalid_key(key: str) -> bool:
    return key.startswith(INVALID_KEY)


class Err(Enum):
    """Error kinds the simulator answers with; each protocol maps them to its own status and body."""

    BAD_REQUEST = 400
    AUTH = 401
    NOT_FOUND = 404
    RATE_LIMIT = 429
    SERVER = 500
    UNAVAILABLE = 503


class BadRequest(ValueError):
    """A request the real API would refuse with 400; ``param`` names the offending field and
    ``code`` is the machine-readable reason, for the protocols whose error bodies carry them.
    ``kind`` is the error's kind when the API refuses it otherwise (llama.cpp answers an image it
    cannot read with a 500)."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, kind: Err = Err.BAD_REQUEST
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind


def json_type(v: Any) -> str:
    """A JSON value's type as the APIs name it in their error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "decimal"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(slots=True)
class SimRequest:
    model: str
    # Every message as (role, text) with role system/user/assistant, the system message first.
    transcript: tuple[tuple[str, str], ...]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    include_obfuscation: bool = True
    # Whether the prompt cache applies: automatic on OpenAI and Gemini, asked for with
    # ``cache_control`` on Anthropic.
    prompt_caching: bool = True
    # The generation parameters the request carried, by their common names (temperature, top_p,
    # max_tokens, stop, seed), whatever the protocol calls them: what per-model refusals check and
    # what ``GET /admin/requests`` shows.
    params: dict[str, Any] = field(default_factory=dict)
    # The tools offered and what the model may do with them; None: the request offers none.
    tools: ToolUse | None = None
    # The tool declarations' size in tokens: part of the prompt, as the APIs bill it.
    tool_tokens: int = 0
    # The JSON document the answer must be (a response format); None: free text.
    output: OutputFormat | None = None
    # The images the messages carry, each with its input tokens by the provider's rule.
    images: tuple[Image, ...] = ()

    @property
    def system(self) -> str | None:
        if self.transcript and self.transcript[0][0] == "system":
            return self.transcript[0][1]
        return None


@dataclass(slots=True)
class Completion:
    id: str
    created: int
    text: str
    # "stop", "length", "stop_sequence" or "tool_calls" (each protocol names them its own way)
    finish: str
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    judged: bool = False  # a judge's verdict rather than an answer (see moa.simulator.judge)
    # The text a stream of it has sent so far (a wire that reports running usage counts it).
    streamed: str = ""
    # The tool calls the model made (after ``text``, which is then a preamble or empty).
    calls: tuple[ToolCall, ...] = ()
    tool_fault: str | None = None  # the tool error the model's profile injected, if any
    # A structured answer: ``text`` is the JSON document (or, ``refused``, the model's refusal).
    structured: bool = False
    refused: bool = False
    json_fault: str | None = None  # the structured-output error the model's profile injected, if any


def random_id(n: int = 24) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(alphabet[b % 62] for b in os.urandom(n))


def prompt_tokens(req: SimRequest) -> int:
    """The prompt as the APIs bill it: the messages, the tool declarations, the response format's
    schema (all three put it in the prompt) and each image by its provider's rule."""
    schema = req.output.tokens if req.output is not None else 0
    images = sum(i.tokens for i in req.images)
    return approx_message_tokens(t for _, t in req.transcript) + req.tool_tokens + schema + images


def last_user_turn(req: SimRequest) -> int:
    """The index of the last user turn in the transcript (-1 when there is none)."""
    return next((i for i in range(len(req.transcript) - 1, -1, -1) if req.transcript[i][0] == "user"), -1)


_PIECES = re.compile(r"\S+\s*|\s+")
_PIECE_CHARS = 12  # about three tokens per streamed chunk


def pieces(text: str) -> list[str]:
    """Text cut into the pieces a stream sends it in, about three tokens each."""
    out: list[str] = []
    cur = ""
    for m in _PIECES.finditer(text):
        cur += m.group()
        if len(cur) >= _PIECE_CHARS:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


def argument_pieces(arguments: str) -> list[str]:
    """A call's arguments cut as the APIs stream them: a few characters at a time."""
    return [arguments[i : i + _PIECE_CHARS] for i in range(0, len(arguments), _PIECE_CHARS)]


def answer(
    req: SimRequest,
    profile: ModelProfile,
    *,
    cached_tokens: int,
    id: str,
    created: int,
    authors: Authors | None = None,
    call_id: Callable[[], str] = lambda: "call_" + random_id(24),
) -> Completion:
    """The deterministic answer, after stop sequences and max_tokens. A request handing the model
    the start of an answer gets only its continuation (``moa.simulator.continuation``).

    With ``authors`` (who wrote an answer the simulator produced), a judge prompt gets the verdict
    the model's judge profile draws instead of prose.
    """
    # At temperature 0 sampling is greedy, so the seed cannot change the wording.
    seed = None if req.temperature == 0 else req.seed
    tool_fault = None
    if req.tools is not None:
        proposal = propose(req.model, seed, req.transcript, req.tools, profile.tool_errors, call_id)
        tool_fault = proposal.fault
        if proposal.calls:
            text = preamble_text(proposal.calls) if req.tools.preamble else ""
            said = text + "".join(c.name + c.arguments for c in proposal.calls)
            return Completion(
                id=id,
                created=created,
                text=text,
                finish="tool_calls",
                stop_sequence=None,
                prompt_tokens=prompt_tokens(req),
                completion_tokens=approx_tokens(said),
                cached_tokens=cached_tokens,
                calls=proposal.calls,
                tool_fault=tool_fault,
            )
    verdict = judge_reply(req.model, req.transcript, seed, profile.judge, authors) if authors else None
    doc = None
    # Asked natively, or else in words in the system prompt (``instructed``).
    output = req.output if req.output is not None else instructed(req.transcript)
    if output is not None:
        # A JSON document (or a refusal) instead of prose: no judge verdict, continuation or
        # acknowledgement wraps it, as constrained decoding writes nothing outside the document.
        style = profile.style or style_for(req.model)
        doc = document(req.model, style, seed, req.transcript, output, profile.json_errors)
        text, verdict = doc.text, None
    elif verdict is not None:
        text = verdict
    else:
        transcript, prefix = split_continuation(req.transcript)
        text = compose(
            req.model, profile.style or style_for(req.model), transcript, seed, profile.output_tokens
        )
        if prefix is not None:
            text = continue_text(text, prefix)
        text = answer_from_results(transcript, text)
        shown = last_user_turn(req)
        text = acknowledgement([i for i in req.images if i.turn == shown]) + text
    finish, matched = ("refusal" if doc is not None and doc.refused else "stop"), None
    if req.stop:
        hits = [(text.find(s), s) for s in req.stop if s and s in text]
        if hits:
            pos, matched = min(hits)
            text, finish = text[:pos], "stop_sequence"
    completion_tokens = approx_tokens(text)
    limit = req.max_tokens
    if profile.context_window is not None:
        # A served window bounds the answer too: generation stops once the window is full.
        room = max(profile.context_window - prompt_tokens(req), 1)
        limit = room if limit is None else min(limit, room)
    if limit is not None and completion_tokens > limit:
        text = truncate_to_tokens(text, limit)
        # The model produced exactly its limit of tokens; the cut text is their approximate rendering.
        finish, matched, completion_tokens = "length", None, limit
    return Completion(
        id=id,
        created=created,
        text=text,
        finish=finish,
        stop_sequence=matched,
        prompt_tokens=prompt_tokens(req),
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        judged=verdict is not None,
        tool_fault=tool_fault,
        structured=doc is not None and not doc.refused,
        refused=doc is not None and doc.refused,
        json_fault=doc.fault if doc is not None else None,
    )


def context_overflow(req: SimRequest, profile: ModelProfile) -> tuple[int, dict[str, Any]] | None:
    """The status and JSON body the server ``profile.server`` answers a prompt too long for
    ``profile.context_window`` with, or None when it fits. Each server in its own words and shape
    (tests/fixtures/providers/llamacpp and vllm hold the real bodies, with their provenance):

    - llama.cpp refuses a prompt of at least its per-slot window (the answer is not counted: it
      stops when the window is full), with ``exceed_context_size_error`` and both numbers;
    - vLLM refuses a prompt plus ``max_tokens`` over ``max_model_len``;
    - OpenAI refuses the same with ``context_length_exceeded``.
    """
    window = profile.context_window
    if window is None:
        return None
    prompt = prompt_tokens(req)
    if profile.server == "llama.cpp":
        if prompt < window:
            return None
        message = (
            f"request ({prompt} tokens) exceeds the available context size ({window} tokens), "
            "try increasing it"
        )
        error = {"code": 400, "message": message, "type": "exceed_context_size_error"}
        return 400, {"error": error | {"n_prompt_tokens": prompt, "n_ctx": window}}
    wanted = req.max_tokens or 0
    if prompt + wanted <= window and prompt < window:
        return None
    if profile.server == "vllm":
        if prompt >= window:
            message = (
                f"This model's maximum context length is {window} tokens. However, your request has "
                f"{prompt} input tokens. Please reduce the length of the input messages. None"
            )
        else:
            message = (
                f"'max_tokens' or 'max_completion_tokens' is too large: {wanted}. This model's maximum "
                f"context length is {window} tokens and your request has {prompt} input tokens "
                f"({wanted} > {window} - {prompt}). None"
            )
        return 400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    if prompt >= window:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt + wanted} tokens ({prompt} in the messages, {wanted} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    error = {"message": message, "type": "invalid_request_error", "param": "messages"}
    return 400, {"error": error | {"code": "context_length_exceeded"}}


PAIR_REFUSED = "`temperature` and `top_p` cannot both be specified for this model. Please use only one."


class Wire(ABC):
    """One provider's wire format."""

    name: str
    key_hint: str  # where the API key goes, for the 401 message
    stream_content_type: bytes = b"text/event-stream; charset=utf-8"
    # Whether a model refuses temperature and top_p in one request when its profile does not say.
    exclusive_sampling: bool = False

    @abstractmethod
    def api_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None: ...

    @abstractmethod
    def parse(self, body: Any, path_model: str | None, stream: bool) -> SimRequest: ...

    @abstractmethod
    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        """The error body; the status is ``self.status(kind)``."""

    def status(self, kind: Err) -> int:
        """The HTTP status this API answers an error of this kind with."""
        return kind.value

    def missing_key(self, request_id: str) -> tuple[int, bytes]:
        """The status and body the API answers a request that carries no key."""
        message = f"No API key provided (simulated). Send it as {self.key_hint}."
        return Err.AUTH.value, self.error(Err.AUTH, message, request_id)

    def invalid_key(self, key: str, request_id: str) -> tuple[int, bytes]:
        """The status and body the API answers a wrong key (echoing it only as that API does)."""
        return Err.AUTH.value, self.error(Err.AUTH, "Incorrect API key provided (simulated).", request_id)

    @abstractmethod
    def refused(self, param: str, model: str) -> BadRequest:
        """The 400 this API answers when ``model`` refuses a generation parameter (common name)."""

    def no_vision(self, req: SimRequest, image: Image) -> BadRequest:
        """What this API answers a model without vision that is sent ``image`` (the simulator's
        own words, where the API's are not known)."""
        return BadRequest(f"{image.where}: model {req.model} does not support image input.", image.where)

    def refusal(self, req: SimRequest, profile: ModelProfile) -> BadRequest | None:
        """What the model's profile makes it refuse in this request, if anything: an image it
        cannot see, a parameter it does not take."""
        vision = vision_capable(req.model) if profile.vision is None else profile.vision
        if req.images and not vision:
            return self.no_vision(req, req.images[0])
        for param in profile.refuses:
            if param in req.params:
                return self.refused(param, req.model)
        exclusive = (
            self.exclusive_sampling if profile.exclusive_sampling is None else profile.exclusive_sampling
        )
        if exclusive and "temperature" in req.params and "top_p" in req.params:
            return BadRequest(PAIR_REFUSED)
        return None

    @abstractmethod
    def new_id(self) -> str: ...

    def request_id_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", request_id.encode())]

    def service_headers(self, seconds: float, simulator_header: bool) -> list[tuple[bytes, bytes]]:
        """What a response says of the time spent on it: whatever this API itself sends (nothing, for
        most), plus, with ``simulator_header``, the simulator's own ``x-simulator-service-ms``,
        unrounded, on every wire, so a benchmark can tell service time from overhead even where
        the real API reports none."""
        return [(b"x-simulator-service-ms", f"{seconds * 1000:.3f}".encode())] if simulator_header else []

    @abstractmethod
    def response(self, req: SimRequest, c: Completion) -> bytes: ...

    @abstractmethod
    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        """Events before the first piece of text."""

    @abstractmethod
    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes: ...

    def stream_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """Everything between the head and the tail, in order: each event with the text it carries
        (what paces it, and what a stream cut short is billed for). The text's pieces, then the
        tool calls the way this API streams them."""
        # A JSON document has few spaces to cut at: it streams a few characters at a time, as the
        # APIs stream a structured answer (and a call's arguments).
        cut = argument_pieces(c.text) if c.structured else pieces(c.text)
        events = [
            (p, self.stream_delta(req, c, p, i == len(cut) - 1 and not c.calls)) for i, p in enumerate(cut)
        ]
        return events + self.call_events(req, c)

    def call_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """The tool calls' stream events (none: this API streams no calls)."""
        return []

    def call_id(self, model: str) -> str:
        """A new tool call's id, as this API writes them."""
        return "call_" + random_id(24)

    @abstractmethod
    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        """The terminal events (finish reason, usage, end marker)."""

    def rate_limited(
        self, model: str, retry_after_s: float | None, request_id: str, now: float
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The headers and body of a 429, the wait (if any) said where and how this API says it.
        ``now`` is the wall clock, for APIs that say when rather than how long."""
        message = self.fault_message(Err.RATE_LIMIT, model, retry_after_s)
        return [], self.error(Err.RATE_LIMIT, message, request_id)

    # Messages for the errors the simulator produces, in each provider's usual wording.
    def fault_message(self, kind: Err, model: str, retry_after_s: float | None) -> str:
        if kind is Err.RATE_LIMIT:
            wait = f" Please try again in {retry_after_s:g}s." if retry_after_s is not None else ""
            return f"Rate limit reached for {model} (simulated).{wait}"
        if kind is Err.UNAVAILABLE:
            return "The server is overloaded or not ready yet (simulated)."
        return "The server had an error while processing your request (simulated)."


def seconds_text(value: float) -> str:
    """Seconds as a header value: whole seconds bare ("60"), a fraction as short as it goes ("0.2")."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def sse(data: Any, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + dumps(data) + b"\n\n"
