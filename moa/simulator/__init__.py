"""Provider simulator: a real HTTP server speaking the OpenAI, Anthropic and Gemini wire protocols.

With no API keys (or in tests and benchmarks) the official SDKs talk to it through their
``base_url``, so every byte they parse is shaped like the real APIs' answers, streams and errors.
Latency, answer style and faults come from a ``SimProfile``; ``/admin/*`` exposes counters and
lets tests inject faults at run time. Nothing here imports Ray.
"""
