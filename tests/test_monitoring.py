"""The monitoring we ship, tested like code (issue 30): the Prometheus rules and the Grafana
dashboard under ``observability/``.

- ``promtool check rules`` and ``promtool test rules`` (tests/prometheus/alerts_test.yaml: for
  every alert, the series that must fire it and the series beside them that must not);
- every alert's summary, description and runbook section (docs/MONITORING.md);
- the dashboard is Grafana JSON that imports: rows, panels, one datasource variable;
- every metric name and label the rules and the dashboard read is one the service exports, compared
  with a scrape of Ray's metrics endpoint, so a rename cannot break them silently; and each series
  docs/OBSERVABILITY.md lists moves on the event it counts, on the same app;
- end to end: a real Prometheus (started here on a free port) scrapes the session cluster while
  the simulator fails half of a proposer's calls and slows the aggregator; both alerts fire through
  Prometheus's HTTP API, and clear once the faults stop.

The promtool and Prometheus tests skip when the binaries are absent (``apt-get install
prometheus``); ``.ci/run`` installs them, so CI always runs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from moa.api.admission import Admission
from moa.api.errors import ApiError
from moa.auth import Principal, new_key, new_record
from moa.config import parse_config
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits
from moa.state.redis_store import RedisStore
from tests.helpers import delete_app, set_fault, trimmed_config
from tests.test_observability import _series_value
from tests.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "observability" / "prometheus"
RULES, ALERTS = PROMETHEUS_DIR / "rules.yaml", PROMETHEUS_DIR / "alerts.yaml"
DASHBOARD = ROOT / "observability" / "grafana" / "moa-serve.json"
UNIT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yaml"
RUNBOOK = ROOT / "docs" / "MONITORING.md"
ROWS = [
    "Traffic and errors",
    "Latency and time to first token by preset",
    "Providers",
    "Cost and budgets",
    "Cache",
    "Answer quality",
]


def _binary(name: str) -> str:
    """The binary, or a skip with its reason; in CI (which installs it) a failure instead."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (apt-get install prometheus); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules(ALERTS)}


# -- the rules, statically ---------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        [_binary("promtool"), "check", "rules", str(RULES), str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass_and_fire_every_alert() -> None:
    """The unit tests pass, and each alert has a case where it must fire (the cases beside it, in
    the same input, are the series that must not): an alert with no test fails here."""
    out = subprocess.run(
        [_binary("promtool"), "test", "rules", str(UNIT_TESTS)],
        capture_output=True,
        text=True,
        cwd=UNIT_TESTS.parent,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    fired = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(_alerts()) <= fired, f"alerts no unit test fires: {sorted(set(_alerts()) - fired)}"


def test_every_alert_has_a_summary_a_description_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    alerts = _alerts()
    assert len(alerts) >= 11, sorted(alerts)
    for name, rule in alerts.items():
        notes = rule["annotations"]
        assert notes["summary"].strip() and len(notes["description"].split()) > 15, name
        assert notes["runbook"] == f"docs/MONITORING.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/MONITORING.md has no section for {name}"


def test_admission_names_each_request_it_sheds() -> None:
    """moa_requests_shed's reasons, as the alert reads them: capacity (``overloaded``, the one
    MoARequestsShed counts) apart from a key's own share and from a drain."""
    shed: list[str] = []
    admission = Admission(2, key_share=0.5, on_shed=shed.append)
    keyed = Principal(new_record("team", new_key(), KeyLimits()))
    first = admission.take(keyed)
    with pytest.raises(ApiError):
        admission.take(keyed)  # the key holds its share (1 of 2)
    second = admission.take()
    with pytest.raises(ApiError):
        admission.take()  # the replica is full
    first.release()
    second.release()
    admission.draining = True
    with pytest.raises(ApiError):
        admission.take()
    assert shed == ["concurrency_limit_exceeded", "overloaded", "shutting_down"]


# -- the dashboard -----------------------------------------------------------------------------------


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_the_dashboard_is_importable_grafana_json_with_its_rows() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = _panels()
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            for t in p["targets"]:
                assert t["expr"] and t["datasource"]["uid"] == "${datasource}", p["title"]


# -- names and labels, against a scrape --------------------------------------------------------------

GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
NAME = re.compile(r"\b(ray_\w+|moa:[\w:]+)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _expressions() -> list[tuple[str, str]]:
    """Every PromQL expression we ship, with where it is: rules, alerts, dashboard panels and the
    dashboard's variable queries (``label_values(metric, label)`` as ``metric`` grouped by label)."""
    exprs = [
        (f"rule {r.get('record') or r.get('alert')}", str(r["expr"])) for r in _rules(RULES) + _rules(ALERTS)
    ]
    for p in _panels():
        exprs += [(f"panel {p['title']}", t["expr"]) for t in p.get("targets", [])]
    for v in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v.get("definition", ""))
        if found:
            exprs.append((f"variable {v['name']}", f"max by ({found[2]}) ({found[1]})"))
    return exprs


def _uses(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(series names, labels matched per selector's series, labels grouped or joined on)."""
    grouped = {
        label.strip() for labels in GROUPING.findall(expr) for label in labels.split(",") if label.strip()
    }
    bare = GROUPING.sub(" ", expr)
    matched: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(bare):
        matched.setdefault(name, set()).update(MATCHER.findall(matchers))
    names = set(NAME.findall(STRING.sub('""', SELECTOR.sub(lambda m: m[1], bare))))
    return names, matched, grouped


def _scrape(cluster: dict[str, Any]) -> dict[str, set[str]]:
    """Series name -> every label name it carries, across the nodes' metrics endpoints."""
    found: dict[str, set[str]] = {}
    for port in cluster["metrics"].values():
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? ", line)
            if m and not line.startswith("#"):
                found.setdefault(m[1], set()).update(re.findall(r'(\w+)="', m[2] or ""))
    return found


def _missing(scraped: dict[str, set[str]]) -> list[str]:
    """What the rules and the dashboard read that the scrape does not have: series names, labels
    matched on a series that does not carry them, labels grouped on that no series under the
    expression carries. A recording rule's series carries the labels of the series it is made of,
    plus its own static labels."""
    recorded: dict[str, set[str]] = {}  # recording rule -> the ray_ series it is made of
    static: set[str] = set()
    for rule in _rules(RULES):
        if "record" in rule:
            recorded.setdefault(rule["record"], set()).update(_uses(str(rule["expr"]))[0])
            static |= set(rule.get("labels", {}))

    def sources(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if name.startswith("ray_"):
            return {name}
        return {s for n in recorded.get(name, set()) - seen for s in sources(n, seen | {name})}

    problems = []
    for where, expr in _expressions():
        names, matched, grouped = _uses(expr)
        under = {s for n in names for s in sources(n)}
        carried = {label for s in under for label in scraped.get(s, set())} | static
        for name in names:
            if name.startswith("moa:") and name not in recorded:
                problems.append(f"{where}: {name} is recorded by no rule")
            elif name.startswith("ray_") and name not in scraped:
                problems.append(f"{where}: {name} is not exported")
        for name, labels in matched.items():
            have = scraped.get(name, set()) if name.startswith("ray_") else carried
            problems += [f"{where}: {name} has no label {label}" for label in sorted(labels - have)]
        problems += [f"{where}: no series carries {label}" for label in sorted(grouped - carried - {"le"})]
    return problems


def test_the_name_check_catches_a_renamed_metric_or_label() -> None:
    """The checker itself: given a scrape that lacks one name or one label, it says so."""
    names = {n for _, e in _expressions() for n in _uses(e)[0] if n.startswith("ray_")}
    full = {
        n: {
            "application",
            "deployment",
            "replica",
            "le",
            "preset",
            "status",
            "reason",
            "cache",
            "kind",
            "key",
            "target",
            "outcome",
            "route",
            "bound",
            "moa_provider",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "error_type",
        }
        for n in names
    }
    assert _missing(full) == []
    renamed = {n: labels for n, labels in full.items() if n != "ray_moa_requests_shed_total"}
    assert any("ray_moa_requests_shed_total is not exported" in p for p in _missing(renamed))
    relabelled = {n: labels - {"gen_ai_request_model"} for n, labels in full.items()}
    assert any("gen_ai_request_model" in p for p in _missing(relabelled))


# -- the Ray side: an app of its own, and a real Prometheus -------------------------------------------

APP, PREFIX = "moa-monitoring", "/mon"
QUESTION = "How do vaccines train the immune system?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def monitored(cluster: dict[str, Any], redis_server: str) -> Iterator[dict[str, Any]]:
    """An app of its own on the session cluster (application ``moa-monitoring``): its state in a
    Redis database no other test uses (MOA_STATE_DIR, which every Ray worker inherits, would win
    over a ``state.dir``) with two keys (one with a budget that holds, one with a budget nothing
    fits), a memory cache, the LLM classifier for ``auto``, shadow evaluation of ``single`` and
    ``auto``, at most 4 requests in progress (so a burst is shed), and gemini without retries (so a
    fault on half its calls fails half its calls). The documented series and the monitoring's own
    are proven on this one app (each app deployed costs the session half a minute)."""
    serve = pytest.importorskip("ray.serve")
    from moa_serve_app import build_from_config

    url = re.sub(r"/\d+$", "/9", redis_server)
    key, tiny = new_key(), new_key()

    async def keys() -> None:
        store = RedisStore(url)
        try:
            await store.client.flushdb()
            await store.create_key(new_record("ops", key, KeyLimits(budget_usd=1000.0)))
            await store.create_key(new_record("tiny", tiny, KeyLimits(budget_usd=0.000001)))
        finally:
            await store.close()

    asyncio.run(keys())
    raw = trimmed_config(cluster["config"])
    raw["providers"]["gemini"]["retry"] = {"max_attempts": 1}
    raw["state"] = {"redis_url": url}
    raw["server"]["max_concurrent_requests"] = 4
    raw["cache"] = {"enabled": True, "store": "memory"}
    raw["router"]["classifier"] = "llm"
    raw["router"]["classifier_model"] = {"provider": "openai", "model": "gpt-4o-mini"}
    # Every answer to `single` and `auto` shadowed: a baseline answer and two judge calls.
    shadow = {"enabled": True, "sample_rate": 1.0, "presets": ["single", "auto"]}
    raw["eval"] = {"shadow": shadow | {"baseline": "openai/gpt-4o-mini", "judge": "openai/gpt-4.1-mini"}}
    serve.run(build_from_config(parse_config(raw, "the monitoring config")), name=APP, route_prefix=PREFIX)
    try:
        yield {"url": str(cluster["url"]) + PREFIX, "key": key, "tiny": tiny, "cluster": cluster}
    finally:
        delete_app(APP)


def _no_faults(sim: SimulatorServer) -> None:
    httpx.delete(f"{sim.url}/admin/faults").raise_for_status()


def _ask(
    app: dict[str, Any], body: dict[str, Any], key: str | None = None, timeout: float = 60
) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": f"{QUESTION} ({uuid.uuid4().hex[:8]})"}], **body}
    headers = {"Authorization": f"Bearer {key or app['key']}"}
    return httpx.post(app["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


@pytest.mark.ray
def test_every_documented_series_moves_when_its_event_happens(
    monitored: dict[str, Any], sim: SimulatorServer
) -> None:
    """Each series docs/OBSERVABILITY.md lists, made to move by the event it counts, in the
    monitoring app (its LLM classifier's cache, the one cache ``auto`` consults before the answer
    cache). It runs first on that app: the counts it expects exactly are the app's first."""
    cluster = monitored["cluster"]
    app = {"application": APP}
    headers = {"Authorization": f"Bearer {monitored['key']}"}

    def ask(body: dict[str, Any], question: str | None = None) -> httpx.Response:
        # A question of its own unless named: the app's answer cache must not answer it.
        question = question or f"{QUESTION} ({uuid.uuid4().hex[:8]})"
        body = {"messages": [{"role": "user", "content": question}], **body}
        return httpx.post(monitored["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60)

    def scrape() -> str:
        return "\n".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for port in cluster["metrics"].values()
        )

    def fault(model: str, **faults: Any) -> None:
        httpx.put(f"{sim.url}/admin/faults/{model}", json=faults).raise_for_status()

    try:
        # The same question routed twice: the second decision comes from the classifier's cache.
        assert ask({"model": "auto"}, QUESTION).status_code == 200
        assert ask({"model": "auto"}, QUESTION).status_code == 200
        # A streamed answer: time to first chunk.
        assert ask({"model": "moa-lite", "stream": True}).status_code == 200
        # A proposer failing: a provider error.
        fault("gemini-2.5-flash", error_500={"rate": 1.0})
        assert ask({"model": "moa-lite"}).status_code == 200
        # Two proposers failing: the quorum missed, a fallback answered.
        fault("claude-haiku-4-5", error_503={"rate": 1.0})
        assert ask({"model": "moa-lite"}).status_code == 200
        _no_faults(sim)
        expected = {
            "ray_gen_ai_client_operation_duration_bucket": {"gen_ai_provider_name": "gcp.gemini"},
            "ray_gen_ai_client_token_usage_bucket": {"gen_ai_token_type": "output"},
            "ray_gen_ai_client_time_to_first_chunk_bucket": {"gen_ai_request_model": "gpt-4.1"},
            "ray_moa_provider_requests_total": {"gen_ai_request_model": "gpt-4o-mini"},
            "ray_moa_provider_errors_total": {"error_type": "server_error"},
            "ray_moa_provider_cost_usd_total": {"gen_ai_request_model": "gpt-4.1"},
            "ray_moa_requests_total": {"preset": "moa-lite", "status": "200"},
            "ray_moa_request_duration_bucket": {"preset": "moa-lite"},
            "ray_moa_quorum_shortfalls_total": {"preset": "moa-lite"},
            "ray_moa_fallbacks_total": {"preset": "moa-lite", "reason": "quorum_missed"},
            "ray_moa_cache_hits_total": {"cache": "router_classifier"},
            "ray_moa_shadow_evaluations_total": {"preset": "auto"},
            # Its interval's upper bound: above 0 whatever the verdicts were.
            "ray_moa_shadow_win_rate": {"preset": "auto", "bound": "high"},
            "ray_moa_shadow_cost_usd_total": {"preset": "auto", "role": "judge"},
        }

        def moved(text: str) -> dict[str, float]:
            return {name: _series_value(text, name, **app, **tags) for name, tags in expected.items()}

        # Ray's metrics agents export on their own period: wait until every series is there.
        values = wait_until_sync(
            lambda: moved(scrape()),
            lambda v: all(v.values()),
            within_s=120,
            interval=1,
            what="every documented series",
        )
        assert values["ray_moa_quorum_shortfalls_total"] == 1
        assert values["ray_moa_fallbacks_total"] == 1
        assert values["ray_moa_cache_hits_total"] == 1
        # Every aggregator failing is a fallback, and no missed quorum.
        for model in ("gpt-4.1", "claude-sonnet-4-6"):
            fault(model, error_500={"rate": 1.0})
        assert ask({"model": "moa-lite"}).status_code == 200
        reason = {"preset": "moa-lite", "reason": "aggregators_failed"}
        text = wait_until_sync(
            scrape,
            lambda t: _series_value(t, "ray_moa_fallbacks_total", **app, **reason) == 1,
            within_s=120,
            interval=1,
            what="the aggregator fallback counted",
        )
        assert _series_value(text, "ray_moa_quorum_shortfalls_total", **app, preset="moa-lite") == 1
        assert "sk-" not in text
    finally:
        _no_faults(sim)


@pytest.mark.ray
def test_every_metric_and_label_the_rules_and_dashboard_use_is_exported(
    monitored: dict[str, Any], sim: SimulatorServer
) -> None:
    """Each series the rules and the dashboard read, made to move in the monitoring app, then
    compared with a scrape: a metric or label renamed in the code fails here, not in production."""
    app = monitored
    same = {"model": "single", "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]}
    headers = {"Authorization": f"Bearer {app['key']}"}
    for _ in range(2):  # a miss, then a hit of the final cache; and two shadow evaluations
        r = httpx.post(app["url"] + "/v1/chat/completions", json=same, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
    assert _ask(app, {"model": "moa-lite", "stream": True}).status_code == 200  # time to first token
    assert _ask(app, {"model": "single"}, key=app["tiny"]).status_code == 429  # a budget refusal
    set_fault(sim, "gemini-2.5-flash", error_500={"rate": 1.0})
    set_fault(sim, "claude-haiku-4-5", error_503={"rate": 1.0})
    assert _ask(app, {"model": "moa-lite"}).status_code == 200  # errors, a missed quorum, a fallback
    _no_faults(sim)
    set_fault(sim, "gpt-4.1", hang={"hang_s": 2.0})
    with ThreadPoolExecutor(8) as pool:  # more than the 4 requests in progress the app admits
        statuses = list(pool.map(lambda _: _ask(app, {"model": "moa-lite"}).status_code, range(8)))
    assert 429 in statuses and 200 in statuses, statuses
    _no_faults(sim)

    def problems() -> list[str]:
        return _missing(_scrape(app["cluster"]))

    # Ray's metrics agents export on their own period: wait until every series is there.
    wait_until_sync(problems, lambda p: not p, within_s=120, interval=2, what="every series the rules read")
    # The budget gauge says what the ledger says: "ops" spent a little of its 1000 USD, "tiny"
    # nothing of its one micro-dollar (its request was refused before any call).
    text = "\n".join(
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for port in app["cluster"]["metrics"].values()
    )
    used = {
        k: _series_value(text, "ray_moa_key_budget_used_ratio", application=APP, key=k)
        for k in ("ops", "tiny")
    }
    assert 0 < used["ops"] < 0.01 and used["tiny"] == 0, used


class Prometheus:
    """A real Prometheus server on a free loopback port, scraping the cluster's metrics endpoints
    every second and evaluating ``rule_files`` every second."""

    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return self.proc.poll() is not None  # exited: stop waiting, the assertion below says why

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def alerts(self, app: str) -> dict[str, set[tuple[str, str]]]:
        """Firing alerts of ``app``: alert name -> {(preset or model label, state)}."""
        r = httpx.get(self.url + "/api/v1/alerts", timeout=10)
        r.raise_for_status()
        found: dict[str, set[tuple[str, str]]] = {}
        for a in r.json()["data"]["alerts"]:
            labels = a["labels"]
            if labels.get("application") == app and a["state"] == "firing":
                subject = labels.get("preset") or labels.get("gen_ai_request_model") or ""
                found.setdefault(labels["alertname"], set()).add((subject, a["state"]))
        return found

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _test_copy(directory: Path) -> list[Path]:
    """The shipped rules with every window at 8 s (four of the session cluster's 2 s metric export
    periods, tests/conftest.py's CLUSTER_ENV), no ``for:`` wait, and moa-lite's latency threshold
    at 1 s, so an alert fires, and clears, within a test's time; every expression is otherwise
    the shipped one."""
    copies = []
    for path in (RULES, ALERTS):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                rule["expr"] = re.sub(r"\[\d+[mh]\]", "[8s]", str(rule["expr"]))
                if "for" in rule:
                    rule["for"] = "0s"
                if rule.get("labels", {}).get("preset") == "moa-lite" and "record" in rule:
                    rule["expr"] = "vector(1)"
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(doc))
        copies.append(copy)
    return copies


@pytest.mark.ray
def test_alerts_fire_on_a_real_prometheus_and_clear(
    monitored: dict[str, Any], sim: SimulatorServer, tmp_path: Path
) -> None:
    """gemini-2.5-flash fails half its calls and gpt-4.1 (moa-lite's aggregator) answers 1.5 s late
    while clients keep asking: MoAProposerSuccessRateLow fires for gemini-2.5-flash alone and
    MoAPresetLatencyHigh for moa-lite. The faults stop, the clients go on: both clear, on data
    that says healthy (not on the absence of data)."""
    app = monitored
    ports = app["cluster"]["metrics"].values()
    prom = Prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports], _test_copy(tmp_path))
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        end = time.monotonic() + 300  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < end:
            statuses.append(_ask(app, {"model": "moa-lite"}).status_code)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    try:
        wait_until_sync(prom.ready, what="Prometheus to be ready")
        assert prom.proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        set_fault(sim, "gemini-2.5-flash", error_500={"rate": 0.5})
        set_fault(sim, "gpt-4.1", hang={"hang_s": 1.5})
        for c in clients:
            c.start()
        expected = {
            "MoAProposerSuccessRateLow": {("gemini-2.5-flash", "firing")},
            "MoAPresetLatencyHigh": {("moa-lite", "firing")},
        }
        fired = wait_until_sync(
            lambda: prom.alerts(APP),
            lambda a: all(a.get(name, set()) >= want for name, want in expected.items()),
            within_s=150,
            interval=1,
            what="both alerts to fire",
        )
        # Only the faulty model and preset: the healthy proposers do not fire.
        assert fired["MoAProposerSuccessRateLow"] == {("gemini-2.5-flash", "firing")}, fired
        assert fired["MoAPresetLatencyHigh"] == {("moa-lite", "firing")}, fired
        _no_faults(sim)

        def state() -> dict[str, Any]:
            def value(expr: str) -> float | None:
                found = prom.query(expr)
                return float(found[0]["value"][1]) if found else None

            alerts = prom.alerts(APP)
            return {
                "gemini": value(
                    f'moa:provider_success_ratio:rate5m{{application="{APP}",gen_ai_request_model="gemini-2.5-flash"}}'
                ),
                "p95": value(f'moa:request_duration_seconds:p95_5m{{application="{APP}",preset="moa-lite"}}'),
                "alerts": {name: alerts.get(name) for name in expected},
            }

        def healthy(s: dict[str, Any]) -> bool:
            # Cleared on data that says healthy: the figures are there, and good.
            good = s["gemini"] is not None and s["gemini"] >= 0.9 and s["p95"] is not None and s["p95"] < 1
            return good and not any(s["alerts"].values())

        wait_until_sync(state, healthy, within_s=150, interval=1, what="both alerts to clear on healthy data")
    finally:
        stop.set()
        # Their last requests end here, not in the app's teardown (which no longer waits for them).
        for c in clients:
            if c.is_alive():
                c.join(120)
        _no_faults(sim)
        prom.stop()
    assert statuses.count(200) >= 20, statuses
