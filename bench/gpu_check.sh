#!/usr/bin/env bash
# Prepared for an accelerator (the `device` tool's machine; run from the repository root):
#   bash bench/gpu_check.sh                     # figures to $OUT (the device tool's folder) or ./out
#   bash bench/gpu_check.sh --parts spec,int8   # the optional parts, when time is left
# Default parts (bench/gpu_check.py, in order, one H100 in under 8 minutes; --budget-s 450 skips a
# part that would start later): Triton paged-attention kernels vs the torch reference, float32
# greedy == transformers' generate() on both model paths (own code, transformers modules), CUDA
# graph replay == eager (an attention layer, then the engine vs enforce_eager), W1 on a
# Qwen2.5-0.5B-shaped random bf16 model (fleetlm with and without graphs beside generate()), and a
# batch-32 decode-step profile (wall ms, phases, GPU busy share). The JSON holds every part's
# figures or error and "targets" (W1 >= 3x generate(), step <= 5 ms, GPU busy >= 50%).
# Exit status 1 on a failed correctness check or a part that raised.
# Runs from PYTHONPATH with the machine's own torch (Triton ships with torch's CUDA build).
# Tensor parallelism over NCCL needs two GPUs; on a one-GPU machine only the unsharded path runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Triton compiles each kernel once per machine into this cache.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fleetlm-triton-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable (the torch fallback runs on CUDA)"
"$PY" bench/gpu_check.py --device "${DEVICE:-cuda}" --json "$OUT_DIR/gpu_check.json" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
