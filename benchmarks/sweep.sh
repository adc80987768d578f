#!/usr/bin/env bash
# sweep.sh [MODEL] [BATCHES...]: flexrun over micro-batch sizes for two placements (everything in memory;
# weights on disk), one CSV row per run, then the throughput-vs-latency frontier as a PNG (FlexGen's
# figure): latency is one block's prefill + decode, throughput its generated tokens per second.
# Settings: PROMPT (128), GEN (32), DTYPE (float32), NUM_GPU_BATCHES (1), PLACEMENTS (see below).
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-125m}
shift || true
BATCHES=${*:-1 2 4 8 16 32}
PROMPT=${PROMPT:-128}
GEN=${GEN:-32}
DTYPE=${DTYPE:-float32}
NGB=${NUM_GPU_BATCHES:-1}
CSV="$OUT/sweep-$MODEL.csv"
PNG="$OUT/sweep-$MODEL.png"
declare -A PLACEMENTS=(
  [memory]="--weights host=100 --cache host=100 --activations host=100"
  [weights-disk]="--weights disk=100 --cache host=100 --activations host=100"
)
machine
flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
  --gpu-batch-size 1 >/dev/null 2>&1  # builds the dummy store once
echo "model,dtype,placement,gpu_batch_size,num_gpu_batches,block,prompt_len,gen_len,latency_s,total_tok_s,decode_s_per_step,bound_s_per_step" >"$CSV"
cd "$ROOT"
for name in memory weights-disk; do
  for b in $BATCHES; do
    # shellcheck disable=SC2086
    limited "$PYTHON" -m flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
      ${PLACEMENTS[$name]} --gpu-batch-size "$b" --num-gpu-batches "$NGB" --prompt-len "$PROMPT" --gen-len "$GEN" \
      --json 2>/dev/null |
      jq -r --arg p "$name" '[.model, .dtype, $p, .placement.gpu_batch_size, .placement.num_gpu_batches,
        .sequences, .prompt_tokens / .sequences, .generated_tokens / .sequences, .prefill_s + .decode_s,
        .total_tok_s, .decode_s / .decode_steps, .roofline.bound_s] | @csv' | tee -a "$CSV"
  done
done
"$PYTHON" "$BENCH_DIR/plot_frontier.py" "$CSV" "$PNG"
echo "csv: $CSV"
echo "png: $PNG"
