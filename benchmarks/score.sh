#!/usr/bin/env bash
# score.sh [MODEL]: multiple-choice scoring, flexrun score against lm-evaluation-harness's hf backend on the
# same requests: QUESTIONS questions of 4 choices each, a CONTEXT-token context every choice shares and
# continuations of 2 to 6 tokens (random ids, seeded), MODEL (opt-1.3b) with DTYPE (bfloat16) random weights.
# flexrun computes each question's context once (prefix sharing) and runs the LM head only at the scored
# positions; it is also run with --no-share-prefixes, to show what the sharing is worth.
#   WEIGHTS=memory (default)  everything in memory: flexrun score on dummy weights vs the hf backend
#                             (score_hf.py) in each of HF_DTYPES, every run in a MEM_LIMIT (8G) cgroup.
#   WEIGHTS=disk              weights on disk at a HOST_MEM (1GiB) host budget, both sides on one saved random
#                             checkpoint: flexrun score --weights disk=100 --host-mem HOST_MEM (the planner
#                             choosing the rest; DISK_PLACEMENT=manual: BATCH rows, activations in host) vs the
#                             hf backend's token-level path through the checkpoint dispatched by accelerate
#                             with disk offload (max_memory cpu=HOST_MEM, offload_folder; as compare.sh's
#                             accelerate_offload.py), each in a MEM_LIMIT (2G: the budget plus the processes'
#                             own ~0.5-1 GiB) cgroup that bounds the page cache too. Both sides' per-request
#                             log-likelihoods are compared: the script fails when they differ by more than
#                             TOL (1e-3 in float32, 0.05 + 2% of |logprob| in 16-bit dtypes).
# The page cache is dropped before each run. Settings: QUESTIONS (4), CONTEXT (512), DTYPE (bfloat16),
# HF_DTYPES (in memory: "bfloat16 float32"; on disk: DTYPE), BATCH (4: rows per micro-batch, the hf backend's
# batch size), UNSHARED (1: also run flexrun --no-share-prefixes; 0: skip it), REPEAT (runs per side, median
# reported; 1), MEM_LIMIT, HOST_MEM, DISK_PLACEMENT (auto), DISK_FLAGS (more flexrun options on disk).
WEIGHTS=${WEIGHTS:-memory}
REPEAT=${REPEAT:-1}
if [[ $WEIGHTS == disk ]]; then
  MEM_LIMIT=${MEM_LIMIT:-2G}
else
  MEM_LIMIT=${MEM_LIMIT:-8G}  # the hf backend's float32 OPT-1.3B alone is 5.3 GB
fi
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-1.3b}
QUESTIONS=${QUESTIONS:-4}
CONTEXT=${CONTEXT:-512}
DTYPE=${DTYPE:-bfloat16}
BATCH=${BATCH:-4}
UNSHARED=${UNSHARED:-1}
HOST_MEM=${HOST_MEM:-1GiB}
DISK_PLACEMENT=${DISK_PLACEMENT:-auto}
STAMP=$(date +%Y%m%d-%H%M%S)
SCORES=/tmp/flexrun-bench/score-$STAMP  # each run's per-request results
mkdir -p "$SCORES"
REQ="$SCORES/requests.jsonl"
case $WEIGHTS in
  memory)
    HF_DTYPES=${HF_DTYPES:-bfloat16 float32}
    RUNS="$OUT/score-$MODEL-$STAMP.jsonl"
    PLACE=(--placement manual --weights host=100 --activations host=100 --gpu-batch-size "$BATCH") ;;
  disk)
    HF_DTYPES=${HF_DTYPES:-$DTYPE}
    RUNS="$OUT/score-disk-$MODEL-$STAMP.jsonl"
    CKPT=/tmp/flexrun-bench/hf-ckpt/$MODEL-$DTYPE
    # No compression: both sides must compute the same log-likelihoods from the same weights.
    PLACE=(--weights disk=100 --host-mem "$HOST_MEM" --compress-weight none --compress-cache none)
    if [[ $DISK_PLACEMENT == manual ]]; then
      PLACE+=(--placement manual --activations host=100 --gpu-batch-size "$BATCH")
    else
      PLACE+=(--placement auto)
    fi
    # shellcheck disable=SC2206  # DISK_FLAGS holds several words
    PLACE+=(${DISK_FLAGS:-}) ;;
  *) echo "WEIGHTS is memory or disk, not '$WEIGHTS'" >&2; exit 2 ;;
esac

"$PYTHON" - "$QUESTIONS" "$CONTEXT" >"$REQ" <<'PY'
import json, random, sys
questions, context = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
for q in range(questions):
    ctx = [rng.randrange(4, 50000) for _ in range(context)]
    for c in range(4):
        cont = [rng.randrange(4, 50000) for _ in range(rng.randint(2, 6))]
        print(json.dumps({"id": f"q{q}-{c}", "context": ctx, "continuation": cont}))
PY

machine
if [[ $WEIGHTS == disk ]]; then  # the random checkpoint both sides load, saved once outside the timed runs
  "$PYTHON" "$BENCH_DIR/accelerate_offload.py" --model "$MODEL" --dtype "$DTYPE" --batch 1 \
    --ckpt-dir /tmp/flexrun-bench/hf-ckpt --prepare 2>/dev/null
  SOURCE=(--model "$CKPT")
else
  SOURCE=(--model "$MODEL" --dummy-weights)
fi
head -1 "$REQ" | jq -c '.context |= .[:8]' >"$REQ.warm"
flexrun score "${SOURCE[@]}" --dtype "$DTYPE" --placement manual -i "$REQ.warm" -o /dev/null \
  --quiet >/dev/null 2>&1 </dev/null || true  # builds the store once, outside the timed runs

# run_flexrun SIDE ARGS...: one timed flexrun score, its --json summary with the side's name; its results
# go to $SCORES (the disk case compares them with the hf side's).
run_flexrun() {
  local side=$1
  shift
  local log="$SCORES/flexrun.stderr" out="$SCORES/${side// /_}.jsonl"
  limited "$PYTHON" -m flexrun score "${SOURCE[@]}" --dtype "$DTYPE" "${PLACE[@]}" -i "$REQ" -o "$out" --overwrite \
    --quiet --json "$@" 2>"$log" >/dev/null </dev/null || { tail -3 "$log" >&2; return 1; }
  grep '^{' "$log" | jq -c --arg side "$side" '{side: $side, requests: .sequences, seconds: .prefill_s, tokens_read,
    tokens_without_sharing, compute_dtype, placement: (.placement | {weights, gpu_batch_size, num_gpu_batches}),
    disk_bytes_read, peak_rss_bytes}' >>"$RUNS"
}
# run_hf DTYPE: one timed hf-backend run (on disk: through accelerate's offload), its JSON line.
run_hf() {
  local offload=()
  [[ $WEIGHTS == disk ]] && offload=(--ckpt "$CKPT" --host-mem "$HOST_MEM" --logprobs "$SCORES/hf-$1.jsonl")
  limited "$PYTHON" score_hf.py --model "$MODEL" --dtype "$1" --requests "$REQ" --batch "$BATCH" "${offload[@]}" |
    grep '^{' >>"$RUNS"
}
for ((r = 1; r <= REPEAT; r++)); do
  (cd "$ROOT" && run_flexrun "flexrun score")
  if ((UNSHARED)); then (cd "$ROOT" && run_flexrun "flexrun score --no-share-prefixes" --no-share-prefixes); fi
  for d in $HF_DTYPES; do (cd "$BENCH_DIR" && run_hf "$d"); done
done
if [[ $WEIGHTS == disk ]]; then
  echo "model $MODEL, $DTYPE weights on disk at a $HOST_MEM host budget (flexrun ${PLACE[*]}; accelerate"\
    "max_memory cpu=$HOST_MEM), memory cgroup $MEM_LIMIT, $QUESTIONS questions x 4 choices, a $CONTEXT-token shared"\
    "context, continuations of 2-6 tokens; medians of $REPEAT; raw runs: $RUNS"
else
  echo "model $MODEL, $DTYPE weights in memory, $QUESTIONS questions x 4 choices, a $CONTEXT-token shared context,"\
    "continuations of 2-6 tokens; medians of $REPEAT; raw runs: $RUNS"
fi
"$PYTHON" - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
sides = {}
for r in filter(lambda r: "side" in r, runs):
    sides.setdefault(r["side"], []).append(r)
base = statistics.median(r["seconds"] for r in sides["flexrun score"])
for side, rs in sides.items():
    s = statistics.median(r["seconds"] for r in rs)
    extra = f", computed in {rs[0]['compute_dtype']}" if "compute_dtype" in rs[0] else ""
    if "placement" in rs[0]:
        pl = rs[0]["placement"]
        extra += f", block {pl['gpu_batch_size']} x {pl['num_gpu_batches']}"
    if "placed_on" in rs[0]:
        extra += f", placed on {'+'.join(rs[0]['placed_on'])}, loaded in {rs[0]['load_s']:.1f} s (untimed)"
    ratio = "" if side == "flexrun score" else f"; flexrun score is {s / base:.2f}x its speed"
    print(f"{side:<36} {s:8.2f} s  {rs[0]['requests'] / s:6.3f} requests/s  tokens read {rs[0]['tokens_read']}"
          f"{extra}{ratio}")
PY
if [[ $WEIGHTS == disk ]]; then  # the same log-likelihoods on both sides, or the speeds compare nothing
  for d in $HF_DTYPES; do
    "$PYTHON" - "$SCORES/flexrun_score.jsonl" "$SCORES/hf-$d.jsonl" "$d" "${TOL:-}" "$RUNS" <<'PY'
import json, sys
fr, hf = ({r["id"]: r for r in map(json.loads, open(p))} for p in sys.argv[1:3])
dtype, tol, runs = sys.argv[3:6]
assert fr.keys() == hf.keys(), "the two sides scored different requests"
# float32: summation order only; 16-bit: the two sides round their activations at different places.
bound = (lambda lp: float(tol)) if tol else (lambda lp: 1e-3) if dtype == "float32" else (lambda lp: 0.05 + 0.02 * abs(lp))
diff = {k: abs(fr[k]["logprob"] - hf[k]["logprob"]) for k in fr}
worst = max(diff, key=diff.get)
greedy = sum(fr[k]["is_greedy"] == hf[k]["is_greedy"] for k in fr)
ok = all(diff[k] <= bound(hf[k]["logprob"]) for k in fr)
print(f"log-likelihoods, flexrun vs accelerate ({dtype}): max |difference| {diff[worst]:.2e} ({worst}: "
      f"{fr[worst]['logprob']:.4f} vs {hf[worst]['logprob']:.4f}), is_greedy equal on {greedy}/{len(fr)}: "
      + ("agree" if ok else "DISAGREE"))
with open(runs, "a") as f:  # the check beside the timings it vouches for
    f.write(json.dumps({"check": f"logprobs vs hf {dtype}", "max_abs_diff": diff[worst], "agree": ok,
                        "is_greedy_equal": greedy, "requests": len(fr)}) + "\n")
sys.exit(0 if ok else 1)
PY
  done
fi
