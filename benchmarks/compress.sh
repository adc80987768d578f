#!/usr/bin/env bash
# compress.sh [MODEL] [BATCH]: flexrun with uncompressed, int8 and int4 weights (and, with CACHE=1, an int4
# cache too) on the same rows, in the same run. Cases (CASES, default "in-memory"):
#   in-memory    everything in RAM, BATCH sequences, prompt PROMPT, gen GEN
#   disk-offload weights 100% on disk, host budget HOST_MEM, DISK_BATCH sequences (the memory cgroup is
#                MEM_LIMIT), the page cache dropped before every run
# The first side (uncompressed) is the baseline of the table's ratio. Dummy weights: each compression's store
# is written once, outside the timed runs.
MEM_LIMIT_INMEM=${MEM_LIMIT_INMEM:-16G}
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-1.3b}
BATCH=${2:-8}
DTYPE=${DTYPE:-bfloat16}
PROMPT=${PROMPT:-128}
GEN=${GEN:-32}
HOST_MEM=${HOST_MEM:-1GiB}
DISK_BATCH=${DISK_BATCH:-$BATCH}
CASES=${CASES:-in-memory}
RUNS="$OUT/compress-$MODEL-$(date +%Y%m%d-%H%M%S).jsonl"
OFF=/tmp/flexrun-bench/offload
mkdir -p "$OFF"
SIDES=("" "--compress-weight int8" "--compress-weight int4")
[[ ${CACHE:-0} == 1 ]] && SIDES+=("--compress-weight int4 --compress-cache int4")

name() { [[ -z $1 ]] && echo "uncompressed" || echo "${1//--compress-/}" | sed 's/weight/w/; s/cache/c/g'; }
fr() {
  # shellcheck disable=SC2086  # the compression flags are several words
  limited "$PYTHON" -m flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
    --prompt-len "$PROMPT" --gen-len "$GEN" --offload-dir "$OFF" --json $1 "${@:2}" 2>/dev/null
}

machine
for side in "${SIDES[@]}"; do  # each compression's store, written once
  # shellcheck disable=SC2086
  flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
    --gpu-batch-size 1 $side >/dev/null 2>&1
done
cd "$ROOT"
for ((r = 1; r <= REPEAT; r++)); do
  for case in $CASES; do
    for side in "${SIDES[@]}"; do
      s=$(name "$side")
      [[ $s == uncompressed ]] && s=flexrun
      case $case in
        in-memory)
          MEM_LIMIT=$MEM_LIMIT_INMEM fr "$side" --weights host=100 --cache host=100 --activations host=100 \
            --gpu-batch-size "$BATCH" | jq -c --arg case "$case b=$BATCH" --arg side "$s" '. + {case: $case, side: $side}' >>"$RUNS" ;;
        disk-offload)
          fr "$side" --weights disk=100 --cache host=100 --activations host=100 --gpu-batch-size "$DISK_BATCH" \
            --host-mem "$HOST_MEM" | jq -c --arg case "$case b=$DISK_BATCH" --arg side "$s" '. + {case: $case, side: $side}' >>"$RUNS" ;;
      esac
    done
  done
done
echo "model $MODEL, $DTYPE, prompt $PROMPT, gen $GEN; medians of $REPEAT; side flexrun = uncompressed; raw runs: $RUNS"
"$PYTHON" "$BENCH_DIR/table.py" "$RUNS"
