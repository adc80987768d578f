#!/usr/bin/env bash
# prefix.sh [MODEL]: shared prefixes in generate. SEQS prompts that repeat one PREFIX-token prefix (few-shot
# examples) before a QUESTION-token question of their own (random ids, seeded), GEN new tokens each, MODEL
# (opt-125m) with DTYPE (float32) dummy weights in memory, one block of BATCH x NB sequences: flexrun generate
# with its prefix sharing (the default) and with --no-share-prefix, and Hugging Face generate on the same
# prompts beside them. A second case, "nothing shared" (every prompt random, same lengths), checks that the
# sharing costs nothing where there is nothing to share. Settings: SEQS (8), PREFIX (512), QUESTION (32), GEN (8),
# DTYPE (float32), BATCH (4), NB (2), HF (1: run the HF side; 0: skip it), REPEAT (3 runs per side, medians),
# MEM_LIMIT (4G).
REPEAT=${REPEAT:-3}
MEM_LIMIT=${MEM_LIMIT:-4G}
source "$(dirname "$0")/lib.sh"
MODEL=${1:-opt-125m}
SEQS=${SEQS:-8}
PREFIX=${PREFIX:-512}
QUESTION=${QUESTION:-32}
GEN=${GEN:-8}
DTYPE=${DTYPE:-float32}
BATCH=${BATCH:-4}
NB=${NB:-2}
HF=${HF:-1}
STAMP=$(date +%Y%m%d-%H%M%S)
RUNS="$OUT/prefix-$MODEL-$STAMP.jsonl"

# prompts CASE FILE: the case's SEQS prompts as input_ids records.
prompts() {
  "$PYTHON" - "$1" "$SEQS" "$PREFIX" "$QUESTION" >"$2" <<'PY'
import json, random, sys
case, seqs, prefix, question = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(0)
shared = [rng.randrange(4, 50000) for _ in range(prefix)]
for k in range(seqs):
    head = shared if case == "few-shot" else [rng.randrange(4, 50000) for _ in range(prefix)]
    print(json.dumps({"id": f"p{k}", "input_ids": head + [rng.randrange(4, 50000) for _ in range(question)]}))
PY
}

machine
"$PYTHON" -m flexrun generate --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual -p hi \
  --max-new-tokens 1 -o /dev/null --quiet >/dev/null 2>&1 </dev/null || true  # the dummy store, built untimed

# run_flexrun CASE SIDE FILE ARGS...: one timed flexrun generate, its --json summary with the case and side.
run_flexrun() {
  local case=$1 side=$2 file=$3 log="$RUNS.stderr"
  shift 3
  limited "$PYTHON" -m flexrun generate --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
    --weights host=100 --cache host=100 --activations host=100 --gpu-batch-size "$BATCH" --num-gpu-batches "$NB" \
    --max-new-tokens "$GEN" -i "$file" -o /dev/null --overwrite --quiet --json "$@" 2>"$log" >/dev/null </dev/null \
    || { tail -3 "$log" >&2; return 1; }
  grep '^{' "$log" | jq -c --arg case "$case" --arg side "$side" '{case: $case, side: $side, sequences,
    seconds: (.prefill_s + .decode_s), prefill_s, prefilled_tokens, input_tokens, peak_rss_bytes}' >>"$RUNS"
}
for case in few-shot "nothing shared"; do
  file="$OUT/prefix-prompts-${case// /-}-$STAMP.jsonl"
  prompts "$case" "$file"
  for ((r = 1; r <= REPEAT; r++)); do
    (cd "$ROOT" && run_flexrun "$case" "flexrun" "$file")
    (cd "$ROOT" && run_flexrun "$case" "flexrun --no-share-prefix" "$file" --no-share-prefix)
    if ((HF)); then
      (cd "$BENCH_DIR" && limited "$PYTHON" prefix_hf.py --model "$MODEL" --dtype "$DTYPE" --prompts "$file" \
        --gen-len "$GEN") | grep '^{' | jq -c --arg case "$case" '. + {case: $case}' >>"$RUNS"
    fi
  done
done
echo "model $MODEL, $DTYPE dummy weights in memory, $SEQS prompts of a $PREFIX-token prefix + $QUESTION-token question,"\
  "$GEN new tokens, one block of $BATCH x $NB; medians of $REPEAT; load average now $(cut -d' ' -f1-3 /proc/loadavg);"\
  "raw runs: $RUNS"
"$PYTHON" - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
cases: dict = {}
for r in runs:
    cases.setdefault(r["case"], {}).setdefault(r["side"], []).append(r)
for case, sides in cases.items():
    base = statistics.median(r["seconds"] for r in sides["flexrun"])
    for side, rs in sides.items():
        s = statistics.median(r["seconds"] for r in rs)
        pre = [r["prefill_s"] for r in rs if r.get("prefill_s") is not None]
        prefill = f"prefill {statistics.median(pre):7.2f} s" if pre else " " * 17
        ratio = "" if side == "flexrun" else f"; flexrun is {s / base:.2f}x its speed"
        print(f"{case:<15} {side:<26} {s:8.2f} s  {prefill}  prefilled {rs[0]['prefilled_tokens']:>6} tokens{ratio}")
PY
