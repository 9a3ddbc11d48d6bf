"""Every series an alert rule or a Grafana panel selects is one the running service exports, and every
dashboard query runs in the real Prometheus scraping it."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DriftRun, Observed
from tests.deploy.promql import DASHBOARD, alert_rules, dashboard_exprs, selectors

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def used_selectors() -> list[tuple[str, str, dict]]:
    """(where, metric, equality matchers) for every selector in the rules and the dashboard."""
    used = {}
    for rule in alert_rules():
        for name, matchers in selectors(rule["expr"]):
            used.setdefault((name, tuple(sorted(matchers.items()))), rule["alert"])
    for expr in dashboard_exprs():
        for name, matchers in selectors(expr):
            used.setdefault((name, tuple(sorted(matchers.items()))), "dashboard")
    # `up` is Prometheus' own series (tests/deploy/test_alerts_e2e.py checks it)
    return [(where, name, dict(m)) for (name, m), where in sorted(used.items()) if name != "up"]


@pytest.fixture(scope="module")
def exported(observed: Observed, drift_run: DriftRun) -> list[tuple[str, dict]]:
    text = httpx.get(observed.serve.base + "/metrics", timeout=10).text
    return [(s.name, s.labels) for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.mark.parametrize(("where", "metric", "matchers"), used_selectors(),
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_selected_series_is_exported(exported, where, metric, matchers):
    names = {name for name, _ in exported}
    assert metric in names, f"{where} uses {metric}, which the service does not export"
    values = {tuple(sorted(labels.items())) for name, labels in exported if name == metric}
    assert any(matchers.items() <= dict(v).items() for v in values), (
        f"{where} selects {metric}{matchers}; exported label sets: {sorted(values)[:10]}")
    assert all("model" in dict(v) for v in values), f"{metric} lacks the model label"


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(title, PromQL with the model variable set, must return series) for panels and annotations."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"], True) for p in dash["panels"] for t in p.get("targets", [])]
    # annotations select only the moments of a detection: they may rightly be empty now
    out += [(a["name"], a["expr"], False) for a in dash["annotations"]["list"] if "expr" in a]
    return [(title, expr.replace("$model", "default"), needs_data) for title, expr, needs_data in out]


@pytest.mark.parametrize(("title", "expr", "needs_data"), dashboard_queries(),
                         ids=[f"{t}:{i}" for i, (t, _, _) in enumerate(dashboard_queries())])
def test_dashboard_query_runs_in_prometheus(observed: Observed, drift_run: DriftRun, title, expr, needs_data):
    """What Grafana would ask: every query parses and, for panels, returns the run's series."""
    result = observed.prometheus.query(expr)  # raises on a PromQL error (HTTP 400)
    if needs_data:
        assert result, f"panel {title!r}: {expr} returns nothing"
