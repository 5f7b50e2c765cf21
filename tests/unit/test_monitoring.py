"""The monitoring bundle: alert rules, their promtool tests, runbook, PrometheusRule, dashboard.

* ``promtool check rules`` / ``promtool test rules`` pass (promtool comes from Debian's
  ``prometheus`` package; a missing promtool FAILS the test, it is never skipped);
* every alert has a firing and a non-firing promtool test case, a severity, a summary, a
  templated description and a runbook_url whose anchor is a heading of docs/runbook.md;
* manifests/monitoring/prometheusrule.yaml is exactly what hack/gen_prometheusrule.py makes;
* the rules and the dashboard use only the metrics listed in ``METRICS`` below: the ones the
  operator and the application library export. Keep it in step with
  ``src/rotation_operator/operator/metrics.py`` (a renamed metric must fail here, not go
  silently flat in production).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
RULES = MONITORING / "rules.yml"
PROMETHEUSRULE = MONITORING / "prometheusrule.yaml"
KUSTOMIZATION = MONITORING / "kustomization.yaml"
DASHBOARD = MONITORING / "dashboard.json"
RULES_TEST = ROOT / "tests" / "monitoring" / "rules_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
GENERATOR = ROOT / "hack" / "gen_prometheusrule.py"
RUNBOOK_URL = "https://github.com/rotation-operator/rotation-operator/blob/main/docs/runbook.md#"
JOB = 'job="rotation-operator"'

#: Every metric family the operator and the application library export: name -> (type,
#: carries the namespace and policy labels). Histograms also match _bucket, _sum and _count.
METRICS: dict[str, tuple[str, bool]] = {
    "rotation_operator_rotations_total": ("counter", True),
    "rotation_operator_rows_reencrypted_total": ("counter", True),
    "rotation_operator_rotation_duration_seconds": ("histogram", True),
    "rotation_operator_rotation_in_progress": ("gauge", True),
    "rotation_operator_rotation_rows_done": ("gauge", True),
    "rotation_operator_rotation_rows_total": ("gauge", True),
    "rotation_operator_rotation_last_progress_timestamp_seconds": ("gauge", True),
    "rotation_operator_active_key_version": ("gauge", True),
    "rotation_operator_active_key_created_timestamp_seconds": ("gauge", True),
    "rotation_operator_max_key_age_seconds": ("gauge", True),
    "rotation_operator_last_rotation_finished_timestamp_seconds": ("gauge", True),
    "rotation_operator_secret_rows": ("gauge", True),
    "rotation_operator_legacy_rows": ("gauge", True),
    "rotation_operator_stale_rows": ("gauge", True),
    "rotation_operator_retired_key_rows": ("gauge", True),
    "rotation_operator_rows_keys": ("gauge", True),
    "rotation_operator_decrypt_failures_total": ("counter", True),
    # exposed by the applications using the library: label keys_table, their own job
    "rotation_operator_library_decrypt_failures_total": ("counter", False),
    "rotation_operator_policy_condition": ("gauge", True),
    "rotation_operator_throttled": ("gauge", True),
    "rotation_operator_replication_lag_seconds": ("gauge", True),
    "rotation_operator_leader": ("gauge", False),
    "rotation_operator_api_request_duration_seconds": ("histogram", False),
    "rotation_operator_build_info": ("gauge", False),
}
#: Series Prometheus writes itself for every scrape target.
SYNTHETIC = {"up"}
LIBRARY = "rotation_operator_library_decrypt_failures_total"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SEVERITIES = {"critical", "warning"}


# -- helpers -------------------------------------------------------------------------------
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer, not a parser: enough for
    the expressions of this repository, which promtool parses for real)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)           # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)          # ranges and subqueries
    text = _GROUPING.sub(" ", text)                  # label lists of by/on/...
    text = re.sub(r"\$\{?\w+\}?", " ", text)         # Grafana variables
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", text[m.end():]):
            continue  # keyword, or a function / aggregation
        names.add(word)
    return names


def family(name: str) -> str | None:
    """The METRICS (or SYNTHETIC) family ``name`` belongs to, or None."""
    if name in METRICS or name in SYNTHETIC:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base, ("", False))[0] == "histogram":
            return base
    return None


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers (text between braces, '' if none) of every use of ``name``."""
    pattern = re.compile(rf"(?<![\w:$]){re.escape(name)}(?![\w:])\s*(\{{[^}}]*\}})?")
    return [m.group(1) or "" for m in pattern.finditer(expr)]


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in RUNBOOK.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = anchor = github_anchor(m.group(1))
            n = 0
            while anchor in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found on PATH: install it with `apt-get install prometheus` "
                    "(Debian's package ships /usr/bin/promtool)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def assert_promtool_ok(*args: str) -> None:
    proc = promtool(*args)
    assert proc.returncode == 0, (
        f"promtool {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and annotation query of the dashboard."""
    out = []
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel.get('title')!r} {target.get('refId')}",
                        target.get("expr", "")))
    for ann in dash.get("annotations", {}).get("list", []):
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    return out


# -- promtool ------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    assert_promtool_ok("check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_unit_tests() -> None:
    assert_promtool_ok("test", "rules", str(RULES_TEST.relative_to(ROOT)))


def test_unit_tests_load_the_shipped_rules() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    files = [(RULES_TEST.parent / f).resolve() for f in doc["rule_files"]]
    assert files == [RULES.resolve()]


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert not (firing | quiet) - names, "tests name alerts that rules.yml does not have"
    assert not names - firing, f"alerts without a firing test case: {sorted(names - firing)}"
    assert not names - quiet, f"alerts without a non-firing test case: {sorted(names - quiet)}"


# -- the alerts themselves -----------------------------------------------------------------
def test_alerts_are_labelled_and_annotated() -> None:
    rules = alerts()
    assert rules, "rules.yml has no alerts"
    names = [a["alert"] for a in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for a in rules:
        where = a["alert"]
        assert a.get("labels", {}).get("severity") in SEVERITIES, where
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert str(ann.get(key, "")).strip(), f"{where}: no annotations.{key}"
        assert "{{ $labels." in ann["description"], f"{where}: description not templated"


def test_runbook_urls_point_at_runbook_sections() -> None:
    anchors = runbook_anchors()
    seen: dict[str, str] = {}
    for a in alerts():
        url = a["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL), f"{a['alert']}: {url}"
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor in anchors, f"{a['alert']}: no heading with anchor #{anchor} in {RUNBOOK}"
        assert anchor not in seen, f"{a['alert']} shares its runbook section with {seen[anchor]}"
        seen[anchor] = a["alert"]


def test_github_anchor() -> None:
    assert github_anchor("RotationOperatorDown") == "rotationoperatordown"
    assert github_anchor("Rows: under a `retired` key!") == "rows-under-a-retired-key"


def test_rules_use_only_exported_metrics() -> None:
    used: set[str] = set()
    for rule in load_rules():
        names = metric_names(rule["expr"])
        unknown = {n for n in names if family(n) is None}
        assert not unknown, f"{rule.get('alert')}: unknown metrics {sorted(unknown)}"
        used |= names
        for name in names - {LIBRARY}:  # the library counter comes from the applications
            for sel in selectors(rule["expr"], name):
                assert JOB in sel, f"{rule.get('alert')}: {name}{sel} lacks {JOB}"
    # the tokenizer did find the metrics (a test that sees nothing would pass vacuously)
    assert {"up", "rotation_operator_leader", "rotation_operator_retired_key_rows",
            LIBRARY} <= used


def test_metric_names_tokenizer() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, api) (rate(x_bucket{a="b{c}", d=~"$v"}'
            '[$__rate_interval]))) > on (job) group_left (version) y offset 5m '
            'and time() - z{k="and"} > 1e3 or vector(0) unless sum(w) without (instance)')
    assert metric_names(expr) == {"x_bucket", "y", "z", "w"}
    assert family("rotation_operator_rotation_duration_seconds_bucket") == (
        "rotation_operator_rotation_duration_seconds")
    assert family("rotation_operator_leader_count") is None
    assert family("rotation_operator_secret_rows_sum") is None  # not a histogram


# -- PrometheusRule ------------------------------------------------------------------------
def test_prometheusrule_is_generated_from_rules() -> None:
    generated = load_generator().render(RULES.read_text())
    assert PROMETHEUSRULE.read_text() == generated, (
        "manifests/monitoring/prometheusrule.yaml is stale: run "
        ".venv/bin/python hack/gen_prometheusrule.py")
    manifest = yaml.safe_load(generated)
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["namespace"] == "rotation-operator"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_monitoring_kustomization_is_separate() -> None:
    kust = yaml.safe_load(KUSTOMIZATION.read_text())
    assert "prometheusrule.yaml" in kust["resources"]
    main = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    assert not [r for r in main.get("resources", []) if "monitoring" in r], (
        "manifests/kustomization.yaml must not include monitoring/: clusters without the "
        "Prometheus Operator lack the PrometheusRule CRD")


# -- dashboard -----------------------------------------------------------------------------
def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "policy"} <= set(variables)
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    graphs = [p for p in all_panels(dash["panels"]) if p["type"] != "row"]
    assert len(graphs) >= 8
    for panel in graphs:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel.get("targets"), f"{where}: no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{where}: empty expr"
            assert target["datasource"]["uid"] == "${datasource}", where


def test_dashboard_uses_only_exported_metrics_and_the_variables() -> None:
    dash = dashboard()
    used: set[str] = set()
    for where, expr in dashboard_exprs(dash):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = {n for n in names if family(n) is None}
        assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr!r}"
        for name in names:
            fam = family(name)
            assert fam is not None
            per_policy = fam in METRICS and METRICS[fam][1]
            for sel in selectors(expr, name):
                if fam != LIBRARY:
                    assert "$job" in sel, f"{where}: {name}{sel} ignores $job"
                if per_policy or fam == LIBRARY:
                    assert "$namespace" in sel, f"{where}: {name}{sel} ignores $namespace"
                if per_policy:
                    assert "$policy" in sel, f"{where}: {name}{sel} ignores $policy"
        used |= {known for n in names if (known := family(n))}
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            assert m, f"variable {var['name']}: {var['definition']!r}"
            assert all(family(n) for n in metric_names(m.group(1))), var["name"]
    # what the dashboard must show
    wanted = {"rotation_operator_rotation_rows_done", "rotation_operator_rotation_rows_total",
              "rotation_operator_rows_reencrypted_total", "rotation_operator_rows_keys",
              "rotation_operator_active_key_created_timestamp_seconds",
              "rotation_operator_rotations_total", "rotation_operator_decrypt_failures_total",
              "rotation_operator_throttled", "rotation_operator_replication_lag_seconds",
              "rotation_operator_api_request_duration_seconds", "rotation_operator_leader"}
    assert not wanted - used, f"dashboard lacks {sorted(wanted - used)}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (variables replaced by sample values)."""
    subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m",
             "$job": "rotation-operator", "$namespace": ".*", "$policy": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs(dashboard())):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unhandled variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_promtool_ok("check", "rules", str(path))
