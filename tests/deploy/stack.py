"""Real Prometheus and Alertmanager processes (Debian binaries) configured from the shipped files.

The configs are derived from ``deploy/prometheus/prometheus.yml`` and
``deploy/alertmanager/alertmanager.yml`` programmatically: only addresses (local ports instead of
compose service names) and timings (scrape/evaluation interval, group waits) change. The rules are
the shipped file, or its copy with durations scaled (:func:`tests.deploy.promql.scaled_rules`).
Used by the end-to-end alert tests and by ``bench/alert_latency.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.broker import free_port
from tests.deploy.promql import ALERTMANAGER_CONFIG, PROMETHEUS_CONFIG


class Process:
    """A child process with a log file, an HTTP base URL and a readiness wait."""

    binary = ""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"{self.binary}.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0):
        binary = shutil.which(self.binary)
        if binary is None:
            raise FileNotFoundError(f"{self.binary} is not installed: run `make system-deps`")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, *self.command()], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.binary} not ready within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def get(self, path: str, **params) -> Any:
        r = httpx.get(self.base + path, params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Prometheus(Process):
    """Prometheus scraping ``target`` as job ``streamlearn`` with ``rules_text`` as its rule file."""

    binary = "prometheus"

    def __init__(self, workdir: Path, target: str, rules_text: str, interval: str = "1s",
                 alertmanager: str | None = None):
        super().__init__(workdir)
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
        (self.workdir / "alerts.yml").write_text(rules_text)
        config["rule_files"] = ["alerts.yml"]
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamlearn"]
        job["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = [job]
        if alertmanager is None:
            config.pop("alerting")
        else:
            config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self) -> list[str]:
        return [f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def wait_scraped(self, timeout: float = 20.0) -> None:
        """Block until the first scrape of the streamlearn job is stored."""
        deadline = time.monotonic() + timeout
        while not self.query('up{job="streamlearn"}'):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no scrape of job streamlearn within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.2)

    def alerts(self) -> list[dict]:
        """Active alerts (pending and firing) from ``/api/v1/alerts``."""
        return self.get("/api/v1/alerts")["data"]["alerts"]

    def firing(self, alertname: str) -> list[dict]:
        return [a for a in self.alerts() if a["labels"]["alertname"] == alertname and a["state"] == "firing"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self.get("/api/v1/query", **params)["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 0.5) -> list[dict]:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["data"]["result"]

    def firing_times(self, alertname: str, start: float, end: float) -> list[float]:
        """Evaluation times in [start, end] at which ``alertname`` was firing (Prometheus' ALERTS series)."""
        series = self.query_range(f'ALERTS{{alertname="{alertname}", alertstate="firing"}}', start, end)
        return sorted(float(t) for s in series for t, _ in s["values"])

    def wait_firing(self, alertname: str, timeout: float, poll: float = 0.25) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alerts = self.firing(alertname)
            if alerts:
                return alerts
            time.sleep(poll)
        raise TimeoutError(f"{alertname} not firing within {timeout:.0f} s; active: "
                           f"{[(a['labels']['alertname'], a['state']) for a in self.alerts()]}\n{self.log()}")


class Alertmanager(Process):
    """Alertmanager with the shipped routes and inhibitions, webhooks pointed at ``webhook_base``."""

    binary = "prometheus-alertmanager"

    def __init__(self, workdir: Path, webhook_base: str, group_wait: str = "1s"):
        super().__init__(workdir)
        config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
        for receiver in config["receivers"]:
            for hook in receiver["webhook_configs"]:
                path = "/" + hook["url"].split("://", 1)[1].split("/", 1)[1]
                hook["url"] = webhook_base + path
        for route in [config["route"], *config["route"].get("routes", [])]:
            for key in ("group_wait", "group_interval"):
                if key in route:
                    route[key] = group_wait
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self) -> list[str]:
        return [f"--config.file={self.workdir / 'alertmanager.yml'}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address="]  # no gossip port: a single local instance

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
