"""The built-in status page in headless Chromium against the running service: the page loads,
its charts draw the service's data (read back from the DOM), and a screenshot is kept in
test-artifacts/status-page.png."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import httpx
import pytest

from tests.deploy.conftest import DriftRun, Observed
from tests.deploy.promql import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"


def chromium(url: str, profile, *mode: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: run `make system-deps`")
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--window-size=1400,1100", "--virtual-time-budget=6000", *mode, url],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


class Elements(HTMLParser):
    """Attributes of every element that has an id."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.by_id[attrs["id"]] = attrs
            self._open = attrs["id"]

    def handle_data(self, data):
        if self._open and data.strip():
            self.text[self._open] = self.text.get(self._open, "") + data.strip()

    def handle_endtag(self, tag):
        self._open = None


@pytest.fixture(scope="module")
def page(observed: Observed, drift_run: DriftRun, tmp_path_factory) -> Elements:
    dom = chromium(observed.serve.base + "/", tmp_path_factory.mktemp("chromium"), "--dump-dom")
    parsed = Elements()
    parsed.feed(dom)
    return parsed


def series_counts(element: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in (pair.split(":") for pair in element.get("data-series", "").split(",") if pair)}


def test_page_and_its_assets_are_served_by_the_service(observed: Observed):
    html = httpx.get(observed.serve.base + "/", timeout=10).text
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', html):
        response = httpx.get(f"{observed.serve.base}/{asset}", timeout=10)
        assert response.status_code == 200, asset
    assert "cdn" not in html.lower() and "https://" not in html  # everything is vendored


def test_cards_show_the_status_json(observed: Observed, page: Elements):
    status = observed.serve.get("/v1/models/default")
    assert page.by_id["model"] is not None
    learned = int(page.text["c-learned"].replace(",", ""))
    assert learned == status["events"]["learned"]
    assert "error" not in page.text or not page.text["error"]


def test_accuracy_chart_draws_prequential_estimated_and_realized_with_drift_markers(page: Elements):
    quality = page.by_id["chart-quality"]
    counts = series_counts(quality)
    assert counts["prequential_accuracy"] > 5
    assert counts["estimated_accuracy_mcbpe"] > 0 and counts["estimated_accuracy_cbpe"] > 0
    assert counts["realized_accuracy"] > 0
    # the run's concept change is drawn as a vertical marker
    assert int(quality["data-drift-markers"]) >= 1


def test_throughput_and_pending_label_charts_draw_points(page: Elements):
    assert series_counts(page.by_id["chart-throughput"])["events_per_s"] > 5
    assert series_counts(page.by_id["chart-pending"])["pending_labels"] > 5


def test_learner_chart_draws_learning_rate_and_kalman_gamma(page: Elements):
    counts = series_counts(page.by_id["chart-learner"])
    assert counts["learning_rate"] > 0 and counts["kalman_gamma"] > 0


def test_screenshot_is_saved(observed: Observed, drift_run: DriftRun, tmp_path_factory):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    chromium(observed.serve.base + "/", tmp_path_factory.mktemp("chromium"), f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000  # a blank page is a few KB


def test_the_api_docs_render_every_route_without_the_internet(observed: Observed, tmp_path_factory):
    # Swagger UI from the service itself (the default page loads it from a CDN); a Swagger UI
    # before 5 cannot read the OpenAPI 3.1 that FastAPI writes and renders no operation at all
    html = httpx.get(observed.serve.base + "/docs", timeout=10).text
    assert "https://" not in html
    dom = chromium(observed.serve.base + "/docs", tmp_path_factory.mktemp("chromium"), "--dump-dom")
    assert "Unable to render this definition" not in dom
    for path in ("/v1/models/{name}/predict", "/v1/models/{name}/labels", "/v1/models/{name}/learn", "/readyz"):
        assert f'data-path="{path}"' in dom, path
