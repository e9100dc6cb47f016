#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent, without the vLLM extra unless it is
# already there), then plan and run a three-model application (two answerers and a judge over
# 40 questions) on two simulated A100s: a private Redis, the coordinator and one sim worker per
# GPU group start and stop on their own. Ends with planned vs actual makespan and the results.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMULLM_NO_VLLM=${SAMULLM_NO_VLLM:-1} bash scripts/bootstrap.sh
VENV=${SAMULLM_VENV:-.venv}
"$VENV/bin/samullm" run examples/runtime/three_models.yaml \
    --cluster examples/clusters/a100x2.yaml --time-scale 0.2 --out samullm-results/demo.jsonl
