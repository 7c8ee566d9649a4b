#!/usr/bin/env bash
# Install what tests/browser needs: Debian's chromium and the Python playwright package.
# Playwright drives the system chromium (executable_path); `playwright install` is never run,
# since it downloads a browser build, which fails offline. Idempotent and quiet.
# Usage: bash .ci/install-browser.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${1:-${PYTHON:-}}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "install-browser: installing chromium (apt)"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "install-browser: installing the playwright Python package (pip)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PYTHON" -m pip install -q "playwright>=1.44"
fi

echo "install-browser: $(chromium --version 2>/dev/null | head -n1); playwright $("$PYTHON" -c 'from importlib.metadata import version; print(version("playwright"))')"
