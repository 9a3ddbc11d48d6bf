"""Small helpers over the shipped monitoring files: which series the rules and dashboards select,
and a copy of the rules with every duration scaled (for tests that cannot wait minutes).

Only durations change in the scaled copy -- ``for:`` and the ``[range]`` / ``[range:step]`` of
range vectors and subqueries -- so the expressions, thresholds and labels under test are the
shipped ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamlearn.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_RANGE = re.compile(r"\[([0-9smhdwy]+)(?::([0-9smhdwy]*))?\]")
# A metric name followed by an optional label matcher block; keywords and functions are filtered.
_SELECTOR = re.compile(r"\b((?:streamlearn_[a-z_]+)|up)\b\s*(\{[^}]*\})?")
_EQ_MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1h30m`` or ``15s``."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def alert_rules(path: Path = RULES) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def scaled_rules(factor: float, path: Path = RULES) -> str:
    """The rules file with every ``for:`` and range duration multiplied by ``factor``."""

    def scale(text: str) -> str:
        return format_duration(parse_duration(text) * factor)

    def scale_range(match: re.Match) -> str:
        rng, step = match.group(1), match.group(2)
        if step is None:
            return f"[{scale(rng)}]"
        return f"[{scale(rng)}:{scale(step) if step else ''}]"

    doc = yaml.safe_load(path.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(scale_range, rule["expr"])
            if "for" in rule:
                rule["for"] = scale(rule["for"])
    return yaml.safe_dump(doc, sort_keys=False, width=1000)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """``(metric, {label: value})`` for each series selector in a PromQL expression.

    Only equality matchers are returned (``=~`` on a dashboard variable selects whatever exists).
    """
    # `label="v"` only: in `label=~"v"` and `label!="v"` no word is directly followed by `="`.
    return [(name, dict(_EQ_MATCHER.findall(block or ""))) for name, block in _SELECTOR.findall(expr)]


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors(path: Path = RUNBOOK) -> set[str]:
    text = path.read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)"', text))
    return anchors
