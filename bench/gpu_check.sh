#!/usr/bin/env bash
# Prepared for an accelerator (the `device` tool's machine; run from the repository root):
#   bash bench/gpu_check.sh            # figures to $OUT (the device tool's folder) or ./out
#   bash bench/gpu_check.sh --parts spec,w1,profile,int8 --skip-generate-batch   # skip what ran
# Parts (bench/gpu_check.py --parts, all by default; exit status 1 on a failed check): the greedy
# correctness check (fleetlm vs transformers' generate() on the device, float32 tiny models: mixed
# lengths, prefix hits, preemption, chunked prefill), speculative decoding (greedy equal to
# non-speculative, seeded sampling repeats), int8 weights (agreement, information), W1 on a
# Qwen2.5-0.5B-shaped random bf16 model (fleetlm beside transformers' generate() and
# generate_batch(), the decode roofline bound) and a profile of one batch-32 decode step.
# Tensor parallelism over NCCL needs two GPUs; on a one-GPU machine only the unsharded path runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
"$PY" bench/gpu_check.py --device "${DEVICE:-cuda}" --json "$OUT_DIR/gpu_check.json" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_check.log"
