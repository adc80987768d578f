"""What every side of gpu.sh runs on, written once before the runs, without downloads:

- ``DIR/MODEL/config.json``: the OPT's Hugging Face config (flexrun's resolver's dims). flexrun reads it as a
  checkpoint directory with ``--dummy-weights``, accelerate builds its model from it, and flexgen_run.py
  gives flexgen the same dims. ``--layers N`` keeps N of the model's decoder layers (``opt-30b-12of48``):
  every other dimension, the policy and the batch stay the model's.
- ``DIR/tokenizer``: a stand-in for ``facebook/opt-30b``'s tokenizer, which flexgen loads from the hub to
  pad its prompt: a byte-level BPE trained here with the ``tokenizers`` library on a few sentences, with
  OPT's special tokens and ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3), saved as a Hugging Face
  tokenizer (tokenizer.json + tokenizer_config.json). Only the prompt's ids change, not the work: flexgen
  pads every prompt to --prompt-len and attends over all of it.

`python models.py DIR MODEL [--layers N] [--device-mem GIB]` writes both and prints one line: the model
directory's name, its layers, the model's full depth and two GPU memory caps in bytes, for the fp16
policy's runs (also flexrun's own plan's and accelerate's) and for the comp policy's: --device-mem GiB for a whole
model; for a truncated one, that less what the published policy keeps on the GPU for the layers left out
(its weight share of each: 20% for OPT-30B's fp16 policy, none for its comp policy), so the remaining
layers see the headroom the whole model has.

`python models.py --store-root STORES --compress none|int4|int8 DIR/MODEL` writes flexrun's dummy store of
that model directory, compressed so, where `flexrun bench --dummy-weights --store-dir STORES` looks for it
(``flexrun.resolver.ensure_store``, what bench itself calls): gpu.sh builds the stores before the timed runs,
several at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import OPTConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ (hf_common)
from hf_common import hf_config  # noqa: E402
from policies import base_name, policy  # noqa: E402

GIB = 2**30
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
CORPUS = [
    "Paris is the capital city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Offloading moves weights, cache and activations between GPU, CPU and disk.",
    "A batch of prompts is generated one token at a time.",
]


def layer_bytes(cfg: OPTConfig, bytes_per_value: int = 2) -> int:
    """One decoder layer's weights (attention, MLP, two layer norms)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    return bytes_per_value * (4 * h * h + 4 * h + 2 * h * f + h + f + 4 * h)


def write_config(out: Path, model: str, layers: int | None) -> tuple[str, OPTConfig, int]:
    """The config directory for ``model`` with ``layers`` of its decoder layers; (name, config, full depth)."""
    cfg = hf_config(model, "float16")
    full = cfg.num_hidden_layers
    if layers is not None and not 1 <= layers <= full:
        raise SystemExit(f"--layers must be within 1..{full} for {model}, got {layers}")
    name = model if layers in (None, full) else f"{model}-{layers}of{full}"
    cfg.num_hidden_layers = layers or full
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(d)
    return name, cfg, full


def write_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """The stand-in tokenizer (see the module's doc), saved into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # it would print on stdout, where gpu.sh reads this script's answer
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return fast


def device_cap(cfg: OPTConfig, model: str, full_layers: int, device_mem_gib: float, name: str = "fp16") -> int:
    """The GPU memory cap in bytes for the runs of published policy ``name`` (see the module's doc); the
    fp16 policy's is also the cap of flexrun's own plan and of accelerate."""
    cap = int(device_mem_gib * GIB)
    dropped = full_layers - cfg.num_hidden_layers
    if dropped:
        gpu_share = policy(model, name).percent[0] / 100
        cap -= int(dropped * gpu_share * layer_bytes(cfg))
    return cap


def build_store(model_dir: Path, store_root: Path, compress: str) -> None:
    """flexrun's dummy store for ``model_dir`` in ``store_root`` (int4/int8 at flexrun's default groups)."""
    from flexrun.quant.formats import QuantSpec
    from flexrun.resolver import ensure_store

    spec = {"none": None, "int4": QuantSpec("int4", 64), "int8": QuantSpec("int8", 0)}[compress]
    store = ensure_store(str(model_dir), dtype="float16", dummy=True, store_root=store_root, progress=False,
                         compress=spec)  # fmt: skip
    print(f"store {store.path} ({compress}, {store.total_bytes() / GIB:.1f} GiB)")


def main() -> None:
    if "--store-root" in sys.argv:
        sp = argparse.ArgumentParser()
        sp.add_argument("--store-root", type=Path, required=True)
        sp.add_argument("--compress", choices=["none", "int4", "int8"], default="none")
        sp.add_argument("model_dir", type=Path)
        s = sp.parse_args()
        build_store(s.model_dir, s.store_root, s.compress)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("model", help="a model name flexrun resolves (opt-6.7b, opt-30b) or a tiny test shape: tiny")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--device-mem", type=float, default=16.0, help="GiB, for the whole model")
    a = ap.parse_args()
    if a.model == "tiny":  # GPU_SH_SMALL: OPT's layout at a few MB, for the CPU dry run
        cfg = OPTConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=a.layers or 2, ffn_dim=256, num_attention_heads=4,
            max_position_embeddings=2048, word_embed_proj_dim=64, torch_dtype="float16",
        )  # fmt: skip
        name, full = "tiny", cfg.num_hidden_layers
        (a.dir / name).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(a.dir / name)
        caps = [int(a.device_mem * GIB)] * 2
    else:
        name, cfg, full = write_config(a.dir, a.model, a.layers)
        caps = [device_cap(cfg, base_name(name), full, a.device_mem, p) for p in ("fp16", "comp")]
    tok_dir = a.dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        write_tokenizer(tok_dir)
    print(name, cfg.num_hidden_layers, full, *caps)


if __name__ == "__main__":
    main()
