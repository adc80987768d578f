#!/usr/bin/env bash
# suite.sh [MODELS...]: FlexGen's benchmark suite adapted to flexrun (dummy weights), one table row per
# case with the median of REPEAT runs and the roofline (measured / lower bound per decode step).
# Cases: everything in memory; weights on host+disk and all on disk; KV cache on disk; a mixed split;
# several micro-batches; prompt 256 / 512 / 1024 with gen 32 (GEN). Default models: opt-125m opt-350m (this
# 2-core CPU); pass e.g. `opt-1.3b opt-6.7b` on a bigger machine. Settings: DTYPE (float32), BATCH (4).
source "$(dirname "$0")/lib.sh"
MODELS=${*:-opt-125m opt-350m}
DTYPE=${DTYPE:-float32}
BATCH=${BATCH:-4}
GEN=${GEN:-32}
RUNS="$OUT/suite-$(date +%Y%m%d-%H%M%S).jsonl"
MEM="--weights host=100 --cache host=100 --activations host=100"
CASES=(
  "all-in-memory p256|$MEM --prompt-len 256"
  "all-in-memory p512|$MEM --prompt-len 512"
  "all-in-memory p1024|$MEM --prompt-len 1024"
  "weights host50/disk50 p256|--weights host=50,disk=50 --cache host=100 --activations host=100 --prompt-len 256"
  "weights disk100 p256|--weights disk=100 --cache host=100 --activations host=100 --prompt-len 256"
  "cache disk100 p256|--weights host=100 --cache disk=100 --activations host=100 --prompt-len 256"
  "mixed w40/60 c50/50 a-disk p256|--weights host=40,disk=60 --cache host=50,disk=50 --activations disk=100 --prompt-len 256"
  "4 micro-batches p256|$MEM --num-gpu-batches 4 --prompt-len 256"
)
machine
cd "$ROOT"
for model in $MODELS; do
  flexrun bench --model "$model" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
    --gpu-batch-size 1 >/dev/null 2>&1  # builds the dummy store once
  for entry in "${CASES[@]}"; do
    name=${entry%%|*}
    for ((r = 1; r <= REPEAT; r++)); do
      # shellcheck disable=SC2086
      limited "$PYTHON" -m flexrun bench --model "$model" --dummy-weights --dtype "$DTYPE" --placement manual \
        --gpu-batch-size "$BATCH" --gen-len "$GEN" --offload-dir /tmp/flexrun-bench/offload --json ${entry#*|} 2>/dev/null |
        jq -c --arg case "$model $name" '. + {case: $case, side: "flexrun"}' >>"$RUNS"
    done
  done
done
echo "dtype $DTYPE, micro-batch $BATCH, gen $GEN, medians of $REPEAT runs; raw runs: $RUNS"
"$PYTHON" "$BENCH_DIR/table.py" "$RUNS"
