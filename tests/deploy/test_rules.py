"""The shipped alert rules: valid for Prometheus, unit-tested alert by alert, documented, routed."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.deploy.promql import (
    ALERTMANAGER_CONFIG,
    DEPLOY,
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES,
    alert_rules,
    parse_duration,
    runbook_anchors,
    scaled_rules,
    selectors,
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian prometheus packages)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules_passes():
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_reports_a_broken_expectation(tmp_path):
    """The unit tests can fail: flip one expected severity and promtool must say FAILED."""
    broken = RULE_TESTS.read_text().replace("severity: critical, component: learner",
                                            "severity: warning, component: learner", 1)
    assert broken != RULE_TESTS.read_text()
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / RULE_TESTS.name).write_text(broken)
    result = run(tool("promtool"), "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0
    assert "StreamlearnLearnerDiverged" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    cases: dict[str, dict[str, int]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            kind = "fires" if case["exp_alerts"] else "silent"
            counts = cases.setdefault(case["alertname"], {"fires": 0, "silent": 0})
            counts[kind] += 1
            for alert in case["exp_alerts"]:
                # the annotations are checked too: templating works and names the model
                assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for name in names:
        assert cases.get(name, {}).get("fires", 0) >= 1, f"{name}: no unit test where it fires"
        assert cases[name]["silent"] >= 1, f"{name}: no unit test where it stays silent"
    assert set(cases) <= set(names), f"tests for unknown alerts: {set(cases) - set(names)}"


REQUIRED_ALERTS = {
    "StreamlearnDown", "StreamlearnNotReady", "StreamlearnConceptDrift", "StreamlearnDataDrift",
    "StreamlearnEstimatedAccuracyLow", "StreamlearnEstimatedAccuracyDrop", "StreamlearnRealizedAccuracyDrop",
    "StreamlearnConsumerLagGrowing", "StreamlearnNoEventsIngested", "StreamlearnDeadLettersRising",
    "StreamlearnPendingLabelsGrowing", "StreamlearnCheckpointStale", "StreamlearnCheckpointFailing",
    "StreamlearnLearnerDiverged", "StreamlearnPredictLatencyHigh",
}


def test_the_issue_s_alerts_are_all_there():
    assert {rule["alert"] for rule in alert_rules()} >= REQUIRED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_is_labelled_and_documented(rule):
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["labels"]["component"] in {"availability", "ingest", "drift", "performance", "learner",
                                           "checkpoint", "latency"}
    ann = rule["annotations"]
    assert ann["summary"] and ann["description"]
    metrics = {name for name, _ in selectors(rule["expr"])}
    if metrics != {"up"}:  # `up` has no model label; that alert names the instance
        assert "$labels.model" in ann["summary"] and "$labels.model" in ann["description"]
    page, _, anchor = ann["runbook_url"].partition("#")
    assert page == "docs/runbook.md"
    assert anchor == rule["alert"].lower()
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section #{anchor}"


def test_scaled_copy_changes_only_durations():
    fast = yaml.safe_load(scaled_rules(1 / 60))
    shipped = yaml.safe_load(RULES.read_text())
    for g_fast, g_ship in zip(fast["groups"], shipped["groups"], strict=True):
        for r_fast, r_ship in zip(g_fast["rules"], g_ship["rules"], strict=True):
            assert r_fast["labels"] == r_ship["labels"] and r_fast["annotations"] == r_ship["annotations"]
            if "for" in r_ship:
                assert parse_duration(r_fast["for"]) == pytest.approx(parse_duration(r_ship["for"]) / 60)
            assert selectors(r_fast["expr"]) == selectors(r_ship["expr"])
    assert "rate(streamlearn_events_total[5000ms])" in scaled_rules(1 / 60)


def test_prometheus_config_is_valid_and_scrapes_job_streamlearn():
    result = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # the rules select job="streamlearn"
    assert jobs["streamlearn"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


def test_alertmanager_config_is_valid():
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    (["severity=critical", "alertname=StreamlearnDown"], "critical"),
    (["severity=warning", "alertname=StreamlearnConceptDrift", "model=default"], "warning"),
    (["alertname=Watchdog"], "warning"),
])
def test_alertmanager_routes_by_severity(labels, receiver):
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_inhibits_drift_performance_and_ingest_alerts_while_down():
    rules = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["inhibit_rules"]
    by_component = {rule["labels"]["component"] for rule in alert_rules()}
    (inhibit,) = rules
    assert inhibit["source_matchers"] == ['alertname=~"StreamlearnDown|StreamlearnNotReady"']
    assert inhibit["target_matchers"] == ['component=~"drift|performance|ingest"']
    assert {"drift", "performance", "ingest"} <= by_component
    assert inhibit["equal"] == ["instance"]


def test_k8s_prometheusrule_is_generated_from_the_rules_file():
    result = run(sys.executable, str(DEPLOY / "k8s" / "generate.py"), "--check")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
