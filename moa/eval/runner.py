"""Running an evaluation: answers first, then judgments, each written to the run directory the
moment it finishes, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moa.config import MoAConfig
from moa.engine.assembly import assemble
from moa.errors import MoAError
from moa.eval.budget import Budget
from moa.eval.judging import Judge
from moa.eval.targets import HttpTarget, Target, build_target
from moa.eval.workloads import Item, load_reference_outputs, load_workload, render_answers
from moa.providers.registry import ProviderPool
from moa.types import ChatMessage, GenerationParams

REFERENCE_OUTPUTS = "reference-outputs"
ANSWERS, JUDGMENTS, SPEC = "answers.jsonl", "judgments.jsonl", "run.json"


class EvalSpec(BaseModel):
    """What a run evaluates; saved as run.json so ``--resume`` continues the same run."""

    workload: str = Field(description="JSONL file of prompt, instruction or turns lines")
    limit: int | None = Field(default=None, description="only the first N items")
    mode: Literal["pairwise", "graded"] = Field(default="pairwise")
    targets: list[str] = Field(min_length=1, description="presets, provider/model or MODEL@URL")
    reference: str | None = Field(default=None, description="the target every other is compared with")
    reference_outputs: str | None = Field(default=None, description="a file of reference answers instead")
    judges: list[str] = Field(min_length=1, description="configured provider/model judges")
    max_tokens: int = Field(default=1024, ge=1, description="max_tokens of every target call")
    judge_max_tokens: int = Field(default=1024, ge=1, description="max_tokens of every judge call")
    temperature: float | None = Field(default=None, description="temperature of the target calls")
    service_url: str | None = Field(default=None, description="run bare targets on this moa service")

    def reference_name(self) -> str | None:
        return REFERENCE_OUTPUTS if self.reference_outputs else self.reference


class RunFiles:
    """The run directory: the spec and the two append-only JSONL logs (the last line for a key wins)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.answers: dict[tuple[str, str], dict[str, Any]] = {}
        self.judgments: dict[tuple[str, ...], dict[str, Any]] = {}
        for rec in self._read(ANSWERS):
            self.answers[(rec["target"], rec["item"])] = rec
        for rec in self._read(JUDGMENTS):
            self.judgments[judgment_key(rec)] = rec

    def _read(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.dir / name
        if not path.exists():
            return
        with path.open("rb+") as f:  # end a line cut by an interruption, so appends start afresh
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that unit runs again

    def _append(self, name: str, rec: dict[str, Any]) -> None:
        with (self.dir / name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()

    def add_answer(self, rec: dict[str, Any]) -> None:
        self.answers[(rec["target"], rec["item"])] = rec
        self._append(ANSWERS, rec)

    def add_judgment(self, rec: dict[str, Any]) -> None:
        self.judgments[judgment_key(rec)] = rec
        self._append(JUDGMENTS, rec)

    def ok_answer(self, target: str, item: str) -> dict[str, Any] | None:
        rec = self.answers.get((target, item))
        return rec if rec is not None and rec.get("error") is None else None

    def spent(self) -> float:
        return sum(r.get("cost_usd") or 0.0 for r in self.answers.values()) + sum(
            r.get("cost_usd") or 0.0 for r in self.judgments.values()
        )


def judgment_key(rec: dict[str, Any]) -> tuple[str, ...]:
    return (rec["kind"], rec["judge"], rec["target"], rec["item"], rec.get("order") or "")


def save_spec(run_dir: Path, spec: EvalSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")


def load_spec(run_dir: Path) -> EvalSpec:
    return EvalSpec.model_validate_json((run_dir / SPEC).read_text(encoding="utf-8"))


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar


async def _gather_bounded(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


class Evaluation:
    """One run: the targets answer every item, then the judges judge every answer."""

    def __init__(
        self,
        spec: EvalSpec,
        cfg: MoAConfig,
        run_dir: Path,
        *,
        concurrency: int = 8,
        max_cost_usd: float | None = None,
        progress: bool = False,
        service_key_env: str = "MOA_API_KEY",
        endpoint_key_env: str | None = None,
    ) -> None:
        self.spec = spec
        self.cfg = cfg
        self.files = RunFiles(run_dir)
        self.items: list[Item] = load_workload(Path(spec.workload), spec.limit)
        self.concurrency = concurrency
        self.budget = Budget(max_cost_usd, spent_usd=self.files.spent())
        self.show_progress = progress
        self.service_key_env = service_key_env
        self.endpoint_key_env = endpoint_key_env
        self.params = GenerationParams(max_tokens=spec.max_tokens, temperature=spec.temperature)

    def answering(self) -> list[str]:
        """Every target that answers: the targets, and the reference when it is a target too."""
        names = list(dict.fromkeys(self.spec.targets))
        ref = self.spec.reference
        if self.spec.mode == "pairwise" and ref and not self.spec.reference_outputs and ref not in names:
            names.append(ref)
        return names

    def _load_reference_outputs(self) -> None:
        if not self.spec.reference_outputs:
            return
        outputs = load_reference_outputs(Path(self.spec.reference_outputs), self.items)
        for item in self.items:
            if item.id in outputs and self.files.ok_answer(REFERENCE_OUTPUTS, item.id) is None:
                rec = {"target": REFERENCE_OUTPUTS, "item": item.id, "answers": outputs[item.id]}
                self.files.add_answer({**rec, "cost_usd": 0.0, "error": None})

    async def run(self) -> None:
        self._load_reference_outputs()
        async with ProviderPool.from_config(self.cfg, sim_url=self.cfg.simulator.url) as pool:
            engine = assemble(self.cfg, pool)
            targets = {
                name: build_target(
                    name,
                    self.cfg,
                    engine,
                    service_url=self.spec.service_url,
                    service_key_env=self.service_key_env,
                    endpoint_key_env=self.endpoint_key_env,
                )
                for name in self.answering()
            }
            judges = [Judge(j, self.cfg, pool, self.spec.judge_max_tokens) for j in self.spec.judges]
            try:
                with _progress(self.show_progress) as bar:
                    await self._answers(targets, bar)
                    await self._judgments(judges, bar)
            finally:
                for t in targets.values():
                    if isinstance(t, HttpTarget):
                        await t.close()

    # -- answers ---------------------------------------------------------------------------------

    async def _answers(self, targets: dict[str, Target], bar: Progress) -> None:
        todo = [
            (t, item)
            for t in targets.values()
            for item in self.items
            if self.files.ok_answer(t.name, item.id) is None
        ]
        task = bar.add_task("answers", total=len(todo))

        def job(target: Target, item: Item) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                await self._answer(target, item)
                bar.advance(task)

            return go

        await _gather_bounded([job(t, i) for t, i in todo], self.concurrency)

    async def _answer(self, target: Target, item: Item) -> None:
        """Every turn of one item; a later turn is asked after the target's own earlier answers."""
        messages: list[ChatMessage] = []
        rec: dict[str, Any] = {"target": target.name, "item": item.id, "answers": [], "cost_usd": 0.0}
        rec.update(input_tokens=0, output_tokens=0, latency_s=0.0, error=None)
        for turn in item.turns:
            messages.append(ChatMessage(role="user", content=turn))
            try:
                worst = await target.projected(messages, self.params)
            except MoAError as e:
                rec["error"] = f"{e.code}: {e.message}"
                break
            if not self.budget.reserve(worst):
                return  # stopped by --max-cost-usd: nothing written, so a resumed run asks again
            got = await target.answer(messages, self.params)
            self.budget.settle(worst, got.cost_usd)
            if got.cost_usd is None:
                rec["cost_usd"] = None  # unknown for this target
            elif rec["cost_usd"] is not None:
                rec["cost_usd"] += got.cost_usd
            rec["input_tokens"] += got.input_tokens
            rec["output_tokens"] += got.output_tokens
            rec["latency_s"] += got.latency_s
            if got.error is not None:
                rec["error"] = got.error
                break
            rec["answers"].append(got.text)
            messages.append(ChatMessage(role="assistant", content=got.text))
        self.files.add_answer(rec)

    # -- judgments -------------------------------------------------------------------------------

    def _judging_units(self, judges: list[Judge]) -> list[tuple[Judge, str, Item, str]]:
        units = []
        ref = self.spec.reference_name()
        for judge in judges:
            for target in self.spec.targets if self.spec.mode == "pairwise" else self.answering():
                if self.spec.mode == "pairwise" and target == ref:
                    continue
                orders = ("target_first", "reference_first") if self.spec.mode == "pairwise" else ("",)
                for item in self.items:
                    for order in orders:
                        key = (self.spec.mode, judge.name, target, item.id, order)
                        done = self.files.judgments.get(key)
                        if done is None or done.get("error") is not None:
                            units.append((judge, target, item, order))
        return units

    async def _judgments(self, judges: list[Judge], bar: Progress) -> None:
        units = self._judging_units(judges)
        task = bar.add_task("judgments", total=len(units))

        def job(judge: Judge, target: str, item: Item, order: str) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                await self._judge(judge, target, item, order)
                bar.advance(task)

            return go

        await _gather_bounded([job(*u) for u in units], self.concurrency)

    async def _judge(self, judge: Judge, target: str, item: Item, order: str) -> None:
        mine = self.files.ok_answer(target, item.id)
        if mine is None:
            return  # the target failed this item (counted in the report)
        rec: dict[str, Any] = {"kind": self.spec.mode, "judge": judge.name, "target": target}
        rec.update(item=item.id, order=order or None)
        if self.spec.mode == "graded":
            out = await judge.grade(item.question, render_answers(mine["answers"]), self.budget)
            rec["score"] = out.score
        else:
            ref_name = self.spec.reference_name()
            assert ref_name is not None
            theirs = self.files.ok_answer(ref_name, item.id)
            if theirs is None:
                return
            a, b = render_answers(mine["answers"]), render_answers(theirs["answers"])
            first, second = (a, b) if order == "target_first" else (b, a)
            out = await judge.pairwise(item.question, first, second, self.budget)
            rec["reference"] = ref_name
            rec["verdict"] = out.verdict.value if out.verdict else None
        if out.error == "max_cost":
            return  # not judged: a resumed run judges it
        rec.update(retried=out.retried, raw=out.raw, replies=out.replies, cost_usd=out.cost_usd)
        rec["error"] = out.error
        self.files.add_judgment(rec)
