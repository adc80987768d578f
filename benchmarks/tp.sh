#!/usr/bin/env bash
# tp.sh: tensor parallelism on this machine. OPT-1.3B (dummy weights, DTYPE bfloat16) with --tp 1 and --tp 2
# (two local ranks, gloo over loopback, the cores divided between them), in memory and with the weights on disk
# (read in place with O_DIRECT, each rank its own shard), prompt PROMPT, gen GEN, BATCH sequences in one block.
# Printed per run: throughput, decode throughput and the share of the run the ranks spent in their collectives
# (all-reduces and the head's all-gathers, waits for the other rank included); then --tp 2 over --tp 1 per
# placement (the target on a 2-core machine: >= 0.9x), and against --tp 1 on one thread (OMP_NUM_THREADS=1: on a
# loaded machine two threads in one process can thrash, which flatters --tp 2's ranks of one thread each). A --tp 2 run slices the store into one store per rank in
# its offload dir before it starts (not timed). Last, the cost model's plan for 1, 2, 4 and 8 machines (each with
# this machine's figures and its own disk, NET bytes/s between them): predicted throughput and all-reduce share.
source "$(dirname "$0")/lib.sh"
MODEL=${MODEL:-facebook/opt-1.3b}
DTYPE=${DTYPE:-bfloat16}
PROMPT=${PROMPT:-64}
GEN=${GEN:-16}
BATCH=${BATCH:-4}
NET=${NET:-1.25GB}  # 10 Gb/s Ethernet
MEM_LIMIT=${MEM_LIMIT:-8G}
OFF=/tmp/flexrun-bench/offload
RUNS="$OUT/tp-$(date +%Y%m%d-%H%M%S).jsonl"
mkdir -p "$OFF"

run() {  # run TP WEIGHTS; TP "1t" is --tp 1 on one thread
  local tp=${1%t} threads=()
  [[ $1 == *t ]] && threads=(env OMP_NUM_THREADS=1)
  limited "${threads[@]}" "$PYTHON" -m flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual \
    --weights "$2" --cache host=100 --activations host=100 --gpu-batch-size "$BATCH" --num-gpu-batches 1 \
    --prompt-len "$PROMPT" --gen-len "$GEN" --offload-dir "$OFF" --tp "$tp" --json 2>/dev/null |
    jq -c --arg tp "$1" --arg w "$2" '. + {tp: $tp, weights: $w}' >>"$RUNS"
}

machine
echo "page cache control: $(page_cache_control)"
flexrun bench --model "$MODEL" --dummy-weights --dtype "$DTYPE" --placement manual --prompt-len 8 --gen-len 2 \
  --gpu-batch-size 1 >/dev/null 2>&1  # the dummy store, written once outside the timed runs
for ((r = 1; r <= REPEAT; r++)); do
  for w in host=100 disk=100; do
    if ((r % 2)); then run 1 "$w" && run 2 "$w" && run 1t "$w"; else run 1t "$w" && run 2 "$w" && run 1 "$w"; fi
  done
done
echo "model $MODEL, $DTYPE, prompt $PROMPT, gen $GEN, batch $BATCH; medians of $REPEAT; raw runs: $RUNS"
"$PYTHON" - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
med = {}
for w in ("host=100", "disk=100"):
    for tp in ("1", "1t", "2"):
        rs = [r for r in runs if r["weights"] == w and str(r["tp"]) == tp]
        if not rs:
            continue
        tok, dec = statistics.median(r["total_tok_s"] for r in rs), statistics.median(r["decode_tok_s"] for r in rs)
        share = statistics.median(r.get("collective_share", 0.0) for r in rs)
        med[w, tp] = tok
        label = "--tp 1, 1 thread" if tp == "1t" else f"--tp {tp}"
        print(f"weights {w:9} {label:16}: {tok:7.2f} tok/s (decode {dec:6.2f} tok/s), collectives {share:5.1%} of the run")
    for base in ("1", "1t"):
        if (w, base) in med and (w, "2") in med:
            label = "--tp 1, 1 thread" if base == "1t" else "--tp 1"
            print(f"weights {w:9} --tp 2 / {label}: {med[w, '2'] / med[w, base]:.2f}x")
PY
echo "cost model, $MODEL $DTYPE, one machine per rank with this machine's figures, $NET/s between them:"
for n in 1 2 4 8; do
  flexrun plan --model "$MODEL" --dtype "$DTYPE" --prompt-len "$PROMPT" --gen-len "$GEN" --tp "$n" \
    --interconnect-bw "$NET" --json 2>/dev/null |
    jq -r --arg n "$n" '"  \($n) machine(s): predicted \(.prediction.throughput_tok_s * 100 | round / 100) tok/s, batch \(.placement.gpu_batch_size) x \(.placement.num_gpu_batches), all-reduces \((.tensor_parallel.share // 0) * 1000 | round / 10)% of a decode step"'
done
