#!/usr/bin/env bash
# On one CUDA GPU, in at most 7.8 minutes on an H100/H200 (each step has its own time limit; the machine's
# start aside): the GPU tests, then featurization at the Llama-2-7B shape for every projection kind and at
# SmolLM2-135M's shape.
# Uses the python on PATH (or $PYTHON) with a CUDA build of torch. Without a package index there, run
# `bash scripts/gpu_wheels.sh` on a machine with one first and bring .whl/ along: it is installed from there.
#   bash scripts/test_gpu.sh            # tests + benchmarks, figures in $OUT (default gpu_results/)
#   bash scripts/test_gpu.sh --tests    # tests only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hf_less_site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/hf_less_site${PYTHONPATH:+:$PYTHONPATH}"
else
  "$PY" -c "import hf_less" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
fi
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
"$PY" -c "import torch, transformers, peft; print(torch.cuda.get_device_name(0), 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$OUT/device.txt"
status=0
# The GPU tests: the generators' bits on the GPU, CPU = GPU features to float32 rounding, two runs bitwise equal
# (also compiled), bfloat16 per-example gradients multiplied into float32.
timeout 75 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/gradients/test_projection.py \
  tests/gradients/test_featurizer.py tests/gradients/test_per_example.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
[ "${1:-}" = "--tests" ] && exit $status
bench() {  # name, seconds, arguments: one process each, so a slow kind cannot starve the others
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" examples/bench/featurize_scale.py "$@" --json "$OUT/$name.json" 2>&1 \
    | grep -v Warning | tee "$OUT/$name.txt" || { echo "$name: did not finish in ${limit}s" | tee -a "$OUT/$name.txt"; status=1; }
}
# The paper's shape: 32 layers, hidden 4096, r=128 on q/k/v/o (P = 134M), d = 8192, 64 x 371 tokens, bf16.
# The featurizer picks its batch size (auto); a 256-row pool checks that more rows cost no more per example.
# rowshift-compiled: the same kind with its torch.compile'd pass (compile_projection=True), the first call compiling.
# --profile: the row-shift kind's phases (forward, backward, per-example gradients, Adam direction and projection)
# and top kernels on one featurization of the 64 examples: where the time goes, for the next optimisation.
bench featurize_7b_rowshift 160 --preset llama2-7b --kinds rowshift rowshift-compiled --feat-batch-size auto --profile 64
bench featurize_7b_sparse 60 --preset llama2-7b --kinds sparse --feat-batch-size auto --big-pool 0
bench featurize_7b_rademacher 100 --preset llama2-7b --kinds rademacher --feat-batch-size auto --rounds 1 --big-pool 0
# SmolLM2-135M's shape (random weights: the model's wheel is larger than what a device call carries).
bench featurize_smollm2 35 --preset smollm2-135m --kinds rowshift sparse rademacher --feat-batch-size auto --big-pool 0
# A pool example's projection call alone at the 7B shape (batch 64), with its Adam direction: each kind, the
# row-shift kind's two methods and its compiled pass.
timeout 40 "$PY" examples/bench/projection_speed.py --layers 32 --hidden 4096 --rank 128 --batch 64 --rounds 3 \
  --methods --adam 2>&1 | tee "$OUT/projection_speed_7b.txt" || status=1
exit $status
