#!/usr/bin/env bash
# Test suite: creates/uses .venv, then runs pytest (tests needing ../shared/data or chromium skip when absent).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/venv.sh
exec .venv/bin/python -m pytest -q "$@"
