"""``moa bench --compare``: the baseline script making the very calls the service makes, and the
proof that it did.

The plain baseline (``moa.benchmark.baseline.Baseline.ask``) is a fixed script: three proposers
asked the bare question, one aggregator. A preset may ask otherwise (role prompts, a second
layer, a plan's ``max_tokens``, temperature or seed), and the simulator's answer, so its length
and the time it takes, follows from the model, every message, the seed and ``max_tokens``
(``moa.simulator.text.compose``): different calls, different end-to-end times, nothing to compare.

``PresetBaseline`` is the same script (the official SDKs, ``asyncio.gather`` per layer, then one
aggregator, waiting for every call: no quorum, no grace, no fallback) whose calls are built as the
engine builds them, with the engine's own functions: the preset's proposers layer by layer, each
with its role prompt and the previous layer's answers (``with_references``, fitted to the model's
window by ``fit_call``), its parameters merged with the plan's (``merge_params``), then the
preset's first aggregator over the last layer's answers. Both sides keep each request's calls
(the service's from its ``moa.detail``, the script's from the SDKs' usage), and ``role_rows``
pairs them call by call, so the report shows whether the outputs matched rather than assuming it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from moa.benchmark.baseline import Baseline, Said
from moa.benchmark.stats import Sample, percentile
from moa.config import ConfigError, MoAConfig
from moa.engine.calls import fit_call, merge_params, provider_kind
from moa.engine.prompts import with_references
from moa.plan import ModelRef, Plan, PlanMode
from moa.types import ChatMessage, GenerationParams

# The goals of issue 31 for calls compared like for like: each role's output tokens within 2% of
# the baseline's, the service's end-to-end p50 within 3% of the baseline's.
OUTPUT_GOAL = 0.02
E2E_GOAL = 0.03


def compared_preset(targets: Sequence[str]) -> str:
    """The one preset a ``--compare`` run's service targets name; ``ConfigError`` (exit 2) when the
    run has no baseline, no service target, or service targets naming different models."""
    models = {t.split(":", 1)[1] for t in targets if t.startswith(("serve:", "local:"))}
    if "baseline" not in targets or len(models) != 1:
        raise ConfigError(
            "--compare needs the baseline and one model on serve:/local: targets "
            f"(got {', '.join(targets)}), e.g. --targets baseline,local:moa-lite"
        )
    return models.pop()


def layered_plan(config: MoAConfig, name: str) -> Plan:
    """The preset ``name``, if it is one the script can mirror: layers of proposers, then an
    aggregator (``ConfigError`` naming why not, otherwise)."""
    plan = config.presets.get(name)
    if plan is None:
        raise ConfigError(
            f"--compare needs a preset, not {name!r} (one of {', '.join(sorted(config.presets))})"
        )
    if plan.mode is PlanMode.REFINE or not plan.layers or not plan.aggregators:
        raise ConfigError(
            f"--compare mirrors layered presets (proposer layers, then an aggregator); {name} is not one"
        )
    if plan.aggregation != "final":
        raise ConfigError(
            f"--compare mirrors the final aggregation (every answer, then the aggregator); {name} "
            f"aggregates {plan.aggregation!r}"
        )
    return plan


def call_record(
    stage: str, layer: int | None, provider: str, model: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """One call as both sides keep it."""
    return {
        "stage": stage,
        "layer": layer,
        "provider": provider,
        "model": model,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    }


def service_calls(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """A service request's calls from its ``moa.detail``: those that answered (a cut straggler or a
    failed attempt is no call the script made)."""
    return [
        call_record(
            c["stage"],
            c.get("layer"),
            c["provider"],
            c["model"],
            c["usage"]["input_tokens"],
            c["usage"]["output_tokens"],
        )
        for c in detail["calls"]
        if c["ok"] and not c.get("cancelled_straggler")
    ]


def role(call: dict[str, Any]) -> str:
    """What a call is for in its request: ``proposer 1: openai/gpt-4.1-mini``, ``aggregator: ...``."""
    where = f"{call['stage']} {call['layer']}" if call["stage"] == "proposer" else call["stage"]
    return f"{where}: {call['provider']}/{call['model']}"


class PresetBaseline:
    """The baseline script making the calls preset ``name`` makes (see the module's docstring).

    Each answered request's calls go to ``keep``, with its prompt and end-to-end time."""

    def __init__(
        self, base: Baseline, config: MoAConfig, name: str, keep: list[dict[str, Any]] | None
    ) -> None:
        self.base, self.config, self.keep = base, config, keep
        self.plan = layered_plan(config, name)

    async def _call(
        self,
        stage: str,
        layer: int | None,
        ref: ModelRef,
        messages: list[ChatMessage],
        params: GenerationParams,
    ) -> tuple[Said, dict[str, Any]]:
        kind = provider_kind(self.config, ref.provider)
        sent = [{"role": m.role, "content": m.content} for m in messages]
        said = await self.base.call(kind, ref.model, sent, params)
        return said, call_record(stage, layer, ref.provider, ref.model, said.input_tokens, said.output_tokens)

    async def ask(self, prompt: str) -> Sample:
        t0 = time.perf_counter()
        plan, config, templates = self.plan, self.config, self.config.templates
        question = [ChatMessage(role="user", content=prompt)]
        params = GenerationParams()
        references: list[str] = []
        calls: list[dict[str, Any]] = []
        critical = 0.0
        try:
            for index, layer in enumerate(plan.layers, start=1):
                jobs = []
                for spec in layer.proposers:
                    refs, _, _ = fit_call(
                        config, references, spec, question, params, plan.reference_budget_tokens
                    )
                    messages = with_references(question, refs, templates, role=spec.role)
                    jobs.append(self._call("proposer", index, spec, messages, merge_params(params, spec)))
                done = await asyncio.gather(*jobs)
                references = [said.text for said, _ in done]
                calls += [record for _, record in done]
                critical += max(said.service_s for said, _ in done)
            agg = plan.aggregators[0]
            refs, _, cap = fit_call(config, references, agg, question, params, plan.reference_budget_tokens)
            agg_params = merge_params(params, agg)
            if cap is not None and agg_params.max_tokens is None:
                agg_params = agg_params.model_copy(update={"max_tokens": cap})
            said, record = await self._call(
                "aggregator", None, agg, with_references(question, refs, templates), agg_params
            )
        except Exception as exc:
            return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=type(exc).__name__)
        e2e = time.perf_counter() - t0
        if self.keep is not None:
            self.keep.append({"prompt": prompt, "e2e_s": e2e, "calls": [*calls, record]})
        return Sample(e2e_s=e2e, ok=True, simulated_s=critical + said.service_s, met_quorum=True)


def pairs(
    service: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each service call with the baseline's call of the same role for the same prompt: the n-th
    request for a prompt on one side with the n-th on the other, the n-th call of a role in it with
    the n-th (a role twice in a request: an aggregator retried down its chain). Calls with no
    partner are left out (``unpaired`` counts them)."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for req in baseline:
        by_prompt.setdefault(req["prompt"], []).append(req)
    out = []
    for req in service:
        mates = by_prompt.get(req["prompt"])
        if not mates:
            continue
        mate = mates.pop(0)
        theirs: dict[str, list[dict[str, Any]]] = {}
        for call in mate["calls"]:
            theirs.setdefault(role(call), []).append(call)
        for call in req["calls"]:
            same = theirs.get(role(call))
            if same:
                out.append((call, same.pop(0)))
    return out


def unpaired(service: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> int:
    """Calls on either side with no partner on the other (see ``pairs``)."""
    total = sum(len(r["calls"]) for r in service) + sum(len(r["calls"]) for r in baseline)
    return total - 2 * len(pairs(service, baseline))


def _difference(ours: float, theirs: float) -> float:
    """The service's figure relative to the baseline's (0.0: equal)."""
    if theirs == 0:
        return 0.0 if ours == 0 else float("inf")
    return (ours - theirs) / theirs


def role_rows(service: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per role (in the order the service's calls first show it): the paired calls, each side's
    mean input and output tokens per call, the difference of the outputs' sums, and the largest
    difference of one call's output from its partner's."""
    grouped: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for ours, theirs in pairs(service, baseline):
        grouped.setdefault(role(ours), []).append((ours, theirs))
    rows = []
    for name, matched in grouped.items():
        n = len(matched)
        out_ours = sum(o["output_tokens"] for o, _ in matched)
        out_theirs = sum(t["output_tokens"] for _, t in matched)
        rows.append(
            {
                "role": name,
                "calls": n,
                "baseline_input_tokens": sum(t["input_tokens"] for _, t in matched) / n,
                "service_input_tokens": sum(o["input_tokens"] for o, _ in matched) / n,
                "baseline_output_tokens": out_theirs / n,
                "service_output_tokens": out_ours / n,
                "difference": _difference(out_ours, out_theirs),
                "largest_call_difference": max(
                    abs(_difference(o["output_tokens"], t["output_tokens"])) for o, t in matched
                ),
            }
        )
    return rows


def e2e_row(service: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both sides' end-to-end p50 over the requests they kept, and the service's relative to the
    baseline's."""
    ours = percentile([1000 * r["e2e_s"] for r in service], 50)
    theirs = percentile([1000 * r["e2e_s"] for r in baseline], 50)
    return {
        "baseline_p50_ms": theirs,
        "service_p50_ms": ours,
        "ratio": ours / theirs if theirs else float("nan"),
    }


def _tokens(v: float) -> str:
    return f"{v:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.0f}"


def _signed(v: float) -> str:
    return f"{100 * v:+.1f}%"


def compare_tables(block: dict[str, Any], levels: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The markdown of a ``--compare`` run (the report's ``compare`` block): per service target and
    level, each role's tokens on both sides, then both sides' end-to-end p50, each against its goal,
    beside their simulated p50 (from the report's ``levels``): the e2e figures compare the
    orchestrations only where the simulated work was the same."""
    baseline = {b["concurrency"]: b["requests"] for b in block["baseline"]}
    simulated = {(r["target"], r["concurrency"]): r.get("simulated_p50_ms") for r in levels}
    lines: list[str] = []
    e2e: list[str] = []
    for entry in block["services"]:
        c, ours = entry["concurrency"], entry["requests"]
        theirs = baseline.get(c)
        if theirs is None:
            continue
        rows = role_rows(ours, theirs)
        lines += [
            "",
            f"| like for like: {entry['target']} against the baseline making its calls, concurrency {c} "
            f"({len(ours)} and {len(theirs)} requests, {unpaired(ours, theirs)} calls unpaired) "
            "| calls paired | input tokens/call, baseline | service | output tokens/call, baseline | service "
            f"| difference | largest in one call | within {100 * OUTPUT_GOAL:.0f}%? |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            met = abs(r["difference"]) <= OUTPUT_GOAL and r["largest_call_difference"] <= OUTPUT_GOAL
            lines.append(
                f"| {r['role']} | {r['calls']} | {_tokens(r['baseline_input_tokens'])} "
                f"| {_tokens(r['service_input_tokens'])} | {_tokens(r['baseline_output_tokens'])} "
                f"| {_tokens(r['service_output_tokens'])} | {_signed(r['difference'])} "
                f"| {100 * r['largest_call_difference']:.1f}% | {'yes' if met else '**no**'} |"
            )
        t = e2e_row(ours, theirs)
        met = abs(t["ratio"] - 1) <= E2E_GOAL
        work = [simulated.get((name, c)) for name in ("baseline", entry["target"])]
        e2e.append(
            f"| {entry['target']} | {c} | {_ms(work[0])} | {_ms(work[1])} | {t['baseline_p50_ms']:.0f} "
            f"| {t['service_p50_ms']:.0f} | {t['ratio']:.3f} | {'yes' if met else '**no**'} |"
        )
    if e2e:
        lines += [
            "",
            "| like for like: end-to-end | concurrency | simulated p50 ms, baseline | service "
            f"| e2e p50 ms, baseline | service | service/baseline | within {100 * E2E_GOAL:.0f}%? |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *e2e,
        ]
    return lines
