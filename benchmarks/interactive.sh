#!/usr/bin/env bash
# interactive.sh [MODEL]: one sequence, as a person first tries a model: time to first token (a PROMPT-token
# prompt's prefill and its first token, store and model already loaded) and one-sequence decode tok/s, for
# flexrun (the packaged GGUF model, all weights in RAM, batch 1, each weight compression in COMPRESS) beside
# Hugging Face `generate` (float32, the same file's weights dequantized by transformers) and, when it is
# importable, llama-cpp-python on the same GGUF file, all on THREADS threads, runs alternated.
# Settings: THREADS ($(nproc)), PROMPT (40), GEN (64), REPEAT (3, medians), COMPRESS ("auto none": the GGUF's own
# int4 blocks, and float32), DTYPE (float32).
source "$(dirname "$0")/lib.sh"
MODEL=${1:-smollm2-135m-instruct}
THREADS=${THREADS:-$(nproc)}
PROMPT=${PROMPT:-40}
GEN=${GEN:-64}
COMPRESS=${COMPRESS:-auto none}
DTYPE=${DTYPE:-float32}
RUNS="$OUT/interactive-$(date +%Y%m%d-%H%M%S).jsonl"

# bench COMPRESS GEN [OPTION...]: one flexrun run, one sequence, everything in RAM, on THREADS threads.
bench() {
  local compress=$1 gen=$2
  shift 2
  OMP_NUM_THREADS=$THREADS flexrun bench --model "$MODEL" --dtype "$DTYPE" --placement manual --weights host=100 \
    --cache host=100 --activations host=100 --gpu-batch-size 1 --num-gpu-batches 1 --compress-weight "$compress" \
    --prompt-len "$PROMPT" --gen-len "$gen" "$@"
}
flexrun_run() {
  bench "$1" "$GEN" --json 2>/dev/null |
    jq -c --argjson t "$THREADS" \
      '{side: ("flexrun " + (if .placement.compress_weight == "" or .placement.compress_weight == null then "float32" else .placement.compress_weight end)), threads: $t, first_token_s, decode_tok_s,
        step_cpu_s: (.decode_cpu_s / ([.decode_steps, 1] | max))}' >>"$RUNS"
}
baseline() {
  local rc=0
  OMP_NUM_THREADS=$THREADS "$PYTHON" "$BENCH_DIR/interactive.py" "$1" --model "$MODEL" --prompt-len "$PROMPT" --gen-len "$GEN" \
    --threads "$THREADS" 2>/dev/null >>"$RUNS" || rc=$?
  return $rc
}

machine
echo "threads: $THREADS; one sequence, prompt $PROMPT tokens, $GEN new tokens, $DTYPE; raw runs: $RUNS"
for c in $COMPRESS; do bench "$c" 2 >/dev/null 2>&1; done  # each store converted once, outside the timed runs
LLAMA=1
baseline llama-cpp || { LLAMA=0; echo "llama-cpp-python: not importable here, skipped"; }
: >"$RUNS"
for ((r = 1; r <= REPEAT; r++)); do
  for c in $COMPRESS; do flexrun_run "$c"; done
  baseline hf
  if ((LLAMA)); then baseline llama-cpp; fi
done
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  (map(select(.side == "hf")) | map(.decode_tok_s) | median) as $hf
  | (map(select(.side == "hf")) | map(.step_cpu_s) | median) as $hfcpu
  | "| side | threads | time to first token (s) | decode tok/s | vs HF | CPU ms per decode step | vs HF (CPU) |",
    "|---|---|---|---|---|---|---|",
    (group_by(.side)[] | (map(.decode_tok_s) | median) as $d | (map(.step_cpu_s) | median) as $c
     | "| \(.[0].side) | \(.[0].threads) | \(map(.first_token_s) | median * 1000 | round / 1000) | \(($d * 10 | round) / 10) | \(if $hf then (($d / $hf * 100 | round) / 100 | tostring) + "x" else "-" end) | \($c * 10000 | round / 10) | \(if $hfcpu then (($hfcpu / $c * 100 | round) / 100 | tostring) + "x" else "-" end) |")
' "$RUNS"
