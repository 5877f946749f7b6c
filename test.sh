#!/usr/bin/env bash
# Run the test suite (sets up .venv/ first if needed).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, mitsuba, mediapipe, h5py, gradio, playwright, ray" 2>/dev/null; then
    ./setup.sh --no-demo
fi
exec .venv/bin/python -m pytest -q tests "$@"
