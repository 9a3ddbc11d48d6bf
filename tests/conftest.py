"""Shared fixtures: the real embedded Kafka-protocol broker and real ``streamlearn serve`` processes.

- ``broker`` (session): a ``tansu`` broker on a free port; the value is the bootstrap string.
- ``topics``: per-test unique topic names for the default model (tests share the one broker).
- ``serve``: a factory starting ``python -m service serve`` as a subprocess with ``STREAMLEARN_*``
  env vars, a YAML config and a temporary state dir; it returns once ``/readyz`` says ready.
  Every process it started is stopped (SIGTERM, then SIGKILL) at teardown.
- ``in_process_settings``: settings for a ``Service`` run inside the test process (own consumer group).

>>> proc = serve(config={"models": {"default": {"topics": topics}}})   # doctest: +SKIP
>>> proc.get("/v1/models/default")["events"]                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap string of a real embedded broker shared by the whole session."""
    with EmbeddedBroker(port=0) as b:
        yield b.bootstrap


@pytest.fixture
def topics() -> dict[str, str]:
    """Unique topics for this test: ``{"events", "labels", "predictions", "dead_letter"}``."""
    tag = uuid.uuid4().hex[:10]
    return {kind: f"t-{tag}.{kind}" for kind in ("events", "labels", "predictions", "dead_letter")}


class ServeProcess:
    """One ``streamlearn serve`` subprocess and an HTTP client for it."""

    def __init__(self, env: dict[str, str], state_dir: Path, log_path: Path):
        self.env = env
        self.state_dir = state_dir
        self.log_path = log_path
        self.port = int(env["STREAMLEARN_HTTP_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0, wait: bool = True) -> ServeProcess:
        """Runs ``streamlearn serve``; with ``wait``, returns once ``/readyz`` says ready."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)  # its own process group: see signal_group
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"serve not ready within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str) -> Any:
        r = httpx.get(self.base + path, timeout=10)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.text

    def post(self, path: str, body: Any, **kw) -> httpx.Response:
        return httpx.post(self.base + path, json=body, timeout=30, **kw)

    def wait_for(self, predicate: Callable[[dict], bool], model: str = "default", timeout: float = 60.0) -> dict:
        """Polls the model's status until ``predicate(status)``; returns that status."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            status = self.get(f"/v1/models/{model}")
            if predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"condition not met within {timeout:.0f} s; last status {json.dumps(status)[:2000]}\n"
                           f"{self.log()}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """To the service and its child processes at once, as systemd or a terminal sends it."""
        os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 50 ms; fail the test if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def in_process_settings(broker: str, state_dir: Path, models: dict[str, Any]) -> Any:
    """Settings for a :class:`service.runtime.Service` run in the test's own process: the given
    models, a fresh state dir and a consumer group of its own."""
    from service.config import load_settings

    return load_settings(overrides={
        "state_dir": str(state_dir), "kafka": {"bootstrap": broker, "group_id": f"g-{uuid.uuid4().hex[:10]}"},
        "models": models,
    })


def launch(broker: str, workdir: Path, config: dict | None = None, env: dict[str, str] | None = None,
           state_dir: Path | None = None, start: bool = True) -> ServeProcess:
    """A ``streamlearn serve`` subprocess with its config, log and (default) state dir under ``workdir``."""
    tag = uuid.uuid4().hex[:8]
    state = state_dir or workdir / f"state-{tag}"
    cfg_path = workdir / f"config-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(config or {}))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    full_env.update({
        "STREAMLEARN_CONFIG": str(cfg_path),
        "STREAMLEARN_KAFKA_BOOTSTRAP": broker,
        "STREAMLEARN_HTTP_HOST": "127.0.0.1",
        "STREAMLEARN_HTTP_PORT": str(free_port()),
        "STREAMLEARN_STATE_DIR": str(state),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update(env or {})
    proc = ServeProcess(full_env, Path(state), workdir / f"serve-{tag}.log")
    return proc.start() if start else proc


@pytest.fixture
def serve(broker: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve(config=None, env=None, state_dir=None, start=True)`` → a ready :class:`ServeProcess`.

    ``config`` is written as the YAML file (``STREAMLEARN_CONFIG``); ``env`` adds variables; the
    broker is the session's unless ``env`` sets ``STREAMLEARN_KAFKA_BOOTSTRAP``. Reusing a
    ``state_dir`` restarts from its checkpoints.
    """
    started: list[ServeProcess] = []

    def start(config: dict | None = None, env: dict[str, str] | None = None, state_dir: Path | None = None,
              start: bool = True) -> ServeProcess:
        proc = launch(broker, tmp_path, config, env, state_dir, start=False)
        started.append(proc)
        return proc.start() if start else proc

    yield start
    for proc in started:
        proc.stop()
