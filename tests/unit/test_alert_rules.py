"""The alerting rules and the Grafana dashboard: valid PromQL (promtool), unit-tested alerts, the operator's copy
of the rules equal to the plain file, and only metrics that /metrics exports (or the rules record)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.runtime.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
OPERATOR_RULES = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"

# What Grafana puts in place of the dashboard's variables, for promtool to parse the expressions.
VARIABLES = {"model": ".*", "__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_WORDS |= {"unless", "inf", "nan"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install prometheus (Debian/Ubuntu) brings /usr/bin/promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression with Grafana's variables substituted) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown dashboard variable ${name}"
        return VARIABLES[name]

    return [
        (panel["title"], re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, target["expr"]))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: its identifiers, less strings, label lists, functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name not in PROMQL_WORDS}


def _exported() -> set[str]:
    """Metric names as Prometheus sees them: /metrics' families with their suffixes, and the recorded ones."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names |= {family.name, *(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count"))}
    return names | {rule["record"] for rule in _rules() if "record" in rule}


def test_the_operator_rules_are_the_plain_rules():
    operator = yaml.safe_load(OPERATOR_RULES.read_text())
    assert operator["apiVersion"] == "monitoring.coreos.com/v1" and operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        f"{OPERATOR_RULES.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: see its header to regenerate it"
    )


def test_every_alert_says_how_bad_and_what_to_do_and_is_tested_both_ways():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert {"ModelFeatureDrift", "ModelServing5xxRatioHigh", "ModelVersionErrorRatioHigh"} <= alerts.keys()
    assert {"ModelQueueSaturated", "ModelServingLatencyHigh", "ModelDown"} <= alerts.keys()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 100, name
    checks = [c for test in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in test.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in checks if c["exp_alerts"]}
    quiet = {c["alertname"] for c in checks if not c["exp_alerts"]}
    assert fires == quiet == alerts.keys(), "every alert needs a promtool test where it fires and one where it does not"


def test_the_rules_and_the_dashboard_read_only_exported_metrics():
    exprs = [rule["expr"] for rule in _rules()] + [expr for _, expr in _dashboard_exprs()]
    used = set().union(*map(_metric_names, exprs))
    assert {"http_requests_total", "model_queue_capacity", "model_feature_drift_psi"} <= used  # the parser works
    assert used <= _exported(), f"not exported by /metrics nor recorded: {used - _exported()}"


def test_promtool_checks_the_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_has_its_variables_and_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"].startswith("label_values(")
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("latency", "throughput", "queue", "batch size", "drift", "error ratio"):
        assert topic in titles


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule's expression: a typo fails here, not in Grafana."""
    exprs = _dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    titles = "\n".join(f"dashboard:query_{i}: {title}" for i, (title, _) in enumerate(exprs))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{titles}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
