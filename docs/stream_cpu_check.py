"""CPU per raw streamed call, by HTTP client under the SDK: the measurement behind the OpenAI and
Anthropic clients' move to aiohttp (docs/BENCHMARKS.md, "Where the CPU goes").

Each SDK's documented raw streaming response (``with_streaming_response``, as the adapters open
their streams) is read to its end against the provider simulator, once with the SDK's default
HTTP client and once with its ``DefaultAioHttpClient``; Gemini's client (google-genai, on aiohttp
when it is installed) is read through ``generate_content_stream`` for comparison. Rounds of
``CALLS`` concurrent calls, interleaved, three of each; the median CPU per call of this process
(the simulator runs in a process of its own).

    python docs/stream_cpu_check.py [CALLS] [TOKENS_PER_S]

At 50 tokens/s (the bench's default profile) nearly every token is an event of its own.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
from google import genai
from google.genai import types

from moa.benchmark.runner import Simulator

QUESTION = [{"role": "user", "content": "Explain how a compiler works, in detail."}]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(calls: int, tokens_per_s: float) -> None:
    sim = Simulator(0.01, tokens_per_s, 0.0)
    try:
        url = sim.url

        async def openai_raw(client: Any) -> None:
            opened = client.chat.completions.with_streaming_response.create(
                model="gpt-4.1-mini", messages=QUESTION, stream=True
            )
            async with opened as response:
                async for _ in response.iter_bytes():
                    pass

        async def anthropic_raw(client: Any) -> None:
            opened = client.messages.with_streaming_response.create(
                model="claude-haiku-4-5", max_tokens=1024, messages=QUESTION, stream=True
            )
            async with opened as response:
                async for _ in response.iter_bytes():
                    pass

        async def gemini_stream(client: Any) -> None:
            stream = await client.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents=QUESTION[0]["content"]
            )
            async for _ in stream:
                pass

        oa = dict(base_url=url + "/v1", api_key="x", max_retries=0)
        an = dict(base_url=url, api_key="x", max_retries=0)
        cases: list[tuple[str, Callable[[Any], Awaitable[None]], Any]] = [
            ("openai, default client", openai_raw, openai.AsyncOpenAI(**oa)),
            (
                "openai, aiohttp",
                openai_raw,
                openai.AsyncOpenAI(**oa, http_client=openai.DefaultAioHttpClient()),
            ),
            ("anthropic, default client", anthropic_raw, anthropic.AsyncAnthropic(**an)),
            (
                "anthropic, aiohttp",
                anthropic_raw,
                anthropic.AsyncAnthropic(**an, http_client=anthropic.DefaultAioHttpClient()),
            ),
            (
                "gemini (google-genai)",
                gemini_stream,
                genai.Client(api_key="x", http_options=types.HttpOptions(base_url=url, api_version="v1beta")),
            ),
        ]
        rounds: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _, call, client in cases:  # warm-up: the SDKs build their models on first use
            await asyncio.gather(*(call(client) for _ in range(3)))
        for _ in range(3):
            for name, call, client in cases:
                before = cpu_s()
                await asyncio.gather(*(call(client) for _ in range(calls)))
                rounds[name].append(1000 * (cpu_s() - before) / calls)
        for name, values in rounds.items():
            each = ", ".join(f"{v:.2f}" for v in values)
            print(f"{name}: CPU ms/call {sorted(values)[1]:.2f} (rounds {each})")
        for _, _, client in cases:
            await (client.aio.aclose() if isinstance(client, genai.Client) else client.close())
    finally:
        sim.stop()


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 30, float(sys.argv[2]) if len(sys.argv) > 2 else 50.0)
    )
