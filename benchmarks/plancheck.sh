#!/usr/bin/env bash
# plancheck.sh [MODEL]: the planner's block against a sweep of blocks on this machine (issues 19 and 25), with
# the budget a user gets: every run inside a memory cgroup of MEM_LIMIT with no memory flags (the host budget
# is read from the cgroup), the page cache dropped before each run. The planner's own run chooses everything;
# each swept run gives the block (--gpu-batch-size, --num-gpu-batches) and lets the planner place the shares
# (and the compression) for it under the same budget. Prints one row per block, the planner's pick among them,
# its predicted and measured throughput, and how far it is from the best block measured.
# Target: the planner's pick within 10% of the sweep's best.
# Settings: MEM_LIMIT (1G), DTYPE (bfloat16), PROMPT (128), GEN (8), BLOCKS ("1x16 4x16 2x48 8x24 16x16"),
# REPEAT (1), DUMMY (1: dummy weights of MODEL's shape; 0: MODEL's own checkpoint), EXTRA (more bench options
# for every run, e.g. "--weights disk=100" to pin the placement).
MEM_LIMIT=${MEM_LIMIT:-1G} # before lib.sh, whose default is 4G
REPEAT=${REPEAT:-1}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MODEL=${1:-opt-1.3b}
DTYPE=${DTYPE:-bfloat16}
PROMPT=${PROMPT:-128}
GEN=${GEN:-8}
BLOCKS=${BLOCKS:-1x16 4x16 2x48 8x24 16x16}
DUMMY=${DUMMY:-1}
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
RUNS="$OUT/plancheck-$MODEL-$(date +%Y%m%d-%H%M%S).jsonl"
dummy=()
[[ $DUMMY == 1 ]] && dummy=(--dummy-weights)

echo "# plancheck: $MODEL $DTYPE, prompt $PROMPT, gen $GEN, each run in a $MEM_LIMIT memory cgroup (no memory flags)"
machine
flexrun bench --model "$MODEL" "${dummy[@]}" --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
  --gpu-batch-size 1 >/dev/null 2>&1 </dev/null || true # builds the store once, outside the timed runs

# one LABEL [OPTION...]: a bench run with the planner choosing what OPTIONs leave open, its JSON with the label.
one() {
  local label=$1 log="$RUNS.stderr"
  shift
  (cd "$ROOT" && limited "$PYTHON" -m flexrun bench --model "$MODEL" "${dummy[@]}" --dtype "$DTYPE" \
    --prompt-len "$PROMPT" --gen-len "$GEN" "${EXTRA_ARGS[@]}" "$@" --json 2>>"$log" </dev/null) |
    jq -c --arg name "$label" 'def shares: to_entries | map(select(.value > 0) | "\(.key)=\(.value * 1000 | round / 10)")
      | join(","); {"label": $name, block: "\(.placement.gpu_batch_size)x\(.placement.num_gpu_batches)",
      weights: (.placement.weights | shares), cache: (.placement.cache | shares),
      activations: (.placement.activations | shares),
      compress: .placement.compress_weight, total_tok_s, predicted_tok_s: .roofline.predicted_total_tok_s,
      peak_rss_bytes}' >>"$RUNS" || echo "failed: $label (stderr in $log)"
}
for ((r = 1; r <= REPEAT; r++)); do
  one planner
  for blk in $BLOCKS; do one "$blk" --gpu-batch-size "${blk%x*}" --num-gpu-batches "${blk#*x}"; done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); raw runs: $RUNS"
"$PYTHON" - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by: dict = {}
for r in runs:
    by.setdefault(r["label"], []).append(r)
rate = {k: statistics.median(r["total_tok_s"] for r in rs) for k, rs in by.items()}
print("| run | block | weights | cache | activations | compression | predicted tok/s | measured tok/s (median) |")
print("|---|---|---|---|---|---|---|---|")
for k, rs in by.items():
    r = rs[0]
    pred = r.get("predicted_tok_s")
    pred = f"{pred:.2f}" if isinstance(pred, (int, float)) else "-"
    print(f"| {k} | {r['block']} | {r['weights']} | {r['cache']} | {r['activations']} | {r['compress'] or 'none'} "
          f"| {pred} | {rate[k]:.2f} |")
if "planner" in rate and len(rate) > 1:
    best = max((k for k in rate if k != "planner"), key=rate.get)
    top = max(rate["planner"], rate[best])
    gap = 1 - rate["planner"] / top
    verdict = "within" if gap <= 0.10 else "NOT within"
    print(f"\nplanner's pick ({by['planner'][0]['block']}): {rate['planner']:.2f} tok/s; best swept block {best}: "
          f"{rate[best]:.2f} tok/s; the pick is {gap:.0%} below the best measured ({verdict} 10%)")
PY
