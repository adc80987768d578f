#!/usr/bin/env bash
# moe.sh: a mixture of experts streamed from disk reads only its routed experts. A Mixtral-shaped model scaled
# to this machine (8 experts, top-2, 14 layers, hidden 1024, about 2.7 GB in bfloat16, dummy weights) against a
# dense model of the same total size (the same layers with one SwiGLU MLP 8 times as wide): weights 100% on
# disk, host budget HOST_MEM, prompt PROMPT, gen GEN, for each block size in BLOCKS (sequences per block, one
# micro-batch). Printed per run: experts read per layer per decode step, disk bytes a decode step read
# (measured, the page cache dropped before each run), the cost model's expected bytes per step
# (E(1 - (1 - k/E)^B) experts a layer), decode seconds per step and throughput. Then the planner's choice for
# the MoE model under the same budget.
REPEAT=${REPEAT:-1}  # one run per case by default (a dense step reads the whole model from disk)
source "$(dirname "$0")/lib.sh"
DTYPE=${DTYPE:-bfloat16}
PROMPT=${PROMPT:-128}
GEN=${GEN:-32}
HOST_MEM=${HOST_MEM:-1GiB}
BLOCKS=${BLOCKS:-1 4}
CFG=/tmp/flexrun-bench/moe-configs
OFF=/tmp/flexrun-bench/offload
RUNS="$OUT/moe-$(date +%Y%m%d-%H%M%S).jsonl"
mkdir -p "$CFG" "$OFF"

"$PYTHON" - "$CFG" "$DTYPE" <<'PY'
import sys
import transformers as T
out, dtype = sys.argv[1], sys.argv[2]
shape = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=14, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096, torch_dtype=dtype)
T.MixtralConfig(**shape, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2).save_pretrained(f"{out}/moe")
T.MistralConfig(**shape, intermediate_size=8 * 3584, sliding_window=None).save_pretrained(f"{out}/dense")
PY

fr() {
  limited "$PYTHON" -m flexrun bench --model "$CFG/$1" --dummy-weights --dtype "$DTYPE" --placement manual \
    --weights disk=100 --cache host=100 --activations host=100 --gpu-batch-size "$2" --num-gpu-batches 1 \
    --host-mem "$HOST_MEM" --prompt-len "$PROMPT" --gen-len "$GEN" --offload-dir "$OFF" --json 2>/dev/null
}

machine
for model in moe dense; do  # each store written once, outside the timed runs
  flexrun bench --model "$CFG/$model" --dummy-weights --dtype "$DTYPE" --placement manual --weights disk=100 \
    --prompt-len 4 --gen-len 2 --gpu-batch-size 1 >/dev/null 2>&1
done
cd "$ROOT"
for ((r = 1; r <= REPEAT; r++)); do
  for b in $BLOCKS; do
    for model in moe dense; do
      fr "$model" "$b" | tail -n 1 | jq -c --arg m "$model" --argjson b "$b" '. + {side: $m, block: $b}' >>"$RUNS"
    done
  done
done
echo "prompt $PROMPT, gen $GEN, $DTYPE, weights 100% on disk, host budget $HOST_MEM; medians of $REPEAT; raw runs: $RUNS"
"$PYTHON" - "$RUNS" "$CFG" <<'PY'
import json, statistics, sys
from flexrun.layout import active_layer_bytes
from flexrun.resolver import resolve
runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'model':<6} {'block':>5} {'experts/layer/step':>18} {'GB read/step':>12} {'expected GB':>11} "
      f"{'s/step':>7} {'decode tok/s':>12} {'total tok/s':>11}")
for key in sorted({(r["side"], r["block"]) for r in runs}, key=lambda k: (k[1], k[0] != "moe")):
    rs = [r for r in runs if (r["side"], r["block"]) == key]
    med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
    cfg = resolve(f"{sys.argv[2]}/{key[0]}", dtype=rs[0]["dtype"])
    glob = cfg.model_bytes() - cfg.num_hidden_layers * cfg.layer_bytes()
    expected = glob + cfg.num_hidden_layers * active_layer_bytes(cfg, key[1])  # the stack once per step
    experts = f"{med(lambda r: r['experts_read_per_layer_step']):.2f} of {cfg.num_experts}" if cfg.moe else "-"
    step = med(lambda r: r["decode_bytes_read"] / max(r["decode_steps"], 1))
    print(f"{key[0]:<6} {key[1]:>5} {experts:>18} {step / 1e9:>12.2f} {expected / 1e9:>11.2f} "
          f"{med(lambda r: r['decode_s'] / max(r['decode_steps'], 1)):>7.2f} {med(lambda r: r['decode_tok_s']):>12.2f} "
          f"{med(lambda r: r['total_tok_s']):>11.2f}")
PY
echo "the planner for the MoE model under the same budget:"
flexrun plan -m "$CFG/moe" --dtype "$DTYPE" --prompt-len "$PROMPT" --gen-len "$GEN" --host-mem "$HOST_MEM" 2>/dev/null |
  grep -E '^(block|tier|host|disk|predicted|bottleneck):?' || true
