"""The comparison point: Mixture-of-Agents as in the original MoA quick start.

One Python process, ``asyncio.gather`` over the official SDK clients for the proposers, then one
aggregator call with the answers pasted into its system prompt. No quorum, no deadline beyond
the SDK client's timeout, no fallbacks: it waits for every proposer. Written independently of the
project's engine on purpose, but the aggregator's prompt has the service's shape: its default
aggregation template with each answer in a ``<reference id="N">`` block (only the template strings
are shared, the rendering is written here), so the simulator answers both aggregators alike.
"""

from __future__ import annotations

import asyncio
import inspect
import time

import anthropic
import openai
from google import genai
from google.genai import types

from moa.benchmark.stats import Sample
from moa.engine.plan import DEFAULT_AGGREGATE_SYSTEM, DEFAULT_REFERENCE

AGGREGATOR_PROMPT = "the service's default aggregate_system template with <reference id=N> blocks"


def aggregator_messages(prompt: str, answers: list[str]) -> list[dict[str, str]]:
    """The aggregator's messages: the answers as reference blocks in the system prompt, then the question."""
    refs = "\n\n".join(
        DEFAULT_REFERENCE.replace("{index}", str(i)).replace("{text}", text)
        for i, text in enumerate(answers, start=1)
    )
    system = DEFAULT_AGGREGATE_SYSTEM.replace("{references}", refs)
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def _service(headers: object) -> float:
    value = getattr(headers, "get", lambda _k: None)("x-sim-service-time")
    return float(value) if value else 0.0


class Baseline:
    """Three proposers (OpenAI, Anthropic, Gemini models) and an OpenAI aggregator."""

    def __init__(self, sim_url: str, timeout_s: float = 60.0) -> None:
        self.openai = openai.AsyncOpenAI(base_url=sim_url + "/v1", api_key="bench", timeout=timeout_s)
        self.anthropic = anthropic.AsyncAnthropic(base_url=sim_url, api_key="bench", timeout=timeout_s)
        self.gemini = genai.Client(
            api_key="bench",
            http_options=types.HttpOptions(
                base_url=sim_url, api_version="v1beta", timeout=int(timeout_s * 1000)
            ),
        )

    async def _openai(self, model: str, messages: list[dict[str, str]]) -> tuple[str, float]:
        raw = await self.openai.chat.completions.with_raw_response.create(model=model, messages=messages)  # type: ignore[arg-type]
        return raw.parse().choices[0].message.content or "", _service(raw.headers)

    async def _anthropic(self, prompt: str) -> tuple[str, float]:
        raw = await self.anthropic.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=1024, messages=[{"role": "user", "content": prompt}]
        )
        parsed = raw.parse()
        message = await parsed if inspect.isawaitable(parsed) else parsed
        text = "".join(getattr(b, "text", "") for b in message.content if b.type == "text")
        return text, _service(raw.headers)

    async def _gemini(self, prompt: str) -> tuple[str, float]:
        r = await self.gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=prompt)
        headers = r.sdk_http_response.headers if r.sdk_http_response else None
        return r.text or "", _service(headers)

    async def ask(self, prompt: str) -> Sample:
        t0 = time.perf_counter()
        try:
            proposals = await asyncio.gather(
                self._openai("gpt-4.1-mini", [{"role": "user", "content": prompt}]),
                self._anthropic(prompt),
                self._gemini(prompt),
            )
            _, aggregate_s = await self._openai(
                "gpt-4.1", aggregator_messages(prompt, [text for text, _ in proposals])
            )
        except Exception as exc:
            return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=type(exc).__name__)
        critical = max(s for _, s in proposals) + aggregate_s
        return Sample(e2e_s=time.perf_counter() - t0, ok=True, simulated_s=critical, met_quorum=True)

    async def aclose(self) -> None:
        await self.openai.close()
        await self.anthropic.close()
        await self.gemini.aio.aclose()
