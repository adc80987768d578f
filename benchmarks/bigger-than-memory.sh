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
#   GGUF_F16 / GGUF_Q8  GGUF files of the same weights for llama.cpp (written with llama.cpp's
#               convert_hf_to_gguf.py from a checkpoint dir, `--outtype f16` / `q8_0`); without them, or
#               without llama-cpp-python, the llama.cpp side is skipped and the script says so.
MEM_LIMIT=${MEM_LIMIT:-1G} # before lib.sh, whose default is 4G
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MODEL=${MODEL:-opt-1.3b}
DUMMY=${DUMMY:-1}
GEN=${GEN:-32}
CASES=${CASES:-"1x32 16x128"}
THREADS=${THREADS:-$(nproc)}
WORK=${WORK:-/tmp/flexrun-bench/bigger}
mkdir -p "$WORK"
stamp=$(date -u +%Y%m%d-%H%M%S)
raw="$OUT/bigger-than-memory-$stamp.txt"
dummy=()
[[ $DUMMY == 1 ]] && dummy=(--dummy-weights)

echo "# bigger than memory: $MODEL in a $MEM_LIMIT memory cgroup, $GEN new tokens, $REPEAT runs per case (median)"
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

printf '\n| case | side | decode tok/s | overall tok/s | peak RSS | planned peak | host budget (source) | disk read (whole run) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for case in $CASES; do
  n=${case%x*} s=${case#*x}
  prompts "$n" "$s" >"$WORK/in-$case.jsonl"
  : >"$WORK/flexrun-$case.runs"
  for r in $(seq "$REPEAT"); do
    log="$WORK/flexrun-$case-$r.log"
    rm -f "$WORK/out-$case.jsonl" "$WORK/out-$case.jsonl.job.json"
    rc=0
    limited "$PYTHON" -m flexrun generate -m "$MODEL" "${dummy[@]}" --dtype bfloat16 --verbose \
      --input "$WORK/in-$case.jsonl" --output "$WORK/out-$case.jsonl" --max-new-tokens "$GEN" \
      >"$log" 2>&1 || rc=$?
    cat "$log" >>"$raw"
    if [[ $rc != 0 ]]; then
      echo "| $case | flexrun bf16 | run $r exited $rc (137: killed by the kernel): $(tail -1 "$log") | | | | | |"
      continue
    fi
    decode=$(field "$log" "decode latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
    total=$(field "$log" "total latency" '{for (i = 1; i <= NF; i++) if ($i == "throughput:") print $(i + 1)}')
    echo "$decode $total" >>"$WORK/flexrun-$case.runs"
  done
  [[ -s "$WORK/flexrun-$case.runs" ]] || continue # every run failed: said above
  last=$(grep -l "^peak resident memory" "$WORK"/flexrun-"$case"-*.log | tail -1)
  dec=$(awk '{print $1}' "$WORK/flexrun-$case.runs" | median)
  tot=$(awk '{print $2}' "$WORK/flexrun-$case.runs" | median)
  peak=$(field "$last" "peak resident memory (measured)" -F'[:,]' '{print $2}')
  planned=$(field "$last" "planned peak resident memory" '{print $5, $6}')
  budget=$(field "$last" "^plan (" -F'host from ' '{split($2, a, "): "); print a[1]}')
  host=$(field "$last" "^plan (" -F'budgets host ' '{split($2, a, ","); print a[1]}')
  disk=$(field "$last" "^disk read" '{print $3, $4}')
  echo "| $n x p$s g$GEN | flexrun bf16 | $dec | $tot | $peak | $planned | $host ($budget) | $disk |"
done

# llama.cpp: mmap of the GGUF file, the kernel paging it within the same cgroup.
if ! "$PYTHON" -c 'import llama_cpp' 2>/dev/null; then
  echo
  echo "llama.cpp: skipped, llama-cpp-python is not importable with $PYTHON (pip install llama-cpp-python)"
elif [[ -z "${GGUF_F16:-}" && -z "${GGUF_Q8:-}" ]]; then
  echo
  echo "llama.cpp: skipped, no GGUF_F16 / GGUF_Q8 given (convert the same checkpoint with convert_hf_to_gguf.py)"
else
  for gguf in ${GGUF_F16:-} ${GGUF_Q8:-}; do
    for case in $CASES; do
      n=${case%x*} s=${case#*x}
      for r in $(seq "$REPEAT"); do
        limited "$PYTHON" - "$gguf" "$n" "$s" "$GEN" "$THREADS" <<'PY' | tee -a "$raw"
import random, sys, time
from llama_cpp import Llama
path, n, s, gen, threads = sys.argv[1], *map(int, sys.argv[2:])
llm = Llama(path, n_ctx=s + gen + 8, n_threads=threads, use_mmap=True, verbose=False)
random.seed(0)
start, decode = time.perf_counter(), 0.0
for _ in range(n):  # one sequence at a time: llama-cpp-python's high-level API does not batch
    llm.reset()
    llm.eval([random.randint(4, 30000) for _ in range(s)])
    t = time.perf_counter()
    for _ in range(gen):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    decode += time.perf_counter() - t
total = time.perf_counter() - start
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(f"| {n} x p{s} g{gen} | llama.cpp {path.rsplit('/', 1)[-1]} | {n * gen / decode:.2f} | {n * gen / total:.2f} | {peak / 2**20:.0f} MiB | | mmap | |")
PY
      done
    done
  done
fi
echo
echo "raw logs: $raw"
