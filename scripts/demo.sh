#!/usr/bin/env bash
# Set up (idempotent) and run the quickstart: warmup, LESS scores, selection on SmolLM2-135M (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/quickstart.py "$@"
