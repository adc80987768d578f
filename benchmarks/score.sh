#!/usr/bin/env bash
# score.sh [MODEL]: multiple-choice scoring, flexrun score against lm-evaluation-harness's hf backend on the
# same requests: QUESTIONS questions of 4 choices each, a CONTEXT-token context every choice shares and
# continuations of 2 to 6 tokens (random ids, seeded), MODEL (opt-1.3b) with DTYPE (bfloat16) dummy weights,
# everything in memory. flexrun computes each question's context once (prefix sharing) and runs the LM head
# only at the scored positions; it is also run with --no-share-prefixes, to show what the sharing is worth.
# Settings: QUESTIONS (4), CONTEXT (512), DTYPE (bfloat16), HF_DTYPES (the hf backend's dtypes: "bfloat16
# float32"), BATCH (4: rows per micro-batch, the hf backend's batch size), UNSHARED (1: also run flexrun
# --no-share-prefixes; 0: skip it), REPEAT (runs per side, median reported; 1), MEM_LIMIT (8G).
REPEAT=${REPEAT:-1}
MEM_LIMIT=${MEM_LIMIT:-8G}  # the hf backend's float32 OPT-1.3B alone is 5.3 GB
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-1.3b}
QUESTIONS=${QUESTIONS:-4}
CONTEXT=${CONTEXT:-512}
DTYPE=${DTYPE:-bfloat16}
HF_DTYPES=${HF_DTYPES:-bfloat16 float32}
BATCH=${BATCH:-4}
UNSHARED=${UNSHARED:-1}
STAMP=$(date +%Y%m%d-%H%M%S)
REQ="$OUT/score-requests-$STAMP.jsonl"
RUNS="$OUT/score-$MODEL-$STAMP.jsonl"

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
head -1 "$REQ" | jq -c '.context |= .[:8]' >"$REQ.warm"
flexrun score --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual -i "$REQ.warm" -o /dev/null \
  --quiet >/dev/null 2>&1 </dev/null || true  # builds the dummy store once, outside the timed runs

# flexrun SIDE ARGS...: one timed flexrun score, its --json summary with the side's name.
run_flexrun() {
  local side=$1
  shift
  local log="$RUNS.stderr"
  limited "$PYTHON" -m flexrun score --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
    --weights host=100 --activations host=100 --gpu-batch-size "$BATCH" -i "$REQ" -o /dev/null --quiet --json "$@" \
    2>"$log" >/dev/null </dev/null || { tail -3 "$log" >&2; return 1; }
  grep '^{' "$log" | jq -c --arg side "$side" '{side: $side, requests: .sequences, seconds: .prefill_s, tokens_read,
    tokens_without_sharing, compute_dtype, peak_rss_bytes}' >>"$RUNS"
}
for ((r = 1; r <= REPEAT; r++)); do
  (cd "$ROOT" && run_flexrun "flexrun score")
  if ((UNSHARED)); then (cd "$ROOT" && run_flexrun "flexrun score --no-share-prefixes" --no-share-prefixes); fi
  for d in $HF_DTYPES; do
    (cd "$BENCH_DIR" && limited "$PYTHON" score_hf.py --model "$MODEL" --dtype "$d" --requests "$REQ" \
      --batch "$BATCH") | grep '^{' >>"$RUNS"
  done
done
echo "model $MODEL, $DTYPE weights in memory, $QUESTIONS questions x 4 choices, a $CONTEXT-token shared context,"\
  "continuations of 2-6 tokens; medians of $REPEAT; raw runs: $RUNS"
"$PYTHON" - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
sides = {}
for r in runs:
    sides.setdefault(r["side"], []).append(r)
base = statistics.median(r["seconds"] for r in sides["flexrun score"])
for side, rs in sides.items():
    s = statistics.median(r["seconds"] for r in rs)
    extra = f", computed in {rs[0]['compute_dtype']}" if "compute_dtype" in rs[0] else ""
    ratio = "" if side == "flexrun score" else f"; flexrun score is {s / base:.2f}x its speed"
    print(f"{side:<36} {s:8.2f} s  {rs[0]['requests'] / s:6.3f} requests/s  tokens read {rs[0]['tokens_read']}"
          f"{extra}{ratio}")
PY
