"""deploy/: the Grafana dashboard, the Prometheus alert rules and scrape example fit the workers.

Every metric the dashboard and the alerts query must be one a real worker serves on
``/metrics`` (``up`` and RabbitMQ's ``rabbitmq_*`` are external); the files must have the
structure Grafana and Prometheus load. With ``promtool`` on the PATH (Debian: ``apt-get
install prometheus``) the rules, the dashboard's queries and the scrape config are also
checked by Prometheus' own parser.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from ai_service.metrics import Metrics
from tests.conftest import WorkerFactory
from tests.support.procs import REPO

SLEEPY = "tests.support.sleepy_worker"
DEPLOY = Path(REPO) / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ai-service.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
SUPERVISORD = Path(REPO) / "supervisord.conf"

#: Series not served by the workers: Prometheus' own ``up`` and the RabbitMQ plugin's.
EXTERNAL = re.compile(r"^(up|rabbitmq_\w+)$")
#: Labels Prometheus or the example scrape config add to every worker series.
TARGET_LABELS = {"job", "instance", "program", "gpu", "host"}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "last_over_time", "max_over_time", "min_over_time", "predict_linear", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "sum_over_time", "time", "timestamp", "vector",
    # aggregation operators
    "avg", "bottomk", "count", "count_values", "group", "max", "min", "quantile", "stddev", "stdvar", "sum", "topk",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
            "inf", "nan"}
#: Grafana's variables, replaced by something Prometheus can parse.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": "ai-service",
                "$instance": ".*"}
DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


# --- PromQL, cheaply ------------------------------------------------------------------


def _skeleton(expr: str) -> str:
    """The expression without strings, label matchers, ranges and by/on(...) label lists."""
    s = STRING.sub('""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are no function, keyword or label)."""
    s = _skeleton(expr)
    names = set(re.findall(rf"(?<![\w.$]){IDENT}\b(?!\s*\()", s)) - KEYWORDS
    selectors = set(re.findall(rf"(?<![\w.$])({IDENT})\s*\{{", STRING.sub('""', expr)))
    return names | selectors


def functions(expr: str) -> set[str]:
    return set(re.findall(rf"(?<![\w.$])({IDENT})\s*\(", _skeleton(expr)))


def selector_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for every label matcher in ``metric{...}``."""
    found = []
    for metric, body in re.findall(rf"({IDENT})\s*\{{((?:[^{{}}\"]|{STRING.pattern})*)\}}", expr):
        for label in re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)\s*\"", body):
            found.append((metric, label))
    return found


def promql_problems(expr: str) -> list[str]:
    """Syntax smells: unbalanced brackets, unknown functions, quote trouble, empty text."""
    problems = []
    if not expr.strip():
        return ["empty expression"]
    s = STRING.sub('""', expr)
    if '"' in s.replace('""', ""):
        problems.append("unterminated string")
    for string in STRING.findall(expr):  # Go's escapes only: a regex's \. must be written \\.
        bad = re.findall(r"\\[^abfnrtv\\\"'xuU0-7]", string.replace("\\\\", ""))
        if bad:
            problems.append(f"unknown escape {bad[0]} in {string}")
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            problems.append(f"unbalanced {ch!r}")
            break
    if stack:
        problems.append(f"unclosed {''.join(stack)!r}")
    unknown = functions(expr) - FUNCTIONS
    if unknown:
        problems.append(f"unknown functions {sorted(unknown)}")
    for rng in re.findall(r"\[([^\[\]]*)\]", s):
        if not (rng.startswith("$") or DURATION.match(rng)) or not rng:
            problems.append(f"bad range [{rng}]")
    return problems


def test_the_promql_checks_flag_made_up_names_and_broken_expressions() -> None:
    expr = 'sum by (op, le) (rate(ai_job_duration_seconds_bucket{job=~"$job", op="train"}[5m])) / on (op) ai_x'
    assert metric_names(expr) == {"ai_job_duration_seconds_bucket", "ai_x"}
    assert selector_labels(expr) == [("ai_job_duration_seconds_bucket", "job"),
                                     ("ai_job_duration_seconds_bucket", "op")]
    assert promql_problems(expr) == []
    assert promql_problems("sum(rate(ai_jobs_total[5m])") == ["unclosed '('"]
    assert promql_problems("rates(ai_jobs_total[5m])") == ["unknown functions ['rates']"]
    assert promql_problems("rate(ai_jobs_total[5 minutes])") == ["bad range [5 minutes]"]
    assert promql_problems(r'rabbitmq_queue_messages{queue=~".*\\.dlq"}') == []
    assert promql_problems(r'rabbitmq_queue_messages{queue=~".*\.dlq"}') == [r'unknown escape \. in ".*\.dlq"']


# --- the files ------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs = [(f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", t["expr"])
             for p in all_panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: {query!r} is not label_values(<selector>, <label>)"
            exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def load_alerts() -> dict[str, Any]:
    data = yaml.safe_load(ALERTS.read_text())
    assert isinstance(data, dict)
    return data


def alert_exprs(alerts: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"alert {r.get('alert')}", str(r.get("expr", ""))) for g in alerts["groups"] for r in g["rules"]]


# --- the tests ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except (OSError, urllib.error.URLError) as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered: {last}")


def served_series(text: str) -> set[str]:
    """Series names a /metrics text can give, from its families (labelled ones have no samples yet)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def class_labels() -> dict[str, set[str]]:
    """Series name -> label names, from the Metrics class the workers use."""
    out: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        name, labels = getattr(collector, "_name", None), getattr(collector, "_labelnames", None)
        if name is None or labels is None:
            continue
        kind = getattr(collector, "_type", "")
        if kind == "counter":
            out[f"{name}_total"] = set(labels)
        elif kind == "histogram":
            out[f"{name}_bucket"] = {*labels, "le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = set(labels)
        else:
            out[name] = set(labels)
    return out


def test_every_metric_the_dashboard_and_the_alerts_query_is_served_by_a_real_worker(
    start_worker: WorkerFactory,
) -> None:
    port = free_port()
    start_worker(module=SLEEPY, env={"METRICS_PORT": str(port)}, wait_started=False)
    served = served_series(scrape(f"http://127.0.0.1:{port}/metrics"))
    assert "ai_jobs_total" in served, sorted(served)
    assert "ai_inference_latency_seconds_bucket" in served, sorted(served)

    queried = dashboard_exprs(load_dashboard()) + alert_exprs(load_alerts())
    referenced: dict[str, list[str]] = {}
    for where, expr in queried:
        for name in metric_names(expr):
            referenced.setdefault(name, []).append(where)
    internal = {name for name in referenced if not EXTERNAL.match(name)}
    assert len(internal) >= 10, f"the name extraction found almost nothing: {sorted(referenced)}"
    missing = {name: referenced[name] for name in internal - served}
    assert not missing, f"queried but not served on /metrics: {missing}"

    labels = class_labels()
    bad_labels = sorted({(metric, label, where) for where, expr in queried
                         for metric, label in selector_labels(expr)
                         if metric in labels and label not in labels[metric] | TARGET_LABELS})
    assert not bad_labels, f"label matchers on labels the metric does not have: {bad_labels}"


def test_the_dashboard_loads_with_a_datasource_variable_a_worker_variable_and_queries_on_every_panel() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"]
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["includeAll"]
    assert variables["job"]["type"] == "query"

    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    for p in graphs:
        label = f"panel {p['id']} {p.get('title')!r}"
        assert p.get("title"), label
        assert p.get("description"), label
        assert p.get("datasource") == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, label
        pos = p["gridPos"]
        assert pos["w"] > 0, label
        assert pos["h"] > 0, label
        assert pos["x"] + pos["w"] <= 24, label
        targets = p.get("targets")
        assert targets, f"{label} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs), f"{label}: refIds {refs}"
        assert len(refs) == len(set(refs)), f"{label}: refIds {refs}"
        for t in targets:
            assert t.get("expr", "").strip(), f"{label} {t.get('refId')}: no expr"
            assert t.get("datasource", p["datasource"])["uid"] == "${DS_PROMETHEUS}", label
            assert "$instance" in t["expr"] or "rabbitmq_" in t["expr"], \
                f"{label}: worker query not filtered by the worker variable"
    for where, expr in dashboard_exprs(dashboard):
        assert promql_problems(expr) == [], f"{where}: {expr}"

    titles = " ".join(p["title"].lower() for p in graphs)
    for topic in ("jobs", "epoch", "latency", "batch size", "spool", "reconnects", "publisher connected",
                  "consumer state", "refused", "dropped", "connections closed", "dead-letter"):
        assert topic in titles, f"no panel about {topic!r}"
    dlq = [p for p in graphs if "dead-letter" in p["title"].lower()]
    assert all("rabbitmq" in p["description"].lower() for p in dlq), "the DLQ panel must say it is a broker metric"


def test_the_alert_rules_have_the_structure_prometheus_requires_and_sane_promql(tmp_path: Path) -> None:
    alerts = load_alerts()
    assert set(alerts) == {"groups"}
    assert alerts["groups"]
    group_names = [g["name"] for g in alerts["groups"]]
    assert all(group_names)
    assert len(group_names) == len(set(group_names))
    seen = set()
    for group in alerts["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            name = rule.get("alert")
            assert name, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
            assert name not in seen, f"alert {name} twice"
            seen.add(name)
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, name
            assert DURATION.match(str(rule.get("for", ""))), f"{name}: for {rule.get('for')!r}"
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
            assert rule["annotations"]["summary"].strip(), name
            assert rule["annotations"]["description"].strip(), name
            assert promql_problems(str(rule["expr"])) == [], f"{name}: {rule['expr']}"
    exprs = {r["alert"]: str(r["expr"]) for g in alerts["groups"] for r in g["rules"]}
    required = {
        "worker down": lambda e: re.search(r'\bup\{[^}]*job="ai-service"[^}]*\}\s*==\s*0', e),
        "DLQ growing": lambda e: "rabbitmq_" in e and "dlq" in e and ("delta(" in e or "deriv(" in e),
        "spool growing": lambda e: "ai_publisher_spool_messages" in e,
        "publisher disconnected": lambda e: re.search(r"ai_publisher_connected\{[^}]*\}\s*==\s*0", e),
        "failure rate": lambda e: "ai_jobs_total" in e and "failed" in e and "/" in e and "[15m]" in e,
        "consumer not consuming": lambda e: re.search(r"ai_consumer_state\{[^}]*\}\s*<\s*2", e),
    }
    for what, matches in required.items():
        assert any(matches(e) for e in exprs.values()), f"no alert for {what}"

    promtool = shutil.which("promtool")
    if promtool:  # the structural checks above always run; Prometheus' own parser when it is here
        _promtool(promtool, "check", "rules", str(ALERTS))
        rules = tmp_path / "dashboard-rules.yml"
        records = []
        for i, (where, expr) in enumerate(dashboard_exprs(load_dashboard())):
            for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{where}: a Grafana variable promtool cannot take: {expr}"
            records.append({"record": f"dashboard:query_{i}", "expr": expr})
        rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
        _promtool(promtool, "check", "rules", str(rules))


def _promtool(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def supervisor_port_prefixes() -> dict[str, str]:
    """Operation -> the two first digits of its workers' METRICS_PORT, as supervisord is told.

    Either ``[program:<op>]`` sections with ``METRICS_PORT="91%(process_num)02d"`` or, where the
    programs are generated elsewhere, the config's own ``METRICS_PORT 91nn (train), ...`` note.
    """
    text = SUPERVISORD.read_text()
    ports = dict(re.findall(r"\[program:(\w+)\][^\[]*?METRICS_PORT=\"(\d\d)%\(process_num\)02d\"", text))
    if not ports:
        note = re.search(r"METRICS_PORT\s+((?:\d\dnn \(\w+\)[,\s]*)+)", text)
        assert note, f"{SUPERVISORD} says nothing about METRICS_PORT"
        ports = {op: prefix for prefix, op in re.findall(r"(\d\d)nn \((\w+)\)", note.group(1))}
    return ports


def test_the_example_scrape_config_follows_supervisords_metrics_ports_and_loads_the_alerts() -> None:
    ports = supervisor_port_prefixes()
    assert ports == {"train": "91", "convert": "92", "infer": "93"}, ports
    config = yaml.safe_load(SCRAPE.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ai-service")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    programs = {r["replacement"]: r["regex"] for r in job["relabel_configs"] if r.get("target_label") == "program"}
    assert set(programs) == set(ports)
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets
    for target in targets:  # relabel regexes are anchored, as fullmatch is
        port = target.rsplit(":", 1)[1]
        owners = [program for program, regex in programs.items() if re.fullmatch(regex, target)]
        assert owners == [next(p for p, prefix in ports.items() if port.startswith(prefix))], target
    promtool = shutil.which("promtool")
    if promtool:
        _promtool(promtool, "check", "config", str(SCRAPE))
