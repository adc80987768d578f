#!/usr/bin/env bash
# compare.sh [MODEL] [BATCH]: flexrun against each baseline on the same rows, in the same run.
#   in-memory    flexrun (everything in RAM) vs Hugging Face `generate`, batch BATCH, prompt 128, gen 32
#   disk-offload flexrun (weights 100% on disk, host budget HOST_MEM) vs transformers + accelerate
#                (device_map="auto", max_memory cpu=HOST_MEM, offload_folder), same batch and budget
#   flexgen      the `flexgen` package on the same policy (CUDA machines only)
# Every run: page cache dropped, run in a memory cgroup (MEM_LIMIT for the disk case, MEM_LIMIT_INMEM
# in memory) that also bounds the page cache; REPEAT runs, medians, ratio.
# Settings: DTYPE (bfloat16, the dtype both sides store and, HF, compute in; flexrun computes in float32
# on a CPU without bf16 matmul hardware, see README "Dtypes"), HOST_MEM (1GiB), PROMPT (128), GEN (32),
# DISK_BATCH (the disk case's batch; default BATCH), DISK_CACHE (flexrun's KV cache there, host=100),
# DISK_PLACEMENT (manual: flexrun at DISK_BATCH with DISK_CACHE; auto: weights disk=100 held and the
# planner chooses flexrun's batch, cache and activations within HOST_MEM, accelerate stays at DISK_BATCH;
# DISK_FLAGS adds flexrun options there, e.g. "--num-gpu-batches 4" to cap the block the planner picks),
# ACC_BATCHES (the batches accelerate runs at in the disk case, each its own row; default DISK_BATCH),
# CASES ("in-memory disk-offload"). With CALIBRATE=1 (default) `flexrun calibrate` runs before every
# disk-offload run, so the roofline's disk bound uses the bandwidth of that moment (a virtual disk's
# varies by 2x within the hour).
# The memory cgroup of every run: the disk case's is the host budget plus the processes' own ~0.5-1 GiB
# (torch, transformers); the in-memory case holds the whole model.
MEM_LIMIT=${MEM_LIMIT:-2G}
MEM_LIMIT_INMEM=${MEM_LIMIT_INMEM:-16G}
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-1.3b}
BATCH=${2:-8}
DTYPE=${DTYPE:-bfloat16}
HOST_MEM=${HOST_MEM:-1GiB}
PROMPT=${PROMPT:-128}
GEN=${GEN:-32}
DISK_BATCH=${DISK_BATCH:-$BATCH}
DISK_CACHE=${DISK_CACHE:-host=100}
DISK_PLACEMENT=${DISK_PLACEMENT:-manual}
ACC_BATCHES=${ACC_BATCHES:-$DISK_BATCH}
CASES=${CASES:-in-memory disk-offload}
RUNS="$OUT/compare-$MODEL-$(date +%Y%m%d-%H%M%S).jsonl"
OFF=/tmp/flexrun-bench/offload
mkdir -p "$OFF"

tag() { jq -c --arg case "$1" --arg side "$2" '. + {case: $case, side: $side}' >>"$RUNS"; }
# A side that fails (e.g. killed at the memory limit) is reported and leaves its row empty.
failed() { echo "$1 failed in case '$2' (exit $3; see dmesg for an OOM kill at the $LIMIT limit)" >&2; }
fr() { MEM_LIMIT=$LIMIT limited "$PYTHON" -m flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
  --prompt-len "$PROMPT" --gen-len "$GEN" --offload-dir "$OFF" --json "$@" 2>/dev/null; }
hf() { MEM_LIMIT=$LIMIT limited "$PYTHON" "$BENCH_DIR/$1" --model "$MODEL" --dtype "$DTYPE" --prompt-len "$PROMPT" --gen-len "$GEN" "${@:2}" 2>/dev/null; }

[[ ${CALIBRATE:-1} == 1 ]] && flexrun calibrate >/dev/null 2>&1  # disk and FLOP/s now, for the roofline
machine
flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
  --gpu-batch-size 1 >/dev/null 2>&1  # builds the dummy store once, outside the timed runs
[[ $CASES == *disk-offload* ]] && "$PYTHON" "$BENCH_DIR/accelerate_offload.py" --model "$MODEL" --dtype "$DTYPE" \
  --batch 1 --ckpt-dir /tmp/flexrun-bench/hf-ckpt --prepare 2>/dev/null  # the random checkpoint, saved once
cd "$ROOT"
for ((r = 1; r <= REPEAT; r++)); do
  for case in $CASES; do
    case $case in
      in-memory)
        LIMIT=$MEM_LIMIT_INMEM
        c="$case b=$BATCH"
        fr --weights host=100 --cache host=100 --activations host=100 --gpu-batch-size "$BATCH" | tag "$c" flexrun ||
          failed flexrun "$c" $?
        hf hf_generate.py --batch "$BATCH" | tag "$c" hf-generate || failed hf-generate "$c" $? ;;
      disk-offload)
        LIMIT=$MEM_LIMIT
        [[ ${CALIBRATE:-1} == 1 ]] && flexrun calibrate >/dev/null 2>&1
        if [[ $DISK_PLACEMENT == auto ]]; then
          c="$case host=$HOST_MEM"
          # shellcheck disable=SC2086  # DISK_FLAGS holds several words
          fr --placement auto --weights disk=100 --host-mem "$HOST_MEM" ${DISK_FLAGS:-} | tag "$c" flexrun ||
            failed flexrun "$c" $?
        else
          c="$case b=$DISK_BATCH host=$HOST_MEM"
          fr --weights disk=100 --cache "$DISK_CACHE" --activations host=100 --gpu-batch-size "$DISK_BATCH" \
            --host-mem "$HOST_MEM" | tag "$c" flexrun || failed flexrun "$c" $?
        fi
        for ab in $ACC_BATCHES; do
          side=accelerate
          [[ $ACC_BATCHES == "$DISK_BATCH" ]] || side="accelerate b=$ab"
          hf accelerate_offload.py --batch "$ab" --host-mem "$HOST_MEM" \
            --ckpt-dir /tmp/flexrun-bench/hf-ckpt --offload-dir /tmp/flexrun-bench/accelerate-offload |
            tag "$c" "$side" || failed "$side" "$c" $?
        done ;;
    esac
  done
done
"$BENCH_DIR/flexgen_baseline.sh" "$MODEL" "$BATCH"
echo "model $MODEL, $DTYPE, prompt $PROMPT, gen $GEN, memory cgroup: $MEM_LIMIT (disk case), $MEM_LIMIT_INMEM (in memory); medians of $REPEAT run(s); raw runs: $RUNS"
"$PYTHON" "$BENCH_DIR/table.py" "$RUNS" --compare
