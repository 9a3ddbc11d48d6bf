#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent CUDA machine (python3 there holds a CUDA torch;
# the other packages travel as wheels in .whl/). Writes JSON lines and logs under $OUT (or ./gpu-out).
#   bash bench/gpu_check.sh
# Preparing .whl (ignored by git; the device call carries it, 64 MiB at most): ask the device first, in
# one short call, for `python3 --version` and which of the project's dependencies it lacks
# (python3 -c 'import river, pandas, sklearn, orjson, ...'), then here, for that Python only:
#   .venv/bin/pip download -d .whl --only-binary=:all: --no-deps --python-version 3.X \
#       --platform manylinux2014_x86_64 <the missing ones, never torch> pytest hypothesis httpx
set -u
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$out/gpu.txt"

echo "== learner events/s, CUDA then CPU (same machine)"
timeout 120 python3 -m bench.learner_throughput --device cuda --seconds 4 --out "$out/learner_cuda.json"
timeout 120 python3 -m bench.learner_throughput --device cpu --seconds 4 --out "$out/learner_cpu.json"

echo "== learner tests (CUDA ones included)"
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/learners/test_cuda.py tests/learners/test_kalman.py \
  tests/learners/test_estimator.py 2>&1 | tail -15 | tee "$out/pytest.txt"

echo "== HTTP predict served from the GPU (device auto)"
timeout 200 python3 -m bench.http_latency --seconds 8 --train-events 10000 --no-write 2>&1 | tail -5 | tee "$out/http_gpu.txt"
