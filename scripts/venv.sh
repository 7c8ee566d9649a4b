#!/usr/bin/env bash
# Create (or reuse) .venv and install HematoVision with what the tests and the app need.
# torch is pinned first: a plain 'torch' requirement could pull a multi-GB build from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.hematovision-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    .venv/bin/python -m pip install --quiet -e '.[serve,onnx,openvino,ray,postgres,stain,test]'
    touch "$stamp"
fi
