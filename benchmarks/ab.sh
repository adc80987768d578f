#!/usr/bin/env bash
# ab.sh REF [MODEL] [BATCH]: this checkout's flexrun against the flexrun of git ref REF, in memory, on the
# same rows, runs alternated (this, REF, REF, this, this, REF, ...) so that a noisy machine treats both alike. The
# check a refactor owes: compare.sh's in-memory row (everything in RAM, bfloat16, prompt 128, gen 32,
# BATCH sequences) for both. REF runs from a temporary `git worktree` with the same interpreter.
# Settings: REPEAT (runs each, median reported; default 3), DTYPE (bfloat16), PROMPT (128), GEN (32),
# MEM_LIMIT_INMEM (16G, the memory cgroup of every run).
source "$(dirname "$0")/lib.sh"
REF=${1:?usage: ab.sh REF [MODEL] [BATCH]}
MODEL=${2:-opt-125m}
BATCH=${3:-16}
DTYPE=${DTYPE:-bfloat16}
PROMPT=${PROMPT:-128}
GEN=${GEN:-32}
MEM_LIMIT=${MEM_LIMIT_INMEM:-16G}
SHA=$(git -C "$ROOT" rev-parse --short "$REF")
TREE=$(mktemp -d /tmp/flexrun-ab-XXXX)
trap 'git -C "$ROOT" worktree remove --force "$TREE" >/dev/null 2>&1 || rm -rf "$TREE"' EXIT
git -C "$ROOT" worktree add --detach "$TREE" "$REF" >/dev/null 2>&1
RUNS="$OUT/ab-$MODEL-$(date +%Y%m%d-%H%M%S).jsonl"

# run DIR SIDE: one in-memory bench from checkout DIR (python -m runs the flexrun in the working directory).
run() {
  (cd "$1" && limited "$PYTHON" -m flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
    --prompt-len "$PROMPT" --gen-len "$GEN" --weights host=100 --cache host=100 --activations host=100 \
    --gpu-batch-size "$BATCH" --json 2>/dev/null) |
    jq -c --arg case "in-memory b=$BATCH" --arg side "$2" '. + {case: $case, side: $side}' >>"$RUNS"
}

machine
flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
  --gpu-batch-size 1 >/dev/null 2>&1  # builds the dummy store once, outside the timed runs
for ((r = 1; r <= REPEAT; r++)); do  # who goes first alternates too
  if ((r % 2)); then run "$ROOT" flexrun && run "$TREE" "flexrun@$SHA"; else run "$TREE" "flexrun@$SHA" && run "$ROOT" flexrun; fi
done
echo "model $MODEL, $DTYPE, prompt $PROMPT, gen $GEN, batch $BATCH, in memory; this checkout ($(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ', modified')) vs $SHA; medians of $REPEAT; raw runs: $RUNS"
"$PYTHON" "$BENCH_DIR/table.py" "$RUNS" --compare
