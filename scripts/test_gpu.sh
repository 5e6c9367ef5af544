#!/usr/bin/env bash
# On a CUDA machine: the GPU tests (pytest -m gpu) and the scale benchmark at the Llama-2-7B shape.
# Uses the python on PATH (or $PYTHON) with a CUDA build of torch and hf-less's dependencies installed.
#   bash scripts/test_gpu.sh            # tests + benchmark, figures in gpu_results/
#   bash scripts/test_gpu.sh --tests    # tests only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import hf_less" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt"
"$PY" -m pytest -q -m gpu -rs tests/gradients/test_projection.py tests/gradients/test_featurizer.py | tee "$OUT/gpu_tests.txt"
[ "${1:-}" = "--tests" ] && exit 0
# The paper's shape: 32 layers, hidden 4096, r=128 on q/k/v/o (P = 134M), d = 8192, 371-token examples.
# Sparse only: the dense kind at this shape did not finish with the tests inside 8 minutes on an H200
# (add rademacher to --kinds to measure it).
"$PY" examples/bench/featurize_scale.py --preset llama2-7b --kinds sparse --json "$OUT/featurize_scale_7b.json" | tee "$OUT/featurize_scale_7b.txt"
