#!/usr/bin/env bash
# accuracy.sh: the cost model's predicted throughput against flexrun's measured throughput over a matrix
# of placements on this machine (OPT-350m and OPT-1.3B, dummy weights, float32), with the calibrated
# hardware spec (`flexrun calibrate` runs first if there is none). Target: within 25%.
# Settings: PROMPT (128), GEN (8), DTYPE (float32), MODELS ("opt-350m opt-1.3b").
source "$(dirname "$0")/lib.sh"
PROMPT=${PROMPT:-128}
GEN=${GEN:-8}
DTYPE=${DTYPE:-float32}
MODELS=${MODELS:-opt-350m opt-1.3b}
RUNS="$OUT/accuracy-$(date +%Y%m%d-%H%M%S).jsonl"
MATRIX=(
  "--weights host=100 --cache host=100 --activations host=100 --gpu-batch-size 4"
  "--weights host=100 --cache host=100 --activations host=100 --gpu-batch-size 16"
  "--weights host=100 --cache host=100 --activations host=100 --gpu-batch-size 4 --num-gpu-batches 4"
  "--weights host=50,disk=50 --cache host=100 --activations host=100 --gpu-batch-size 8"
  "--weights disk=100 --cache host=100 --activations host=100 --gpu-batch-size 8"
  "--weights host=100 --cache disk=100 --activations host=100 --gpu-batch-size 8"
)
machine
cd "$ROOT"
for model in $MODELS; do
  flexrun bench --model "$model" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
    --gpu-batch-size 1 >/dev/null 2>&1  # builds the dummy store once
  for placement in "${MATRIX[@]}"; do
    # shellcheck disable=SC2086
    limited "$PYTHON" -m flexrun bench --model "$model" --dummy-weights --dtype "$DTYPE" --placement manual \
      $placement --prompt-len "$PROMPT" --gen-len "$GEN" --offload-dir /tmp/flexrun-bench/offload --json 2>/dev/null >>"$RUNS"
  done
done
"$PYTHON" "$BENCH_DIR/accuracy.py" "$RUNS"
