"""Service configuration: a YAML file plus ``STREAMLEARN_*`` environment variables (env wins).

The file is named by ``--config FILE`` or ``STREAMLEARN_CONFIG``. Environment variables map onto the
YAML sections by their first underscore: ``STREAMLEARN_KAFKA_BOOTSTRAP`` sets ``kafka.bootstrap``,
``STREAMLEARN_HTTP_PORT`` sets ``http.port``, ``STREAMLEARN_CHECKPOINT_INTERVAL_SECONDS`` sets
``checkpoint.interval_seconds``; top-level keys are matched whole (``STREAMLEARN_STATE_DIR``).
``STREAMLEARN_MODELS`` takes the whole ``models`` mapping as JSON.

Every section rejects unknown keys, so a typo fails at start with the key named:

>>> from service.config import ConfigError, load_settings
>>> try:
...     load_settings(overrides={"kafka": {"bootstrp": "localhost:9092"}})
... except ConfigError as exc:
...     print(exc)
invalid configuration:
  kafka.bootstrp: Extra inputs are not permitted

Routing rule: an event (or label) carrying a ``"model"`` field goes to that model, whichever of the
service's topics it arrived on (an unknown name is dead-lettered); without the field it goes to
every model whose ``topics.events`` (``topics.labels``) is the topic it arrived on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

DEFAULT_EVENTS_TOPIC = "streamlearn.events"
DEFAULT_LABELS_TOPIC = "streamlearn.labels"
DEFAULT_PREDICTIONS_TOPIC = "streamlearn.predictions"
DEFAULT_DEAD_LETTER_TOPIC = "streamlearn.dead-letter"
DEFAULT_MODEL_NAME = "default"


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopicsConfig(_Section):
    """Kafka topics of one model. ``predictions: null`` turns the prediction output off."""

    events: str = DEFAULT_EVENTS_TOPIC
    labels: str = DEFAULT_LABELS_TOPIC
    predictions: str | None = DEFAULT_PREDICTIONS_TOPIC
    dead_letter: str = DEFAULT_DEAD_LETTER_TOPIC


class PendingConfig(_Section):
    """Bounds of the pending-label store: unlabelled predictions wait here for their label."""

    max_entries: int = Field(100_000, gt=0)
    ttl_seconds: float = Field(3600.0, gt=0)


class ModelConfig(_Section):
    """One named model: what it learns, from which topics, and how it is watched."""

    task: Literal["classification", "regression"] = "classification"
    # Passed to ``learners.build_model`` (``task`` is filled in from above).
    learner: dict[str, Any] = Field(default_factory=dict)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    pending: PendingConfig = Field(default_factory=PendingConfig)
    # Passed to ``drift.monitor.ModelMonitor(task, config)``.
    monitor: dict[str, Any] = Field(default_factory=dict)
    # Sliding window (events) of the prequential metrics.
    prequential_window: int = Field(1000, gt=0)

    def build_config(self) -> dict[str, Any]:
        return {**self.learner, "task": self.task}


class KafkaConfig(_Section):
    """``bootstrap`` unset: ``serve`` starts the embedded broker on ``embedded_port`` (0 = a free port;
    the default 9092 is where ``streamlearn produce`` looks by default).

    The service is the single writer of its models, so it assigns itself every partition of its
    topics instead of joining a consumer group (whose joins wait out the broker's rebalance timeout
    and whose rebalances would move partitions away from the writer mid-stream). It still commits
    its offsets under ``group_id``, after each durable checkpoint, so Kafka tools see its lag.
    """

    bootstrap: str | None = None
    embedded_port: int = Field(9092, ge=0, le=65535)
    group_id: str = "streamlearn"
    partitions: int = Field(1, gt=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: int = Field(5000, gt=0)
    poll_timeout_ms: int = Field(100, ge=0)
    # Records are processed in timestamp order across partitions (labels after their events); a
    # partition with unread data that sends nothing delays the others at most this long.
    align_max_wait_ms: int = Field(5000, ge=0)
    request_timeout_ms: int = Field(30_000, gt=0)
    producer_linger_ms: int = Field(5, ge=0)
    # A dead letter carries at most this much of the original message (header ``truncated_from``
    # then gives its size; the whole message stays in its topic at the offset the headers name):
    # Kafka's default limit on a record is ~1 MB, and a refused dead letter holds back checkpoints.
    dead_letter_max_bytes: int = Field(1_000_000, gt=0)

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_host_port(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token required on mutating routes when set.
    token: str | None = None
    max_body_bytes: int = Field(1_048_576, gt=0)
    # a request body must arrive within this long (a client trickling one byte at a time is cut off)
    body_timeout_seconds: float = Field(30.0, gt=0)
    # Micro-batching of HTTP predictions (service/batching.py).
    max_batch_size: int = Field(1024, gt=0)
    max_batch_wait_ms: float = Field(2.0, ge=0)
    device: str = "auto"

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: str | None) -> str | None:
        # an empty secret (a variable set from a missing one) would let "Bearer " through
        if value is not None and not value.strip():
            raise ValueError("empty: set a secret, or unset it to leave the mutating routes open")
        return value


class CheckpointConfig(_Section):
    interval_seconds: float = Field(30.0, gt=0)
    keep: int = Field(3, gt=0)


class Settings(BaseSettings):
    """The whole configuration. Out of the box: one classifier called ``default``."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMLEARN_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
    )

    state_dir: Path = Path("state")
    log_level: str = "INFO"
    # A new Predictor snapshot is published to HTTP readers this often (and model_version bumped).
    publish_interval_seconds: float = Field(0.2, gt=0)
    # Torch's intra-op threads for the whole process (0 = torch's default, one per core). The
    # learner's steps are small operations that threads only slow down: on 2 cores the loop ran
    # at 30 µs an event with 2 threads against 21 with 1; HTTP batches of 1,000 showed no
    # consistent difference (71,060 and 55,593 instances/s with 1, 62,063 and 52,939 with 2).
    torch_threads: int = Field(1, ge=0)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    models: dict[str, ModelConfig] = Field(default_factory=lambda: {DEFAULT_MODEL_NAME: ModelConfig()})

    @model_validator(mode="after")
    def _at_least_one_model(self) -> Settings:
        if not self.models:
            raise ValueError("models: at least one model must be configured")
        for name in self.models:
            if not name or "/" in name:
                raise ValueError(f"models: invalid model name {name!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets files: the YAML file and the environment are the whole story.
        return (init_settings, env_settings)

    def topics(self) -> set[str]:
        """Every topic the service reads or writes."""
        out: set[str] = set()
        for m in self.models.values():
            out.update(t for t in (m.topics.events, m.topics.labels, m.topics.predictions,
                                   m.topics.dead_letter) if t)
        return out


def _format_errors(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:  # a stream, so that YAML's errors name the file
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_settings(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``config_file`` (else ``$STREAMLEARN_CONFIG``), the environment, ``overrides``.

    Precedence: ``overrides`` > ``STREAMLEARN_*`` environment > file > defaults. Nested sections are
    merged key by key across the three. Raises :class:`ConfigError` naming every bad key.
    """
    _check_environment()
    path = config_file or os.environ.get("STREAMLEARN_CONFIG")
    file_values = read_yaml(Path(path)) if path else {}

    class _WithFile(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        return Settings.model_validate(_WithFile(**dict(overrides or {})).model_dump())
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    except SettingsError as exc:  # a variable holding JSON (STREAMLEARN_MODELS) that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        where = f"{_ENV_PREFIX}{field.group(1).upper()}" if field else "the environment"
        raise ConfigError(f"invalid configuration: {where}: not valid JSON ({exc.__cause__ or exc})") from None


_ENV_PREFIX = "STREAMLEARN_"


def _check_environment() -> None:
    """Every ``STREAMLEARN_*`` variable names a setting: pydantic-settings ignores the others, so
    a typo (``STREAMLEARN_STATEDIR``) would silently start on the defaults (a fresh state dir)."""
    names = {"CONFIG"}
    sections = set()
    for field, info in Settings.model_fields.items():
        names.add(field.upper())
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            sections.add(field.upper() + "_")
    unknown = sorted(k for k in os.environ if k.upper().startswith(_ENV_PREFIX)
                     and (rest := k.upper()[len(_ENV_PREFIX):]) not in names
                     and not rest.startswith(tuple(sections)))
    if unknown:
        known = sorted(_ENV_PREFIX + n for n in names) + sorted(_ENV_PREFIX + s + "…" for s in sections)
        raise ConfigError(f"invalid configuration: unknown environment variable(s) {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")
