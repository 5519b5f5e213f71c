#!/usr/bin/env bash
# Create .venv-llmc: llm-compressor in its own virtual environment, for benchmarks/bench_llmcompressor.py.
# Its pins (transformers 5.15-5.17, compressed-tensors 0.19.0) conflict with ours, so it never goes into .venv.
#   bash benchmarks/llmcompressor_env.sh        (from the repository root; about 1 GB of packages)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LLMC_VENV:-.venv-llmc}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# The CPU build of torch first, pinned as in .ci/setup.sh (llm-compressor accepts torch 2.10-2.14; an unpinned
# "torch" may pull a multi-GB CUDA build). On a machine without a local CPU wheel, add
# --index-url https://download.pytorch.org/whl/cpu to that line.
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
$PIP install "llmcompressor==0.14.0.1"
"$VENV/bin/python" -c "import llmcompressor, torch, transformers; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
