"""``/metrics`` counters after a crash: never below what Prometheus may already have scraped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.config import load_settings
from service.runtime import Service

LEARNED = ("streamlearn_events_total", (("model", "default"), ("outcome", "learned")))
NOT_JSON = ("streamlearn_dead_letters_total", (("model", "default"), ("reason", "not_json")))
CKPT_FAILURES = ("streamlearn_checkpoint_failures_total", (("model", "default"),))


def scrape(service: Service) -> dict[tuple, float]:
    body, _ = service.metrics.exposition()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def service_at(state_dir, learned: int, not_json: int, checkpoint_failures: int = 0,
               lineage: str | None = "first") -> Service:
    """A service (not started: no Kafka needed) whose counters are at these values, as restored
    from a checkpoint of ``lineage`` (None: not restored yet)."""
    service = Service(load_settings(overrides={"state_dir": str(state_dir)}))
    service.lineage = lineage
    rt = service.models["default"]
    rt.predicted = rt.learned = learned
    rt.dead_letters["not_json"] = rt.dead_letter_events = not_json
    rt.publish_counts()
    service.checkpoint_failures = checkpoint_failures
    return service


def test_a_restart_from_an_older_checkpoint_does_not_send_the_counters_back(tmp_path):
    before = scrape(service_at(tmp_path, learned=5000, not_json=12, checkpoint_failures=2))
    assert before[LEARNED] == 5000 and before[NOT_JSON] == 12

    # the process died; its last checkpoint had 4,000 events learned and 10 dead letters. Exported
    # as they are, Prometheus would take the drop for a reset and increase() would count all of
    # them again (the dead-letter and drift alerts fire on increase())
    restarted = service_at(tmp_path, learned=4000, not_json=10)
    after = scrape(restarted)
    assert after[LEARNED] == 5000 and after[NOT_JSON] == 12
    assert restarted.models["default"].status()["events"]["learned"] == 4000  # the status shows the replay
    assert after[CKPT_FAILURES] == 0  # counted by the process, not restored: a reset Prometheus expects

    # once the replay is past the old values, they are exported as they are
    rt = restarted.models["default"]
    rt.learned = 5100
    rt.publish_counts()
    assert scrape(restarted)[LEARNED] == 5100


def test_an_unreadable_floor_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics-floor.json").write_text("{not json")
    assert scrape(service_at(tmp_path, learned=7, not_json=0))[LEARNED] == 7
    assert "ignoring the counters' floor" in caplog.text


def test_a_fresh_start_begins_a_new_lineage_whose_counts_start_over(tmp_path):
    # the state was lost (checkpoints deleted): holding /metrics at the old values made rate() read
    # 0 until the new counts passed them (StreamlearnNoEventsIngested fired on a busy service)
    assert scrape(service_at(tmp_path, learned=5000, not_json=12))[LEARNED] == 5000
    fresh = scrape(service_at(tmp_path, learned=30, not_json=0, lineage="second"))
    assert fresh[LEARNED] == 30 and fresh.get(NOT_JSON, 0) == 0


def test_before_the_restore_the_counts_are_not_exported(tmp_path):
    # zeros before the restore, then the restored values: Prometheus would count them all again
    assert scrape(service_at(tmp_path, learned=5000, not_json=12))[LEARNED] == 5000
    starting = scrape(service_at(tmp_path, learned=0, not_json=0, lineage=None))
    assert LEARNED not in starting and CKPT_FAILURES in starting
    assert starting[("streamlearn_ready", (("model", "default"),))] == 0
