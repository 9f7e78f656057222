"""llama.cpp's ``llama-server``: the OpenAI protocol in its own bodies.

A model profiled with ``server: llama.cpp`` is served as a real ``llama-server`` answers, as
recorded from one (tests/fixtures/providers/llamacpp, with the recording's provenance): a
completion without OpenAI's ``logprobs``, ``refusal``, ``annotations`` or ``service_tier`` but
with llama.cpp's ``timings``; a stream whose first delta's ``content`` is null, with no
``usage: null`` on every chunk and no ``obfuscation``, its usage chunk carrying ``timings`` too;
errors as ``{"code", "message", "type"}``; no request id or processing-time header. ``GET /props``
and the listing's entry are the server's too, ``n_ctx`` being the per-slot window. The model is
named as a server started with ``--alias NAME`` names it.
"""

from __future__ import annotations

from typing import Any

from moa.simulator.images import Image
from moa.simulator.openai_wire import OpenAIWire
from moa.simulator.wire import BadRequest, Completion, Err, SimRequest, argument_pieces, dumps, sse

# What this build reports for itself (``system_fingerprint``, ``build_info``).
BUILD_INFO = "b0-simulator"
# llama.cpp has no refusal field: a refusal is plain content that stops.
_FINISH = {
    "stop": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "refusal": "stop",
}
# What llama-server answers an image when it was started without a multimodal projector (its
# source's words; a 500 server_error, as reported by its users).
NO_MMPROJ = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"
# llama.cpp's error types (server-common.cpp ``format_error_response``). It sends no 429: a
# simulated rate limit keeps OpenAI's body.
_ERRORS = {
    Err.BAD_REQUEST: "invalid_request_error",
    Err.AUTH: "authentication_error",
    Err.NOT_FOUND: "not_found_error",
    Err.SERVER: "server_error",
    Err.UNAVAILABLE: "unavailable_error",
}
# The recorded server's sampling defaults, as /props lists them (floats as the server prints its
# 32-bit values).
_PARAMS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "n_probs": 0,
    "min_keep": 0,
    "chat_format": "Content-only",
    "reasoning_format": "none",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}
_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
_TEMPLATE_CAPS = {
    "supports_object_arguments": False,
    "supports_parallel_tool_calls": False,
    "supports_preserve_reasoning": False,
    "supports_reasoning_effort": False,
    "supports_string_content": True,
    "supports_system_role": True,
    "supports_tool_calls": False,
    "supports_tools": False,
    "supports_typed_content": False,
}
# The model's own numbers (the listing's ``meta``, the file type in /props): the recorded
# SmolLM2-135M-Instruct Q4_1's, whatever model is simulated.
N_CTX_TRAIN, FTYPE = 8192, "Q4_1"


def props(name: str, n_ctx: int) -> dict[str, Any]:
    """``GET /props`` of a server serving ``name`` with ``n_ctx`` tokens per slot (one slot)."""
    return {
        "default_generation_settings": {"params": _PARAMS, "n_ctx": n_ctx},
        "total_slots": 1,
        "model_alias": name,
        "model_ftype": FTYPE,
        "model_path": f"/models/{name}.gguf",
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media_simulator__>",
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": False,
        "ui": True,
        "ui_settings": {},
        "chat_template": _TEMPLATE,
        "chat_template_caps": _TEMPLATE_CAPS,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "build_info": BUILD_INFO,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
    }


def listing_entry(name: str, n_ctx: int, created: int) -> dict[str, Any]:
    """The model's entry in ``GET /v1/models``'s ``data``: ``meta.n_ctx`` is the per-slot window
    (``n_ctx_train`` the trained one)."""
    return {
        "id": name,
        "aliases": [name],
        "tags": [],
        "object": "model",
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "created": created,
        "owned_by": "llamacpp",
        "meta": {
            "vocab_type": 2,
            "n_vocab": 49152,
            "n_ctx": n_ctx,
            "n_ctx_train": max(n_ctx, N_CTX_TRAIN),
            "n_embd": 576,
            "n_params": 134515008,
            "size": 96576768,
            "ftype": FTYPE,
        },
    }


def ollama_entry(name: str) -> dict[str, Any]:
    """The model's entry in the listing's Ollama-style ``models`` array, which llama.cpp sends
    beside OpenAI's ``data``: placeholders but for the name."""
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": [""],
        "parameter_size": "",
        "quantization_level": "",
    }
    return {
        "name": name,
        "model": name,
        "modified_at": "",
        "size": "",
        "digest": "",
        "type": "model",
        "description": "",
        "tags": [""],
        "capabilities": ["completion"],
        "parameters": "",
        "details": details,
    }


def _timings(c: Completion) -> dict[str, Any]:
    """llama.cpp's ``timings`` of a completion: nominal times (1 ms a token), true counts."""
    prompt_n = max(c.prompt_tokens - c.cached_tokens, 1)
    predicted_n = c.completion_tokens
    prompt_ms, predicted_ms = prompt_n * 1.0, max(predicted_n, 1) * 1.0
    return {
        "cache_n": c.prompt_tokens - prompt_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n,
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / max(predicted_n, 1),
        "predicted_per_second": 1000.0 * predicted_n / predicted_ms,
    }


class LlamaCppWire(OpenAIWire):
    stream_content_type = b"text/event-stream"

    def request_id_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return []

    def service_headers(self, seconds: float, simulator_header: bool) -> list[tuple[bytes, bytes]]:
        # No openai-processing-ms: the server reports its times in the body (``timings``).
        return super(OpenAIWire, self).service_headers(seconds, simulator_header)

    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        if kind not in _ERRORS:
            return super().error(kind, message, request_id, param, code)
        return dumps({"error": {"code": kind.value, "message": message, "type": _ERRORS[kind]}})

    def no_vision(self, req: SimRequest, image: Image) -> BadRequest:
        """A server without ``--mmproj`` (the recorded one: its ``/props`` says no vision) refuses
        any image with a 500."""
        return BadRequest(NO_MMPROJ, kind=Err.SERVER)

    @staticmethod
    def _usage(c: Completion) -> dict[str, Any]:
        return {
            "completion_tokens": c.completion_tokens,
            "prompt_tokens": c.prompt_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
        }

    def _head(self, req: SimRequest, c: Completion, choices: list[Any], obj: str) -> dict[str, Any]:
        return {
            "choices": choices,
            "created": c.created,
            "model": req.model,
            "system_fingerprint": BUILD_INFO,
            "object": obj,
        }

    def response(self, req: SimRequest, c: Completion) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if c.calls:
            # llama-server's own tool calling (its chat templates' parsers) answers OpenAI's way; not
            # recorded here (the recorded model's template has no tools), so the shape is OpenAI's.
            message = {"role": "assistant", "content": None, "tool_calls": [_call(k) for k in c.calls]}
        choice = {"finish_reason": _FINISH[c.finish], "index": 0, "message": message}
        body = self._head(req, c, [choice], "chat.completion")
        return dumps(body | {"usage": self._usage(c), "id": c.id, "timings": _timings(c)})

    def _llama_chunk(self, req: SimRequest, c: Completion, choices: list[Any], **extra: Any) -> bytes:
        head = self._head(req, c, choices, "chat.completion.chunk")
        # llama.cpp puts id after created, before model, in a chunk (as recorded).
        chunk = {"choices": choices, "created": c.created, "id": c.id}
        return sse(chunk | {k: v for k, v in head.items() if k not in chunk} | extra)

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        delta = {"role": "assistant", "content": None}
        return self._llama_chunk(req, c, [{"finish_reason": None, "index": 0, "delta": delta}])

    def call_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """The calls as OpenAI streams them, in llama.cpp's chunks."""
        events: list[tuple[str, bytes]] = []

        def delta(calls: list[dict[str, Any]]) -> bytes:
            choice = {"finish_reason": None, "index": 0, "delta": {"tool_calls": calls}}
            return self._llama_chunk(req, c, [choice])

        for k, call in enumerate(c.calls):
            opening = {"index": k} | _call(call)
            opening["function"] = {"name": call.name, "arguments": ""}
            events.append(("", delta([opening])))
            cut = argument_pieces(call.arguments)
            events += [(p, delta([{"index": k, "function": {"arguments": p}}])) for p in cut]
        return events

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        return self._llama_chunk(req, c, [{"finish_reason": None, "index": 0, "delta": {"content": piece}}])

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        out = self._llama_chunk(req, c, [{"finish_reason": _FINISH[c.finish], "index": 0, "delta": {}}])
        if req.include_usage:
            out += self._llama_chunk(req, c, [], usage=self._usage(c), timings=_timings(c))
        return out + b"data: [DONE]\n\n"


def _call(call: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}, "id": call.id}
