#!/usr/bin/env bash
# A model bigger than the memory it is given (issue 25): `flexrun generate` with no memory flags inside a
# memory cgroup of MEM_LIMIT, page cache dropped before each run, against llama.cpp's mmap of the same
# weights when llama-cpp-python is importable. Prints the machine, the plan (its host budget and where it
# came from), and per case and side: decode tok/s, overall tok/s, peak RSS (measured) beside the planned
# peak and the budget, bytes read from disk over the run, medians of REPEAT runs.
#
#   MODEL       a model name or checkpoint dir (default opt-1.3b: 2.5 GiB of bf16 dummy weights, 2.4x 1 GiB)
#   DUMMY       1: random weights of MODEL's shape (default 1)
#   MEM_LIMIT   the cgroup's limit (default 1G); REPEAT (default 3); GEN (new tokens, default 32)
#   CASES       "1x32 16x128": sequences x prompt length (default both)
#   SIDES       "flexrun llama.cpp": which sides to run (default both)
#   GGUF_F16 / GGUF_Q8  GGUF files of one model for llama.cpp (benchmarks/make_gguf.py writes random weights
#               in a real shape, f16 and q8_0 from one seed); given them with DUMMY=0, flexrun runs the same
#               files (f16 in bf16, q8_0 as int8) instead of MODEL. Without them, or without
#               llama-cpp-python, the llama.cpp side is skipped and the script says so.
MEM_LIMIT=${MEM_LIMIT:-1G} # before lib.sh, whose default is 4G
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MODEL=${MODEL:-opt-1.3b}
DUMMY=${DUMMY:-1}
GEN=${GEN:-32}
CASES=${CASES:-"1x32 16x128"}
SIDES=${SIDES:-flexrun llama.cpp}
THREADS=${THREADS:-$(nproc)}
WORK=${WORK:-/tmp/flexrun-bench/bigger}
mkdir -p "$WORK"
stamp=$(date -u +%Y%m%d-%H%M%S)
raw="$OUT/bigger-than-memory-$stamp.txt"
dummy=()
[[ $DUMMY == 1 ]] && dummy=(--dummy-weights)

what=$MODEL
[[ $DUMMY != 1 && -n "${GGUF_F16:-}${GGUF_Q8:-}" ]] && what="$(basename "${GGUF_F16:-}") $(basename "${GGUF_Q8:-}")"
echo "# bigger than memory: $what in a $MEM_LIMIT memory cgroup, $GEN new tokens, $REPEAT runs per case (median)"
machine
echo "threads: $THREADS (torch intra-op; llama.cpp n_threads)"
export OMP_NUM_THREADS=$THREADS

# The first run converts MODEL into the store cache once (inside the cgroup, as a user's first run would);
# the figures below are the engine's own (its prefill and decode time), which conversion does not enter.

prompts() { # prompts N LEN: N records of LEN random token ids
  "$PYTHON" -c 'import json, random, sys
random.seed(0)
n, s = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n): print(json.dumps({"input_ids": [random.randint(4, 30000) for _ in range(s)]}))' "$1" "$2"
}

# field LOG PATTERN AWK-ARGS...: a figure out of flexrun's summary.
field() { grep -m1 -- "$2" "$1" | awk "${@:3}" || true; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR + 1) / 2)]; else print "n/a"}'; }

# flexrun_side MODEL LABEL [OPTION...]: REPEAT runs of each case, one median row per case.
flexrun_side() {
  local model=$1 label=$2 tag
  shift 2
  tag=$(basename "$model")
  for case in $CASES; do
    n=${case%x*} s=${case#*x}
    prompts "$n" "$s" >"$WORK/in-$case.jsonl"
    : >"$WORK/flexrun-$tag-$case.runs"
    for r in $(seq "$REPEAT"); do
      log="$WORK/flexrun-$tag-$case-$r.log"
      rm -f "$WORK/out-$case.jsonl" "$WORK/out-$case.jsonl.job.json"
      rc=0
      limited "$PYTHON" -m flexrun generate -m "$model" "$@" --verbose \
        --input "$WORK/in-$case.jsonl" --output "$WORK/out-$case.jsonl" --max-new-tokens "$GEN" \
        >"$log" 2>&1 || rc=$?
      cat "$log" >>"$raw"
      if [[ $rc != 0 ]]; then
        why=$(grep -m1 '^Error: ' "$log" | cut -c1-300 || true)
        [[ $rc == 137 ]] && why="killed by the kernel (SIGKILL)"
        echo "| $case | $label | run $r exited $rc: ${why:-$(tail -1 "$log")} | | | | | |"
        continue
      fi
      decode=$(field "$log" "decode latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
      total=$(field "$log" "total latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
      echo "$decode $total" >>"$WORK/flexrun-$tag-$case.runs"
    done
    [[ -s "$WORK/flexrun-$tag-$case.runs" ]] || continue # every run failed: said above
    last=$(grep -l "^peak resident memory" "$WORK"/flexrun-"$tag"-"$case"-*.log | tail -1)
    dec=$(awk '{print $1}' "$WORK/flexrun-$tag-$case.runs" | median)
    tot=$(awk '{print $2}' "$WORK/flexrun-$tag-$case.runs" | median)
    peak=$(field "$last" "peak resident memory (measured)" -F'[:,]' '{print $2}')
    planned=$(field "$last" "planned peak resident memory" '{print $5, $6}')
    budget=$(field "$last" "^plan (" -F'host from ' '{split($2, a, "): "); print a[1]}')
    host=$(field "$last" "^plan (" -F'budgets host ' '{split($2, a, ","); print a[1]}')
    disk=$(field "$last" "^disk read" '{print $3, $4}')
    echo "| $n x p$s g$GEN | $label | $dec | $tot | $peak | $planned | $host ($budget) | $disk |"
  done
}

printf '\n| case | side | decode tok/s | overall tok/s | peak RSS | planned peak | host budget (source) | disk read (whole run) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
if [[ " $SIDES " != *" flexrun "* ]]; then
  :
elif [[ -n "${GGUF_F16:-}${GGUF_Q8:-}" && $DUMMY != 1 ]]; then
  # The same bytes as llama.cpp's: flexrun reads the GGUF files (f16 stored and computed in bf16, held
  # uncompressed: left to choose, the planner may re-quantize it to int8; q8_0 as its own int8 g32 blocks).
  [[ -n "${GGUF_F16:-}" ]] && flexrun_side "$GGUF_F16" "flexrun bf16 ($(basename "$GGUF_F16"))" --dtype bfloat16 \
    --compress-weight none
  [[ -n "${GGUF_Q8:-}" ]] && flexrun_side "$GGUF_Q8" "flexrun int8 ($(basename "$GGUF_Q8"))" --dtype bfloat16
else
  flexrun_side "$MODEL" "flexrun bf16" "${dummy[@]}" --dtype bfloat16 --compress-weight none
fi

# llama.cpp: mmap of the GGUF file, the kernel paging it within the same cgroup; all sequences decoded
# together (llamacpp_batched.py), medians of REPEAT runs.
if [[ " $SIDES " != *" llama.cpp "* ]]; then
  :
elif ! "$PYTHON" -c 'import llama_cpp' 2>/dev/null; then
  echo
  echo "llama.cpp: skipped, llama-cpp-python is not importable with $PYTHON (pip install llama-cpp-python)"
elif [[ -z "${GGUF_F16:-}" && -z "${GGUF_Q8:-}" ]]; then
  echo
  echo "llama.cpp: skipped, no GGUF_F16 / GGUF_Q8 given (benchmarks/make_gguf.py writes them)"
else
  for gguf in ${GGUF_F16:-} ${GGUF_Q8:-}; do
    for case in $CASES; do
      n=${case%x*} s=${case#*x}
      rows="$WORK/llama-$(basename "$gguf")-$case.rows"
      : >"$rows"
      for _ in $(seq "$REPEAT"); do
        limited "$PYTHON" "$BENCH_DIR/llamacpp_batched.py" "$gguf" "$n" "$s" "$GEN" "$THREADS" 2>>"$raw" >>"$rows" || true
      done
      cat "$rows" >>"$raw"
      [[ -s $rows ]] || { echo "| $n x p$s g$GEN | llama.cpp $(basename "$gguf") | every run failed (see $raw) | | | | | |"; continue; }
      dec=$(awk -F'|' '{print $4}' "$rows" | median)
      tot=$(awk -F'|' '{print $5}' "$rows" | median)
      peak=$(awk -F'|' '{print $6}' "$rows" | tail -1 | xargs)
      echo "| $n x p$s g$GEN | llama.cpp $(basename "$gguf") (mmap) | $dec | $tot | $peak | | | |"
    done
  done
fi
echo
echo "raw logs: $raw"
