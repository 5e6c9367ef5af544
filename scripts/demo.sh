#!/usr/bin/env bash
# Set up (idempotent) and run `hf-less demo`: BIG-bench 1.0.0 (downloaded once, 358 MB) + SmolLM2-135M on CPU:
# warmup -> LESS features -> LESS and random selections -> LoRA training -> target loss -> out/demo/report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
hf-less demo --run_dir out/demo "$@"
