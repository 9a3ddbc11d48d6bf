"""Run the benchmarks: ``python -m bench`` (all, long) or ``python -m bench NAME [NAME ...]``.

Each benchmark is its own module with its own options and writes its results under
``bench/results/``; this only runs them one after another with the settings the results were made
with.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS: dict[str, list[str]] = {
    "quality": ["--ablations", "none"],
    "learner_throughput": [],
    "plasticity": [],
    "throughput": ["--events", "200000", "--repeat", "2"],
    "http_latency": [],
    "memory": ["--events", "1000000"],
    "estimation": [],
    "drift": [],
    "alert_latency": ["--trials", "4"],
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", *BENCHMARKS[name]]
        print("==>", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
