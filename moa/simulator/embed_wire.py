"""Embedding routes of the simulator: OpenAI ``POST /v1/embeddings`` and Gemini
``models/{model}:embedContent`` / ``:batchEmbedContents``, in each API's request and response
shapes (OpenAI's ``encoding_format`` float or base64 and ``dimensions``; Gemini's
``outputDimensionality``). Vectors come from ``lexical_embedding``: deterministic in the text.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from moa.simulator.embeddings import lexical_embedding
from moa.simulator.wire import BadRequest
from moa.tokens import approx_tokens

# Default dimensions of the embedding models each API publishes.
OPENAI_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
GEMINI_DIMS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}


def _tokens(text: str) -> int:
    return max(1, approx_tokens(text))


def openai_embeddings(body: Any) -> dict[str, Any]:
    """The response body of ``POST /v1/embeddings``; ``BadRequest`` as the API refuses."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    if model not in OPENAI_DIMS:
        raise BadRequest(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BadRequest("'input' must be a non-empty string or array of non-empty strings.", param="input")
    dims = body.get("dimensions") or OPENAI_DIMS[model]
    if (
        not isinstance(dims, int)
        or dims < 1
        or dims > OPENAI_DIMS[model]
        or (model.endswith("ada-002") and dims != 1536)
    ):
        raise BadRequest(f"Invalid value for 'dimensions': {dims}.", param="dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    data = []
    for i, text in enumerate(texts):
        vec = lexical_embedding(text, dims)
        embedding: Any = vec
        if fmt == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(_tokens(t) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _gemini_text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise BadRequest("* EmbedContentRequest.content: contents.parts must not be empty.")
    text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
    if not text:
        raise BadRequest("* EmbedContentRequest.content: contents.parts must hold text.")
    return text


def _gemini_one(model: str, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise BadRequest("Invalid JSON payload received.")
    dims = request.get("outputDimensionality") or GEMINI_DIMS[model]
    if not isinstance(dims, int) or dims < 1 or dims > GEMINI_DIMS[model]:
        raise BadRequest(f"* EmbedContentRequest.output_dimensionality: invalid value {dims}.")
    return {"values": lexical_embedding(_gemini_text(request.get("content")), dims)}


def gemini_embeddings(model: str, action: str, body: Any) -> dict[str, Any]:
    """The response body of ``:embedContent`` (one ``embedding``) or ``:batchEmbedContents``."""
    if model not in GEMINI_DIMS:
        raise BadRequest(
            f"models/{model} is not found for API version v1beta, or is not supported for embedContent."
        )
    if action == "embedContent":
        return {"embedding": _gemini_one(model, body)}
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise BadRequest("* BatchEmbedContentsRequest.requests: must not be empty.")
    for r in requests:
        named = r.get("model") if isinstance(r, dict) else None
        if named not in (None, f"models/{model}", model):
            raise BadRequest(f"Model in request {named!r} does not match models/{model}.")
    return {"embeddings": [_gemini_one(model, r) for r in requests]}
