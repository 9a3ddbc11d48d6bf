"""Configuration: YAML file + STREAMLEARN_* env (env wins), validated with the bad key named."""

import pytest

from service.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("STREAMLEARN_"):
            monkeypatch.delenv(key)


def test_defaults_are_one_classifier_called_default_on_the_contract_topics():
    s = load_settings()
    assert list(s.models) == ["default"]
    m = s.models["default"]
    assert m.task == "classification"
    assert (m.topics.events, m.topics.labels, m.topics.predictions, m.topics.dead_letter) == (
        "streamlearn.events", "streamlearn.labels", "streamlearn.predictions", "streamlearn.dead-letter")
    assert s.kafka.bootstrap is None  # unset: serve starts the embedded broker


def test_environment_wins_over_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka: {bootstrap: 'file:1', group_id: from-file}\nhttp: {port: 1234, host: 0.0.0.0}\n"
                   "models:\n  fraud: {task: classification}\n  price: {task: regression, topics: {events: prices}}\n")
    monkeypatch.setenv("STREAMLEARN_CONFIG", str(cfg))
    monkeypatch.setenv("STREAMLEARN_KAFKA_BOOTSTRAP", "env:2")
    monkeypatch.setenv("STREAMLEARN_HTTP_PORT", "8081")
    monkeypatch.setenv("STREAMLEARN_STATE_DIR", str(tmp_path / "st"))
    s = load_settings()
    assert s.kafka.bootstrap == "env:2" and s.kafka.group_id == "from-file"
    assert s.http.port == 8081 and s.http.host == "0.0.0.0"
    assert s.state_dir == tmp_path / "st"
    assert sorted(s.models) == ["fraud", "price"]
    assert s.models["price"].topics.events == "prices" and s.models["price"].task == "regression"
    assert "prices" in s.topics() and "streamlearn.events" in s.topics()


def test_models_from_the_environment_as_json(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_MODELS", '{"a": {"task": "regression"}}')
    assert load_settings().models["a"].task == "regression"


@pytest.mark.parametrize(("overrides", "env", "named"), [
    ({"kafka": {"bootstrp": "x:1"}}, {}, "kafka.bootstrp"),
    ({"models": {"m": {"task": "clustering"}}}, {}, "models.m.task"),
    ({"models": {"m": {"pending": {"max_entries": 0}}}}, {}, "models.m.pending.max_entries"),
    ({}, {"STREAMLEARN_HTTP_PORT": "eighty"}, "http.port"),
    ({}, {"STREAMLEARN_KAFKA_BOOTSTRAP": "no-port"}, "kafka.bootstrap"),
    # pydantic-settings ignores variables that name no setting: a typo started on the defaults
    ({}, {"STREAMLEARN_STATEDIR": "/x"}, "unknown environment variable(s) STREAMLEARN_STATEDIR"),
    ({}, {"STREAMLEARN_MODELS": "{bad json"}, "STREAMLEARN_MODELS: not valid JSON"),
    ({}, {"STREAMLEARN_HTTP_TOKEN": " "}, "http.token: Value error, empty"),  # "Bearer " would pass
    ({"models": {}}, {}, "models"),
    ({"torch_threads": -1}, {}, "torch_threads"),
])
def test_bad_values_fail_at_start_naming_the_key(overrides, env, named, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        load_settings(overrides=overrides)
    assert named in str(err.value)


def test_unreadable_or_non_mapping_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


def test_torch_threads_are_one_unless_configured(monkeypatch, tmp_path):
    import torch

    from service.runtime import Service

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("STREAMLEARN_TORCH_THREADS", "2")
        assert load_settings().torch_threads == 2
        monkeypatch.delenv("STREAMLEARN_TORCH_THREADS")
        settings = load_settings(overrides={"state_dir": str(tmp_path)})
        assert settings.torch_threads == 1
        torch.set_num_threads(2)
        Service(settings)  # builds the models; Kafka and the loop wait for start()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        Service(load_settings(overrides={"state_dir": str(tmp_path), "torch_threads": 0}))  # 0: torch's own setting is left alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
