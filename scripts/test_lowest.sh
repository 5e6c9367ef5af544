#!/usr/bin/env bash
# Set up (idempotent) .venv-lowest with the lowest transformers and trl that pyproject.toml allows,
# and run the tests that exercise the trainer and the tokenization against them.
# Extra pytest arguments replace the default test files.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep in step with the lower bounds in pyproject.toml.
TRANSFORMERS_LOWEST=4.56.0
TRL_LOWEST=0.20.0
PY=${PYTHON:-python3}
[ -x .venv-lowest/bin/python ] || "$PY" -m venv .venv-lowest
. .venv-lowest/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# The pins go in the same resolve as the project, so every other dependency is one that accepts them.
python -m pip install -q -e ".[test]" "transformers==$TRANSFORMERS_LOWEST" "trl==$TRL_LOWEST"
python - "$TRANSFORMERS_LOWEST" "$TRL_LOWEST" <<'EOF'
import sys, transformers, trl
got = (transformers.__version__, trl.__version__)
if got != tuple(sys.argv[1:]):
    sys.exit(f"test_lowest.sh: expected transformers, trl == {sys.argv[1:]}, got {got}")
print(f"lowest versions: transformers {got[0]}, trl {got[1]}")
EOF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then
  set -- tests/training/test_trainer.py tests/training/test_config.py tests/training/test_warmup.py \
    tests/gradients/test_state.py tests/utils/test_identity.py tests/test_data.py tests/test_trl_tokenization.py
fi
# pytest exits 5 when it collects no test: a failure here too (set -e), never a pass. A run in which every
# test was skipped (e.g. a dependency missing in this venv) tested nothing either: refused below.
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
python -m pytest -q --junitxml="$report/junit.xml" "$@"
python - "$report/junit.xml" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
if ran <= 0:
    sys.exit("test_lowest.sh: no test ran against the lowest versions (all skipped or none collected).")
print(f"test_lowest.sh: {ran} tests ran against the lowest supported transformers and trl.")
PYEOF
