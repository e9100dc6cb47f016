#!/usr/bin/env bash
# The whole test suite on a fresh machine: install (idempotent), lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${SAMULLM_VENV:-.venv}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
"$VENV/bin/ruff" check .
"$VENV/bin/mypy" planning
"$VENV/bin/python" -m pytest "$@"
