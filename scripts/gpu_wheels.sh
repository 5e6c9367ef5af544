#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that a GPU machine without package-index access needs
# beside its own torch, transformers, peft and accelerate: hf-less's other dependencies. Carry .whl/
# to that machine; scripts/test_gpu.sh installs them from there (no index). Python 3.12, x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl trl datasets pot dill multiprocess
ls -la .whl
