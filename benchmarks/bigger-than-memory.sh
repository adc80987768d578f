#!/usr/bin/env bash
# A model bigger than the memory it is given (issue 25): `flexrun generate` with no memory flags inside a
# memory cgroup of MEM_LIMIT, page cache dropped before each run, against llama.cpp's mmap of the same
# weights when llama-cpp-python is importable. Prints the machine, the plan (its host budget and where it
# came from), and per case and side: decode tok/s, overall tok/s, peak RSS (measured) beside the planned
# peak and the budget, bytes read from disk per decode step, the disk's read rate measured just before each
# run (benchmarks/diskrate.py: a virtual disk's rate moves from minute to minute) and the decode step over
# its bytes at that rate (1.00: the disk's speed), medians of REPEAT runs. The runs interleave (round r
# runs every side once), so a slow spell of the disk falls on every side alike.
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

# The disk's read rate now (GiB/s), page cache dropped before and after: 1 GiB of PROBE read as the engine reads.
PROBE=${GGUF_F16:-${GGUF_Q8:-}}
disk_rate() {
  [[ -n $PROBE ]] || { echo 0; return; }
  drop_caches
  "$PYTHON" "$BENCH_DIR/diskrate.py" "$PROBE" $((1 << 30)) | awk '{print $1}'
}

# Sides: "kind|label|model|options", kind flexrun or llama.
sides=()
if [[ " $SIDES " == *" flexrun "* ]]; then
  if [[ -n "${GGUF_F16:-}${GGUF_Q8:-}" && $DUMMY != 1 ]]; then
    # The same bytes as llama.cpp's: flexrun reads the GGUF files (f16 stored and computed in bf16, held
    # uncompressed: left to choose, the planner may re-quantize it to int8; q8_0 as its own int8 g32 blocks).
    [[ -n "${GGUF_F16:-}" ]] && sides+=("flexrun|flexrun bf16 ($(basename "$GGUF_F16"))|$GGUF_F16|--dtype bfloat16 --compress-weight none")
    [[ -n "${GGUF_Q8:-}" ]] && sides+=("flexrun|flexrun int8 ($(basename "$GGUF_Q8"))|$GGUF_Q8|--dtype bfloat16")
  else
    sides+=("flexrun|flexrun bf16|$MODEL|${dummy[*]} --dtype bfloat16 --compress-weight none")
  fi
fi
llama_note=""
if [[ " $SIDES " == *" llama.cpp "* ]]; then
  if ! "$PYTHON" -c 'import llama_cpp' 2>/dev/null; then
    llama_note="llama.cpp: skipped, llama-cpp-python is not importable with $PYTHON (pip install llama-cpp-python)"
  elif [[ -z "${GGUF_F16:-}" && -z "${GGUF_Q8:-}" ]]; then
    llama_note="llama.cpp: skipped, no GGUF_F16 / GGUF_Q8 given (benchmarks/make_gguf.py writes them)"
  else
    # mmap of the GGUF file, the kernel paging it within the same cgroup; all sequences decoded together.
    for gguf in ${GGUF_F16:-} ${GGUF_Q8:-}; do sides+=("llama|llama.cpp $(basename "$gguf") (mmap)|$gguf|"); done
  fi
fi

# run_side K CASE R: side K's run R of CASE; appends "decode total rate bytes/step s/step" to its runs file.
run_side() {
  local kind label model opts n=${2%x*} s=${2#*x} runs="$WORK/side-$1-$2.runs" rate log rc=0
  IFS='|' read -r kind label model opts <<<"${sides[$1]}"
  rate=$(disk_rate)
  if [[ $kind == llama ]]; then
    local row
    row=$(limited "$PYTHON" "$BENCH_DIR/llamacpp_batched.py" "$model" "$n" "$s" "$GEN" "$THREADS" 2>>"$raw") || rc=$?
    echo "$row" >>"$raw"
    [[ $rc == 0 && -n $row ]] || { echo "| $n x p$s g$GEN | $label | run $3 exited $rc (see $raw) | | | | | | | |"; return; }
    # | case | side | decode | overall | peak | GiB per decode step |
    echo "$row" | awk -F'|' -v r="$rate" -v gen="$GEN" -v n="$n" '{
      dec = $4 + 0; step = (dec > 0) ? n / dec : 0; gib = $7 + 0
      printf "%s %s %s %s %s\n", dec, $5 + 0, r, gib, step }' >>"$runs"
    echo "$row" | awk -F'|' '{print $6}' | xargs >"$WORK/side-$1-$2.peak"
    return
  fi
  log="$WORK/flexrun-$1-$2-$3.log"
  rm -f "$WORK/out-$2.jsonl" "$WORK/out-$2.jsonl.job.json"
  # shellcheck disable=SC2086 # the side's options are words
  limited "$PYTHON" -m flexrun generate -m "$model" $opts --verbose \
    --input "$WORK/in-$2.jsonl" --output "$WORK/out-$2.jsonl" --max-new-tokens "$GEN" >"$log" 2>&1 || rc=$?
  cat "$log" >>"$raw"
  if [[ $rc != 0 ]]; then
    why=$(grep -m1 '^Error: ' "$log" | cut -c1-300 || true)
    [[ $rc == 137 ]] && why="killed by the kernel (SIGKILL)"
    echo "| $n x p$s g$GEN | $label | run $3 exited $rc: ${why:-$(tail -1 "$log")} | | | | | | | |"
    return
  fi
  decode=$(field "$log" "decode latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
  total=$(field "$log" "total latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
  step=$(field "$log" "decode latency" -F'[(]' '{print $2 + 0}')
  gib=$("$PYTHON" - "$log" <<'PY'
import re, sys
m = re.search(r"disk read: .*, ([\d.]+) (\w+) per decode step", open(sys.argv[1]).read())
scale = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1, "TiB": 2**10}
print(f"{float(m.group(1)) * scale[m.group(2)]:.4f}" if m else 0)
PY
)
  echo "$decode $total $rate $gib $step" >>"$runs"
  cp "$log" "$WORK/side-$1-$2.last"
}

printf '\n| case | side | decode tok/s | overall tok/s | peak RSS | planned peak | host budget (source) | read per decode step | disk rate before the run | step / (bytes / rate) |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for case in $CASES; do
  n=${case%x*} s=${case#*x}
  prompts "$n" "$s" >"$WORK/in-$case.jsonl"
  for k in "${!sides[@]}"; do rm -f "$WORK/side-$k-$case".{runs,last,peak}; done
  for r in $(seq "$REPEAT"); do
    for k in "${!sides[@]}"; do run_side "$k" "$case" "$r"; done
  done
  for k in "${!sides[@]}"; do
    IFS='|' read -r kind label _ _ <<<"${sides[$k]}"
    runs="$WORK/side-$k-$case.runs"
    [[ -s $runs ]] || continue # every run failed: said above
    dec=$(awk '{print $1}' "$runs" | median)
    tot=$(awk '{print $2}' "$runs" | median)
    rate=$(awk '{print $3}' "$runs" | median)
    gib=$(awk '{print $4}' "$runs" | median)
    # Each run's step over its bytes at the rate measured just before it; the median of those.
    ratio=$(awk '$3 > 0 && $4 > 0 {printf "%.2f\n", $5 / ($4 / $3)}' "$runs" | median)
    if [[ $kind == llama ]]; then
      echo "| $n x p$s g$GEN | $label | $dec | $tot | $(cat "$WORK/side-$k-$case.peak") | | | $gib GiB | $rate GiB/s | $ratio |"
      continue
    fi
    last="$WORK/side-$k-$case.last"
    peak=$(field "$last" "peak resident memory (measured)" -F'[:,]' '{print $2}')
    planned=$(field "$last" "planned peak resident memory" '{print $5, $6}')
    budget=$(field "$last" "^plan (" -F'host from ' '{split($2, a, "): "); print a[1]}')
    host=$(field "$last" "^plan (" -F'budgets host ' '{split($2, a, ","); print a[1]}')
    echo "| $n x p$s g$GEN | $label | $dec | $tot | $peak | $planned | $host ($budget) | $gib GiB | $rate GiB/s | $ratio |"
  done
done
[[ -n $llama_note ]] && printf '\n%s\n' "$llama_note"
echo
echo "raw logs: $raw"
