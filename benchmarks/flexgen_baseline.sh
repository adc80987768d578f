#!/usr/bin/env bash
# flexgen_baseline.sh MODEL BATCH: the `flexgen` package (PyPI 0.1.8) on dummy weights with the policy
# flexrun uses (weights on CPU, cache and activations on GPU). It needs CUDA; without it, it says so.
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-1.3b}
BATCH=${2:-8}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "flexgen: skipped: no CUDA"
  exit 0
fi
"$PYTHON" -c 'import flexgen' 2>/dev/null || "$PYTHON" -m pip install -q "flexgen==0.1.8"
limited "$PYTHON" -m flexgen.flex_opt --model "facebook/$MODEL" --path _DUMMY_ \
  --percent 0 100 100 0 100 0 --gpu-batch-size "$BATCH" --num-gpu-batches 1 \
  --prompt-len "${PROMPT:-128}" --gen-len "${GEN:-32}" --offload-dir /tmp/flexrun-bench/flexgen-offload
