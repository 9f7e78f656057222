"""The comparison point: Mixture-of-Agents as in the original MoA quick start.

One Python process, ``asyncio.gather`` over the official SDK clients for the proposers, then one
aggregator call with the answers pasted into its system prompt. No quorum, no fallbacks: it waits
for every proposer. Written independently of the project's engine on purpose; two things are
deliberately the same as the service's, so both sides do the same work:

- the aggregator's prompt has the service's shape: its default aggregation template with each
  answer in a ``<reference id="N">`` block (only the template strings are shared, the rendering is
  written here), so the simulator answers both aggregators alike;
- every call follows one explicit retry policy, the service's default (``RetryConfig``): the SDKs'
  own retries are off, and this module retries 408/429/5xx, timeouts and connection failures up to
  3 attempts in all, waiting as the provider's retry hint says (up to 30 s) or else a jittered
  exponential backoff (uniform in [0, min(8 s, 0.25 s x 2^(n-1))]), all inside one deadline per
  call. The hint is read where each provider puts it (Anthropic's ``retry-after``, OpenAI's
  rate-limit reset headers, Gemini's ``RetryInfo`` in the error body) by the adapters' own readers:
  the quick start's SDK calls would otherwise each need their own provider-specific parsing.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anthropic
import httpx
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from moa.benchmark.stats import Sample
from moa.config import RetryConfig
from moa.plan import DEFAULT_AGGREGATE_SYSTEM, DEFAULT_REFERENCE
from moa.providers.anthropic_client import DEFAULT_MAX_TOKENS as ANTHROPIC_MAX_TOKENS
from moa.providers.anthropic_client import MAX_TEMPERATURE as ANTHROPIC_MAX_TEMPERATURE
from moa.providers.anthropic_client import retry_hint as anthropic_hint
from moa.providers.gemini_client import retry_delay as gemini_hint
from moa.providers.openai_client import retry_hint as openai_hint
from moa.providers.wire import provider_service_time
from moa.types import GenerationParams

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    max_retry_after_s: float

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "retried": "HTTP 408, 429 and 5xx, timeouts, connection failures",
            "wait": "the provider's retry hint when given (failing at once past max_retry_after_s), "
            "else uniform in [0, min(backoff_max_s, backoff_base_s * 2^(attempt-1))]",
            "deadline": "one per call, across its attempts (the client timeout)",
            "sdk_retries": "off (OpenAI and Anthropic max_retries=0, google-genai attempts=1)",
        }


# The service's default policy (moa.config.RetryConfig), for all three SDKs alike.
RETRY = RetryPolicy(**RetryConfig().model_dump())
AGGREGATOR_PROMPT = "the service's default aggregate_system template with <reference id=N> blocks"

try:
    import aiohttp

    _TRANSPORT: tuple[type[BaseException], ...] = (httpx.TransportError, aiohttp.ClientError)
except ImportError:  # pragma: no cover - google-genai falls back to httpx without it
    _TRANSPORT = (httpx.TransportError,)


def aggregator_messages(prompt: str, answers: list[str]) -> list[dict[str, str]]:
    """The aggregator's messages: the answers as reference blocks in the system prompt, then the question."""
    refs = "\n\n".join(
        DEFAULT_REFERENCE.replace("{index}", str(i)).replace("{text}", text)
        for i, text in enumerate(answers, start=1)
    )
    system = DEFAULT_AGGREGATE_SYSTEM.replace("{references}", refs)
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def retryable(exc: BaseException) -> tuple[bool, float | None]:
    """Whether a failed attempt is worth another, and the wait the provider asked for if it did."""
    status: int | None = None
    hint: float | None = None
    if isinstance(exc, openai.APIStatusError):
        status, hint = exc.status_code, openai_hint(exc.response.headers)
    elif isinstance(exc, anthropic.APIStatusError):
        status, hint = exc.status_code, anthropic_hint(exc.response.headers)
    elif isinstance(exc, genai_errors.APIError):
        status, hint = exc.code, gemini_hint(exc.details)
    elif isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return True, None  # includes the SDKs' timeouts
    elif isinstance(exc, TimeoutError | _TRANSPORT):
        return True, None
    if status is None:
        return False, None
    return status in (408, 429) or status >= 500, hint


@dataclass(frozen=True)
class Said:
    """One call's answer: its text, the provider's service time, and the tokens it billed."""

    text: str
    service_s: float
    input_tokens: int
    output_tokens: int


NO_PARAMS = GenerationParams()


def _service(headers: Mapping[str, str] | None) -> float:
    """The response's service time, read as the service's adapters read it (0 when it says none)."""
    return provider_service_time(headers) or 0.0


class Baseline:
    """Three proposers (OpenAI, Anthropic, Gemini models) and an OpenAI aggregator."""

    def __init__(self, sim_url: str, timeout_s: float = 60.0, retry: RetryPolicy = RETRY) -> None:
        self.timeout_s, self.retry = timeout_s, retry
        self.openai = openai.AsyncOpenAI(
            base_url=sim_url + "/v1", api_key="bench", timeout=timeout_s, max_retries=0
        )
        self.anthropic = anthropic.AsyncAnthropic(
            base_url=sim_url, api_key="bench", timeout=timeout_s, max_retries=0
        )
        self.gemini = genai.Client(
            api_key="bench",
            http_options=types.HttpOptions(
                base_url=sim_url,
                api_version="v1beta",
                timeout=int(timeout_s * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    async def _with_retries(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """Run ``attempt(seconds_left)`` under the retry policy, inside one deadline for the call."""
        deadline = time.monotonic() + self.timeout_s
        tries = 0
        while True:
            tries += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the call's deadline passed")
            try:
                async with asyncio.timeout(left):
                    return await attempt(left)
            except Exception as exc:
                again, retry_after = retryable(exc)
                if not again or tries >= self.retry.max_attempts:
                    raise
                if retry_after is not None:
                    if retry_after > self.retry.max_retry_after_s:
                        raise
                    delay = retry_after
                else:
                    cap = min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2 ** (tries - 1))
                    delay = random.uniform(0, cap)
                if time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)

    async def _openai(
        self, model: str, messages: list[dict[str, str]], params: GenerationParams = NO_PARAMS
    ) -> Said:
        extra: dict[str, Any] = {}
        if params.max_tokens is not None:
            extra["max_completion_tokens"] = params.max_tokens
        if params.temperature is not None:
            extra["temperature"] = params.temperature
        if params.seed is not None:
            extra["seed"] = params.seed

        async def once(left: float) -> Said:
            raw = await self.openai.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                timeout=left,
                **extra,
            )
            r = raw.parse()
            used = r.usage
            return Said(
                r.choices[0].message.content or "",
                _service(raw.headers),
                used.prompt_tokens if used else 0,
                used.completion_tokens if used else 0,
            )

        return await self._with_retries(once)

    async def _anthropic(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams = NO_PARAMS,
        model: str = "claude-haiku-4-5",
    ) -> Said:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        extra: dict[str, Any] = {"system": system} if system else {}
        if params.temperature is not None:
            # anthropic 2.x takes no temperature argument; the API takes it in the body (0 to 1).
            extra["extra_body"] = {"temperature": min(params.temperature, ANTHROPIC_MAX_TEMPERATURE)}

        async def once(left: float) -> Said:
            raw = await self.anthropic.messages.with_raw_response.create(
                model=model,
                max_tokens=params.max_tokens or ANTHROPIC_MAX_TOKENS,
                messages=[m for m in messages if m["role"] != "system"],  # type: ignore[misc]
                timeout=left,
                **extra,
            )
            parsed = raw.parse()
            message = await parsed if inspect.isawaitable(parsed) else parsed
            text = "".join(getattr(b, "text", "") for b in message.content if b.type == "text")
            used = message.usage
            return Said(text, _service(raw.headers), used.input_tokens, used.output_tokens)

        return await self._with_retries(once)

    async def _gemini(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams = NO_PARAMS,
        model: str = "gemini-2.5-flash",
    ) -> Said:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        contents: Any = (
            turns[0]["content"]
            if len(turns) == 1 and turns[0]["role"] == "user"
            else [
                types.Content(
                    role="model" if m["role"] == "assistant" else "user",
                    parts=[types.Part(text=m["content"])],
                )
                for m in turns
            ]
        )

        async def once(left: float) -> Said:
            r = await self.gemini.aio.models.generate_content(
                model=model,
                contents=contents,
                config=types.GenerateContentConfig(
                    system_instruction=system or None,
                    temperature=params.temperature,
                    max_output_tokens=params.max_tokens,
                    seed=params.seed,
                    http_options=types.HttpOptions(
                        timeout=max(int(left * 1000), 1), retry_options=types.HttpRetryOptions(attempts=1)
                    ),
                ),
            )
            headers = r.sdk_http_response.headers if r.sdk_http_response else None
            used = r.usage_metadata
            return Said(
                r.text or "",
                _service(headers),
                (used.prompt_token_count or 0) if used else 0,
                (used.candidates_token_count or 0) if used else 0,
            )

        return await self._with_retries(once)

    async def call(
        self, kind: str, model: str, messages: list[dict[str, str]], params: GenerationParams = NO_PARAMS
    ) -> Said:
        """One call through the SDK of provider kind ``kind`` (openai, anthropic or gemini)."""
        if kind == "anthropic":
            return await self._anthropic(messages, params, model)
        if kind == "gemini":
            return await self._gemini(messages, params, model)
        if kind == "openai":
            return await self._openai(model, messages, params)
        raise ValueError(f"the baseline has no SDK for provider kind {kind!r}")

    async def ask(self, prompt: str) -> Sample:
        t0 = time.perf_counter()
        question = [{"role": "user", "content": prompt}]
        try:
            proposals = await asyncio.gather(
                self._openai("gpt-4.1-mini", question),
                self._anthropic(question),
                self._gemini(question),
            )
            final = await self._openai("gpt-4.1", aggregator_messages(prompt, [p.text for p in proposals]))
        except Exception as exc:
            return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=type(exc).__name__)
        critical = max(p.service_s for p in proposals) + final.service_s
        return Sample(e2e_s=time.perf_counter() - t0, ok=True, simulated_s=critical, met_quorum=True)

    async def aclose(self) -> None:
        await self.openai.close()
        await self.anthropic.close()
        await self.gemini.aio.aclose()
