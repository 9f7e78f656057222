"""What answers the workload: a preset or ``provider/model`` run in-process (through the same
provider pool, and so the same concurrency and rate limits, as ``moa ask``), the same through a
running moa service, or any other OpenAI-compatible endpoint (``MODEL@URL``).

A preset may name its aggregation mode (``moa:staircase``, ``moa-lite:early``), so one run compares
the modes' answers on the same questions. The target then streams its answers, as a client of a
streaming request would get them: ``staircase`` applies only to streaming requests.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, get_args

import openai
from openai.types.chat import ChatCompletionMessageParam

from moa.client_auth import api_key, auth_advice
from moa.config import MoAConfig
from moa.engine.cost import projected_cost
from moa.engine.engine import MoAEngine
from moa.errors import MoAError
from moa.plan import AggregationMode
from moa.result import MoAResult
from moa.types import ChatMessage, GenerationParams

MODES: tuple[str, ...] = get_args(AggregationMode)


class TargetError(ValueError):
    """A target spec that names nothing this config (or URL) can answer."""


@dataclass(slots=True)
class Answer:
    text: str = ""
    cost_usd: float | None = 0.0  # None: the target did not say (an endpoint with no price)
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class Turn:
    """One turn's answer, and the worst case it was allowed to cost (for ``--max-cost-usd``)."""

    answer: Answer
    projected_usd: float | None = None


class Target(Protocol):
    name: str

    async def projected(self, messages: list[ChatMessage], params: GenerationParams) -> float | None:
        """The most the next call can cost, or None when this target cannot say."""

    async def answer(self, messages: list[ChatMessage], params: GenerationParams) -> Answer: ...


@dataclass
class EngineTarget:
    """A preset (``moa``, ``auto``...) or ``provider/model`` run by the in-process engine; with
    ``aggregation``, that preset in that aggregation mode, streamed."""

    name: str
    engine: MoAEngine
    preset: str = ""
    aggregation: AggregationMode | None = None

    def __post_init__(self) -> None:
        self.preset = self.preset or self.name

    async def projected(self, messages: list[ChatMessage], params: GenerationParams) -> float | None:
        plan, _, _ = await self.engine.route(messages, self.preset)
        if self.aggregation is not None:
            plan = plan.model_copy(update={"aggregation": self.aggregation})
        return projected_cost(self.engine.config, plan, messages, params)

    async def answer(self, messages: list[ChatMessage], params: GenerationParams) -> Answer:
        t0 = time.monotonic()
        try:
            if self.aggregation is None:
                result = await self.engine.run(messages, preset=self.preset, params=params)
            else:
                result = await self._streamed(messages, params)
        except MoAError as e:
            return Answer(error=f"{e.code}: {e.message}", latency_s=time.monotonic() - t0)
        return Answer(
            text=result.text,
            cost_usd=result.cost_usd,
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            latency_s=time.monotonic() - t0,
        )

    async def _streamed(self, messages: list[ChatMessage], params: GenerationParams) -> MoAResult:
        result: MoAResult | None = None
        events = self.engine.stream(messages, preset=self.preset, params=params, aggregation=self.aggregation)
        async for ev in events:
            if isinstance(ev, MoAResult):
                result = ev
        assert result is not None  # a stream that does not raise ends with its result
        return result


@dataclass
class HttpTarget:
    """A model on an OpenAI-compatible endpoint: a running moa service (``detail`` asks it for the
    request's cost through ``moa.detail``) or any other server (cost unknown)."""

    name: str
    base_url: str
    model: str
    api_key: str
    detail: bool
    aggregation: AggregationMode | None = None  # a preset's mode on a moa service: streamed
    _client: Any = field(default=None, repr=False)
    _told_detail: bool = field(default=False, repr=False)

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=2)
        return self._client

    async def projected(self, messages: list[ChatMessage], params: GenerationParams) -> float | None:
        return None

    async def answer(self, messages: list[ChatMessage], params: GenerationParams) -> Answer:
        t0 = time.monotonic()
        kwargs: dict[str, Any] = {}
        if params.max_tokens is not None:
            kwargs["max_tokens"] = params.max_tokens
        if params.temperature is not None:
            kwargs["temperature"] = params.temperature
        moa: dict[str, Any] = {"detail": True} if self.detail else {}
        if self.aggregation is not None:
            moa["aggregation"] = self.aggregation
        if moa:
            kwargs["extra_body"] = {"moa": moa}
        chat = cast(
            list[ChatCompletionMessageParam], [{"role": m.role, "content": m.content} for m in messages]
        )
        try:
            if self.aggregation is not None:
                return await self._streamed(chat, kwargs, t0)
            resp = await self._openai().chat.completions.create(
                model=self.model,
                messages=chat,
                **kwargs,
            )
        except openai.PermissionDeniedError:
            if not self.detail:
                raise TargetError(f"{self.name}: {auth_advice(403)}") from None
            if not self._told_detail:  # said once, by the first request that learns it
                self._told_detail = True
                print(
                    f"moa eval: {self.name}: this key may not use moa.detail, so the target's cost "
                    "is unknown (n/a); for costs, use a key made with `moa keys create NAME --detail`",
                    file=sys.stderr,
                )
            self.detail = False  # a key without the detail permission: answer without the cost
            return await self.answer(messages, params)
        except openai.AuthenticationError:
            # Every answer would fail the same way: one clear line instead of a table of n/a.
            raise TargetError(f"{self.name}: {auth_advice(401)}") from None
        except openai.APIError as e:
            return Answer(error=f"{type(e).__name__}: {e}", latency_s=time.monotonic() - t0)
        usage = resp.usage
        return Answer(
            text=resp.choices[0].message.content or "",
            cost_usd=_detail_cost(resp.model_extra),
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.monotonic() - t0,
        )

    async def _streamed(
        self, chat: list[ChatCompletionMessageParam], kwargs: dict[str, Any], t0: float
    ) -> Answer:
        """The answer streamed (a preset in an aggregation mode): its text, the usage chunk, and the
        ``moa.detail`` event for the cost."""
        parts: list[str] = []
        cost: float | None = None
        usage: Any = None
        stream = await self._openai().chat.completions.create(
            model=self.model,
            messages=chat,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
                if chunk.model_extra and "moa" in chunk.model_extra:
                    cost = _detail_cost(chunk.model_extra)
        return Answer(
            text="".join(parts),
            cost_usd=cost,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.monotonic() - t0,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _detail_cost(extra: dict[str, Any] | None) -> float | None:
    """The request's cost from a moa service's ``moa.detail`` (None when it sent none)."""
    moa = (extra or {}).get("moa")
    if not isinstance(moa, dict):
        return None
    totals = moa.get("totals") if isinstance(moa.get("totals"), dict) else moa
    value = totals.get("cost_usd") if isinstance(totals, dict) else None
    return float(value) if isinstance(value, int | float) else None


def split_mode(spec: str) -> tuple[str, AggregationMode | None]:
    """``moa:staircase`` -> (``moa``, ``staircase``); a spec naming no mode -> (spec, None)."""
    name, sep, mode = spec.rpartition(":")
    if sep and name and mode in MODES:
        return name, cast(AggregationMode, mode)
    return spec, None


def known_target(cfg: MoAConfig, name: str) -> bool:
    """Whether the in-process engine can answer ``name`` (a preset, ``auto``, or a configured model)."""
    if name == "auto" or name in cfg.presets:
        return True
    provider, _, model = name.partition("/")
    return bool(model) and provider in cfg.providers and model in cfg.providers[provider].models


def build_target(
    spec: str,
    cfg: MoAConfig,
    engine: MoAEngine,
    *,
    service_url: str | None = None,
    service_key_env: str = "MOA_API_KEY",
    endpoint_key_env: str | None = None,
) -> Target:
    """``MODEL@URL`` is another OpenAI-compatible endpoint; with ``service_url`` a bare name goes
    to that moa service; otherwise it runs in-process."""
    if "@" in spec:
        model, _, url = spec.rpartition("@")
        if not model or not url.startswith(("http://", "https://")):
            raise TargetError(f"target {spec!r}: expected MODEL@http(s)://HOST/v1")
        key = os.environ.get(endpoint_key_env, "") if endpoint_key_env else ""
        return HttpTarget(spec, url, model, key or "unused", detail=False)
    name, mode = split_mode(spec)
    if mode is not None and name != "auto" and name not in cfg.presets and not service_url:
        raise TargetError(f"target {spec!r}: only a preset runs in an aggregation mode ({name!r} is none)")
    if service_url:
        key = api_key(None, service_key_env) or "unused"
        base = service_url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        return HttpTarget(spec, base, name, key, detail=True, aggregation=mode)
    if not known_target(cfg, name):
        presets = ", ".join(["auto", *cfg.presets])
        raise TargetError(
            f"unknown target {spec!r}: a preset ({presets}), optionally with an aggregation mode "
            f"({', '.join(f'PRESET:{m}' for m in MODES)}), a configured provider/model, or MODEL@URL"
        )
    return EngineTarget(spec, engine, preset=name, aggregation=mode)
