"""A real alert fires end to end: stream with an abrupt concept change -> streamlearn serve ->
/metrics -> Prometheus evaluating the shipped rules -> Alertmanager -> webhook.

The rules are the shipped ones with every duration divided by 60 (`for: 5m` -> 5 s, `[10m]` -> 10 s)
and Prometheus scrapes and evaluates every second; expressions, thresholds and labels are unchanged.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.deploy.conftest import CHANGE_AT, RATE, DriftRun, Observed

pytestmark = [pytest.mark.prometheus, pytest.mark.broker, pytest.mark.slow]


def wait_for_firing_times(observed: Observed, alertname: str, start: float, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        times = observed.prometheus.firing_times(alertname, start, time.time())
        if times or time.monotonic() > deadline:
            return times
        time.sleep(0.5)


def test_the_service_is_scraped_as_job_streamlearn(observed: Observed):
    up = observed.prometheus.query('up{job="streamlearn"}')
    assert [float(s["value"][1]) for s in up] == [1.0]


def test_concept_drift_alert_fires_after_the_change_and_not_before(observed: Observed, drift_run: DriftRun):
    # the service's detector saw the change...
    assert drift_run.drift_status["detected_total"] >= 1
    # ...Prometheus turned it into a firing alert...
    times = wait_for_firing_times(observed, "StreamlearnConceptDrift", drift_run.started - 5, timeout=30)
    assert times, f"StreamlearnConceptDrift never fired; active: {observed.prometheus.alerts()}"
    # ...and only after the change point: the stationary first concept raised nothing.
    assert times[0] >= drift_run.change, (
        f"fired {drift_run.change - times[0]:.1f} s before the change point")
    delay = times[0] - drift_run.change
    print(f"\nconcept drift alert firing {delay:.1f} s after the change at event {CHANGE_AT} of a stream at "
          f"{RATE:.0f} events/s (scaled rule timings, 1 s scrape/evaluation)")
    (series,) = observed.prometheus.query_range('ALERTS{alertname="StreamlearnConceptDrift", alertstate="firing"}',
                                                times[0], times[0])
    labels = series["metric"]
    assert labels["model"] == "default" and labels["kind"] == "concept" and labels["severity"] == "warning"


def test_alertmanager_delivers_the_drift_alert_to_the_warning_webhook(observed: Observed, drift_run: DriftRun):
    if observed.alertmanager is None:
        pytest.skip("prometheus-alertmanager is not installed")

    def drift_notified(received):
        return any(path == "/warning" and alert["labels"]["alertname"] == "StreamlearnConceptDrift"
                   and alert["status"] == "firing" and alert["labels"]["model"] == "default"
                   and alert["annotations"]["runbook_url"] == "docs/runbook.md#streamlearnconceptdrift"
                   for path, payload in received for alert in payload["alerts"])

    assert observed.sink.wait_for(drift_notified, timeout=30), observed.sink.received
    # routed by severity: nothing warning-level reached the critical receiver
    assert all(a["labels"]["severity"] == "critical"
               for path, payload in observed.sink.received if path == "/critical" for a in payload["alerts"])


def test_no_events_alert_fires_once_the_stream_stops_and_not_while_it_runs(observed: Observed,
                                                                           drift_run: DriftRun):
    firing = observed.prometheus.wait_firing("StreamlearnNoEventsIngested", timeout=60)
    assert {a["labels"]["model"] for a in firing} == {"default"}
    times = wait_for_firing_times(observed, "StreamlearnNoEventsIngested", drift_run.started - 5, timeout=10)
    assert times and times[0] > drift_run.stopped, "fired while events were flowing"
    print(f"\nno-events alert firing {times[0] - drift_run.stopped:.1f} s after the last event "
          f"(scaled: 5 s rate window + 5 s hold)")


def test_alertmanager_holds_back_drift_alerts_of_an_instance_that_is_down(observed: Observed):
    """The shipped inhibition, in the real Alertmanager: Down on an instance mutes its drift alert."""
    if observed.alertmanager is None:
        pytest.skip("prometheus-alertmanager is not installed")
    instance = "inhibition-check:8000"
    common = {"job": "streamlearn", "instance": instance}
    alerts = [
        {"labels": {**common, "alertname": "StreamlearnDown", "severity": "critical", "component": "availability"}},
        {"labels": {**common, "alertname": "StreamlearnConceptDrift", "severity": "warning", "component": "drift",
                    "model": "default", "kind": "concept"}},
        # the same drift alert on a healthy instance still goes out
        {"labels": {"job": "streamlearn", "instance": "healthy:8000", "alertname": "StreamlearnConceptDrift",
                    "severity": "warning", "component": "drift", "model": "default", "kind": "concept"}},
    ]
    response = httpx.post(observed.alertmanager.base + "/api/v2/alerts", json=alerts, timeout=10)
    assert response.status_code == 200, response.text

    def notified(received, alertname, inst):
        return any(a["labels"]["alertname"] == alertname and a["labels"]["instance"] == inst
                   for _, payload in received for a in payload["alerts"])

    assert observed.sink.wait_for(lambda r: notified(r, "StreamlearnDown", instance)
                                  and notified(r, "StreamlearnConceptDrift", "healthy:8000"), timeout=30)
    state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]
             for a in observed.alertmanager.get("/api/v2/alerts")}
    assert state[("StreamlearnConceptDrift", instance)]["state"] == "suppressed"
    assert state[("StreamlearnConceptDrift", instance)]["inhibitedBy"]
    assert state[("StreamlearnConceptDrift", "healthy:8000")]["state"] == "active"
    assert not notified(observed.sink.received, "StreamlearnConceptDrift", instance)
