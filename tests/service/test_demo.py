"""``streamlearn demo`` end to end: it learns a stream live and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_learns_live_and_exits_cleanly_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update(PYTHONUNBUFFERED="1", STREAMLEARN_KAFKA_EMBEDDED_PORT="0")
    # Its own session, so that the signal below reaches the demo's whole process group — exactly
    # what Ctrl-C on a terminal does — and nothing of the test runner.
    proc = subprocess.Popen([sys.executable, "-m", "service", "demo", "--http-port", "0", "--rate", "3000",
                             "--label-delay", "100"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        learned = 0
        while learned < 2000:
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no learning progress within 120 s:\n" + "".join(lines[-20:])
            time.sleep(0.2)
            progress = [line for line in lines if line.startswith("t=")]
            if progress:
                produced, predicted, learned = (int(n.replace(",", "")) for n in re.search(
                    r"produced / predicted / learned=([\d,]+) / ([\d,]+) / ([\d,]+)", progress[-1]).groups())
        # The live figures are real and consistent: no more predicted than produced, accuracy is
        # reported and the HTTP API of the same service answers.
        assert predicted <= produced, progress[-1]
        assert re.search(r"prequential accuracy=0\.\d+", progress[-1]), progress[-1]
        url = re.search(r"status page (http://\S+)/ ", "".join(lines)).group(1)
        status = httpx.get(f"{url}/v1/models/default", timeout=10).json()
        assert status["events"]["learned"] >= learned
        assert httpx.get(f"{url}/", timeout=10).status_code == 200

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(5)
    out = "".join(lines)
    assert "demo stopped cleanly" in out
    assert "Traceback" not in out, out[-3000:]
    # Nothing of the demo is left behind (its broker, its helper processes) once it has exited.
    deadline = time.monotonic() + 15
    while survivors := subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,stat,cmd", "-p", ",".join(survivors)],
                                                           capture_output=True, text=True).stdout
        time.sleep(0.2)
