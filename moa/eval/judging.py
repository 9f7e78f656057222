"""Judges: a configured model asked for a pairwise verdict or a 1-10 rating.

A reply whose verdict cannot be read is followed, once, by a stricter instruction in the same
conversation; the outcome says whether that happened and, when even the retry could not be read,
carries no verdict so the report counts it as unparseable instead of dropping it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moa.caller import ModelCaller
from moa.config import JudgeTemplates, MoAConfig
from moa.eval.budget import Budget
from moa.eval.verdict import GRADED_FORMAT, PAIRWISE_FORMAT, Verdict, parse_pairwise, parse_rating
from moa.tokens import approx_message_tokens
from moa.types import CallRequest, ChatMessage, GenerationParams, prompt_texts

RAW_KEPT_CHARS = 2000


def fill(template: str, **values: str) -> str:
    """``str.format`` for our placeholders only, so braces elsewhere in a template are harmless."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


@dataclass(slots=True)
class JudgeOutcome:
    verdict: Verdict | None = None
    score: float | None = None
    retried: bool = False
    # The judge's last reply (its last RAW_KEPT_CHARS characters): the one the verdict was read
    # from, or the one that could not be read even after the retry; "" when no reply came. The
    # same in every record, retried or not: every reply, in order, is in ``replies``.
    raw: str = ""
    # Every reply of the judge, one per attempt that answered (a retried judgment has two), each
    # cut as ``raw`` is: what a retried judge said first is kept, not overwritten.
    replies: list[str] = field(default_factory=list)
    cost_usd: float = 0.0
    error: str | None = None  # the judge's call failed (not the same as an unreadable verdict)


class Judge:
    """One configured model as a judge, called through the provider pool (or, in the service,
    whatever transport the engine uses)."""

    def __init__(self, spec: str, cfg: MoAConfig, pool: ModelCaller, max_tokens: int) -> None:
        provider, _, model = spec.partition("/")
        if not model or provider not in cfg.providers or model not in cfg.providers[provider].models:
            raise ValueError(f"unknown judge {spec!r}: a configured provider/model")
        self.name = spec
        self.provider, self.model = provider, model
        self.pool = pool
        self.templates: JudgeTemplates = cfg.eval.templates
        self.price = cfg.price(provider, model)
        self.params = GenerationParams(temperature=0.0, max_tokens=max_tokens)

    def projected(self, messages: list[ChatMessage]) -> float:
        tokens = approx_message_tokens(prompt_texts(messages))
        out = min(self.params.max_tokens or self.price.max_output_tokens, self.price.max_output_tokens)
        return self.price.cost(tokens, out)

    async def _ask(
        self, messages: list[ChatMessage], parse: Callable[[str], object], fmt: str, budget: Budget
    ) -> tuple[object, JudgeOutcome]:
        out = JudgeOutcome()
        for attempt in (1, 2):
            worst = self.projected(messages)
            if not budget.reserve(worst):
                out.error = "max_cost"
                return None, out
            res = await self.pool.call(
                CallRequest(
                    provider=self.provider, model=self.model, messages=tuple(messages), params=self.params
                )
            )
            out.cost_usd += res.cost_usd
            budget.settle(worst, res.cost_usd)
            if not res.ok:
                assert res.error is not None
                out.error = f"{res.error.kind}: {res.error.message}"
                return None, out
            out.raw = res.text[-RAW_KEPT_CHARS:]
            out.replies.append(out.raw)
            got = parse(res.text)
            if got is not None or attempt == 2:
                return got, out
            out.retried = True
            messages = [
                *messages,
                ChatMessage(role="assistant", content=res.text or "(no reply)"),
                ChatMessage(role="user", content=fill(self.templates.judge_retry, format=fmt)),
            ]
        raise AssertionError("unreachable")

    async def pairwise(self, question: str, first: str, second: str, budget: Budget) -> JudgeOutcome:
        t = self.templates
        messages = [
            ChatMessage(role="system", content=t.judge_pairwise_system),
            ChatMessage(
                role="user",
                content=fill(t.judge_pairwise, question=question, answer_a=first, answer_b=second),
            ),
        ]
        got, out = await self._ask(messages, parse_pairwise, PAIRWISE_FORMAT, budget)
        out.verdict = got if isinstance(got, Verdict) else None
        return out

    async def grade(self, question: str, answer: str, budget: Budget) -> JudgeOutcome:
        t = self.templates
        messages = [
            ChatMessage(role="system", content=t.judge_graded_system),
            ChatMessage(role="user", content=fill(t.judge_graded, question=question, answer=answer)),
        ]
        got, out = await self._ask(messages, parse_rating, GRADED_FORMAT, budget)
        out.score = got if isinstance(got, float) else None
        return out
