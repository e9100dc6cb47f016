#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent, without the vLLM extra unless it is
# already there), then estimate how long three models take on 5,000 prompts on 8 simulated
# A100s for every tensor/data-parallel split, with P50/P90 over sampled output lengths.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMULLM_NO_VLLM=${SAMULLM_NO_VLLM:-1} bash scripts/bootstrap.sh
VENV=${SAMULLM_VENV:-.venv}
for model in lmsys/vicuna-13b-v1.5 mosaicml/mpt-7b-chat meta-llama/Llama-2-70b-chat-hf; do
    "$VENV/bin/samullm" estimate --model "$model" --gpus 8 --requests 5000 --prompt-len 256 \
        --max-tokens 512 --draws 8 --seed 0
    echo
done
