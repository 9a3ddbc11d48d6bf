"""The Grafana dashboard tells the issue's story: throughput, lag, prequential vs estimated vs
realized accuracy on one panel, drift events as annotations, learning rate and Kalman γ, latency
histograms. (That every series it selects exists is checked against the running service in
test_observed_metrics.py.)"""

from __future__ import annotations

import json

import pytest

from tests.deploy.promql import DASHBOARD, selectors


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_metrics(panel: dict) -> set[str]:
    return {name for t in panel.get("targets", []) for name, _ in selectors(t["expr"])}


def find(dashboard: dict, *metrics: str) -> list[dict]:
    return [p for p in dashboard["panels"] if set(metrics) <= panel_metrics(p)]


def test_dashboard_is_provisionable(dashboard):
    assert dashboard["uid"] == "streamlearn" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus" and target["expr"].strip()
    (model_var,) = dashboard["templating"]["list"]
    assert model_var["name"] == "model" and model_var["includeAll"]


def test_accuracy_prequential_estimated_and_realized_share_one_panel(dashboard):
    (panel,) = find(dashboard, "streamlearn_prequential_metric", "streamlearn_estimated_metric",
                    "streamlearn_realized_metric")
    assert panel["type"] == "timeseries"
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_drift_detections_are_annotations(dashboard):
    kinds = {sel[1].get("kind") for a in dashboard["annotations"]["list"] if "expr" in a
             for sel in selectors(a["expr"]) if sel[0] == "streamlearn_drift_detected_total"}
    assert {"concept", "data"} <= kinds


@pytest.mark.parametrize("metric", ["streamlearn_events_total", "streamlearn_consumer_lag",
                                    "streamlearn_learning_rate", "streamlearn_kalman_gamma",
                                    "streamlearn_pending_labels", "streamlearn_dead_letters_total"])
def test_has_a_timeseries_panel_for(dashboard, metric):
    assert any(p["type"] == "timeseries" for p in find(dashboard, metric))


def test_an_events_per_second_figure_counts_each_event_once(dashboard):
    # events_total has an outcome per stage (predicted, learned, dead_letter): summing them all
    # counts a labelled event twice
    stats = [p for p in find(dashboard, "streamlearn_events_total") if p["type"] == "stat"]
    assert stats
    for panel in stats:
        for target in panel["targets"]:
            for name, labels in selectors(target["expr"]):
                assert name != "streamlearn_events_total" or labels.get("outcome") == "predicted", target["expr"]


def test_latency_histograms_as_quantiles_and_heatmap(dashboard):
    for metric in ("streamlearn_predict_seconds_bucket", "streamlearn_update_seconds_bucket"):
        exprs = [t["expr"] for p in find(dashboard, metric) for t in p["targets"]]
        assert any("histogram_quantile(0.99" in e for e in exprs)
    heatmaps = [p for p in find(dashboard, "streamlearn_predict_seconds_bucket") if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"
