#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent, without the vLLM extra unless it is
# already there), then plan the LLM-Blender ensemble (9 models x 1,000 prompts) on 8 simulated
# A100s in NVLink pairs and compare the plan with the four baselines and the lower bound.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMULLM_NO_VLLM=${SAMULLM_NO_VLLM:-1} bash scripts/bootstrap.sh
VENV=${SAMULLM_VENV:-.venv}
"$VENV/bin/samullm" plan examples/paper/ensemble_1k.yaml \
    --cluster examples/clusters/a100x8_nvlink_pairs.yaml --compare --draws 5 --seed 0
