#!/bin/bash
# The cuda_ad_rgb checks, for a machine with an NVIDIA GPU whose Python already has torch, h5py,
# scipy, pillow, tqdm and pytest: Mitsuba and drjit wheels for it may be given in .whl/.
# Writes its logs to $OUT (default ./gpu-check).
set -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1 FACE_MODEL_CACHE=/tmp/face-model-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
FACE_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q tests/test_renderer.py tests/test_appearance.py 2>&1 \
    | tail -25 | tee "$OUT/tests.txt"
# the goal first: the default fit's whole command line (every output written), then its accuracy
timeout 150 python3 benchmark.py --device cuda --cli 2>&1 | grep -v '^[WI]0000' | tail -5 | tee "$OUT/benchmark_cli.txt"
timeout 150 python3 benchmark.py --device cuda 2>&1 | grep -v '^[WI]0000' | tee "$OUT/benchmark_default.txt"
