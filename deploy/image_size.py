"""Estimate the size of the CPU image that the Dockerfile builds, without a container engine.

The runtime stage is the base image plus ``/opt/streamlearn``, a virtual environment holding
streamlearn and its runtime dependencies (not the ``test`` extra). This sums the installed files
of exactly that dependency closure, as recorded by each distribution in the current environment
(whose torch is the CPU build, the one ``--build-arg TORCH_VARIANT=cpu`` installs), and adds the
base image's size::

    .venv/bin/python deploy/image_size.py            # table + total
    .venv/bin/python deploy/image_size.py --json

The base size is the uncompressed size of ``python:3.11-slim-bookworm`` (about 130 MB: Debian
bookworm slim plus CPython 3.11); pass ``--base-mb`` to use another figure.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import metadata

from packaging.requirements import Requirement

BASE_IMAGE_MB = 130.0
# A fresh venv also holds pip (the Dockerfile's `python -m venv`).
VENV_EXTRAS = ("pip",)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "streamlearn") -> list[metadata.Distribution]:
    """Distributions installed for ``root`` without extras, resolved against this environment."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root, *VENV_EXTRAS]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            # Only unconditional requirements and those whose marker holds without extras.
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return sorted(seen.values(), key=lambda d: d.metadata["Name"].lower())


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes of the files the distribution installed (its RECORD); compiled caches excluded."""
    total = 0
    for f in dist.files or []:
        if "__pycache__" in f.parts:
            continue  # the image sets PYTHONDONTWRITEBYTECODE; pip's own .pyc are small
        path = f.locate()
        if path.is_file():
            total += path.stat().st_size
    return total


def estimate(base_mb: float = BASE_IMAGE_MB) -> dict:
    rows = [(d.metadata["Name"], d.version, installed_bytes(d)) for d in runtime_closure()]
    venv_mb = sum(b for _, _, b in rows) / 1e6
    return {
        "base_image_mb": base_mb,
        "venv_mb": round(venv_mb, 1),
        "total_mb": round(base_mb + venv_mb, 1),
        "packages": [{"name": n, "version": v, "mb": round(b / 1e6, 1)} for n, v, b in
                     sorted(rows, key=lambda r: -r[2])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mb", type=float, default=BASE_IMAGE_MB)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = estimate(args.base_mb)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for p in result["packages"]:
        if p["mb"] >= 1:
            print(f"{p['name']:<28} {p['version']:<14} {p['mb']:>8.1f} MB")
    small = [p for p in result["packages"] if p["mb"] < 1]
    print(f"{len(small)} smaller packages{'':<18} {sum(p['mb'] for p in small):>8.1f} MB")
    print(f"{'virtual environment':<43} {result['venv_mb']:>8.1f} MB")
    print(f"{'base image (python:3.11-slim)':<43} {result['base_image_mb']:>8.1f} MB")
    print(f"{'CPU image, estimated':<43} {result['total_mb']:>8.1f} MB")


if __name__ == "__main__":
    main()
