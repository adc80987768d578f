#!/usr/bin/env bash
# perplexity.sh: SmolLM2-135M-Instruct's perplexity over an English text the operating system ships
# (TEXT: /usr/share/common-licenses/GPL-3), flexrun against Hugging Face on the same weights: the packaged
# Q4_1 GGUF dequantized to float32 on both sides (flexrun --dtype float32 --compress-weight none; transformers'
# GGUF loader). flexrun score reads the text as one {"id", "text"} record in rolling windows of WINDOW (1024)
# tokens; perplexity_hf.py scores the same tokens in lm-evaluation-harness's rolling windows of that size.
# Prints both perplexities and whether they are equal to 4 significant digits (the issue's bar); exits 1 if not.
# Settings: TEXT, WINDOW (1024), MEM_LIMIT (4G).
source "$(dirname "$0")/lib.sh"
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
WINDOW=${WINDOW:-1024}
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/tmp/flexrun-bench/perplexity-$STAMP
RUNS="$OUT/perplexity-$STAMP.jsonl"
mkdir -p "$WORK"
GGUF=$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1])
from flexrun.resolver.packaged import packaged_model_path
print(packaged_model_path("smollm2-135m-instruct"))' "$ROOT")
jq -Rsc --arg id "$(basename "$TEXT")" '{id: $id, text: .}' "$TEXT" >"$WORK/text.jsonl"

machine
echo "text: $TEXT ($(wc -c <"$TEXT") bytes); model: $GGUF dequantized to float32; windows of $WINDOW tokens"
flexrun score --model "$GGUF" --dtype float32 --compress-weight none --placement manual -i "$WORK/text.jsonl" \
  --window 8 -o /dev/null --quiet >/dev/null 2>&1 </dev/null || true  # converts the store once, untimed
(cd "$ROOT" && limited "$PYTHON" -m flexrun score --model "$GGUF" --dtype float32 --compute-dtype float32 \
  --compress-weight none --placement manual --window "$WINDOW" -i "$WORK/text.jsonl" -o "$WORK/flexrun.jsonl" \
  --overwrite --quiet --json 2>"$WORK/flexrun.stderr" </dev/null) || { tail -3 "$WORK/flexrun.stderr" >&2; exit 1; }
jq -c --slurpfile s <(grep '^{' "$WORK/flexrun.stderr") '{side: "flexrun score", logprob, tokens, perplexity,
  seconds: $s[0].prefill_s, tokens_read: $s[0].tokens_read}' "$WORK/flexrun.jsonl" >>"$RUNS"
limited "$PYTHON" "$BENCH_DIR/perplexity_hf.py" --gguf "$GGUF" --text "$TEXT" --window "$WINDOW" 2>/dev/null |
  grep '^{' >>"$RUNS"
echo "raw runs: $RUNS"
"$PYTHON" - "$RUNS" <<'PY'
import json, sys
fr, hf = (json.loads(line) for line in open(sys.argv[1]))
for r in (fr, hf):
    print(f"{r['side']:<14} perplexity {r['perplexity']:.6f}  over {r['tokens']} tokens  ({r['seconds']:.1f} s)")
assert fr["tokens"] == hf["tokens"], "the two sides scored different token counts"
same = f"{fr['perplexity']:.4g}" == f"{hf['perplexity']:.4g}"
rel = abs(fr["perplexity"] / hf["perplexity"] - 1)
print(f"relative difference {rel:.1e}; equal to 4 significant digits ({fr['perplexity']:.4g} vs "
      f"{hf['perplexity']:.4g}): {'yes' if same else 'NO'}")
sys.exit(0 if same else 1)
PY
