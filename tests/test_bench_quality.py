"""bench.quality end to end on a small stream: the report's shape and the speed figure's passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import quality


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    # bench.quality sets torch to one thread, as its timings assume; the rest of the suite keeps its own
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_speed_models_are_timed_over_several_passes_and_the_median_counts(tmp_path):
    report = quality.main(["--quick", "--streams", "sea_abrupt,bananas", "--ablations", "none",
                           "--speed-passes", "3", "--out", str(tmp_path), "--tag", "t"])
    for name, stream in report["streams"].items():
        models = stream["models"]
        for model in quality.SPEED_PAIR:
            passes = models[model]["passes_seconds"]
            assert len(passes) == 3 and all(s > 0 for s in passes), name
            assert models[model]["seconds"] == float(np.median(passes))
            assert models[model]["events_per_s"] == stream["events"] / models[model]["seconds"]
        assert "passes_seconds" not in models["kalman_acc"]  # one pass for the others
    summary = report["summary"]
    speed = summary["events_per_s"]
    assert summary["throughput_speedup_vs_river_linear"] == speed["kalman_thr"] / speed["river_linear"]
    events = sum(s["events"] for s in report["streams"].values())
    assert speed["kalman_thr"] == events / sum(s["models"]["kalman_thr"]["seconds"] for s in report["streams"].values())
    written = json.loads((tmp_path / "quality_t.json").read_text())
    assert written["meta"]["speed_passes"] == 3
    assert "median of 3 passes" in (tmp_path / "quality_t.md").read_text()


def test_speed_passes_below_one_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--quick", "--speed-passes", "0"])
    assert exit_info.value.code == 2
    assert "--speed-passes" in capsys.readouterr().err
