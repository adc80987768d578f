"""Model configs: a frozen ``OptConfig``, its validation and its byte formulas.

The tensor shapes the runtime holds are listed once, in ``OptConfig.layer_shapes()`` and
``OptConfig.global_shapes()``; the byte counts, dummy weights and the tensor store all follow from them.
Which config a model name, checkpoint or store has is ``flexrun.resolver``'s job; this module imports
nothing of flexrun but its errors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flexrun.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
POSITIONS = ("learned", "rotary", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
# Scaled rotary embeddings, by transformers' rope_type: computed by transformers' own functions
# (``kernels.positions.Rope``); "dynamic" and "longrope" depend on the sequence's length.
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
# A weight stored in another dtype than the activations is converted this many bytes (in the compute
# dtype) at a time inside each matmul (``kernels.cpu.linear``): small enough to stay in the CPU's cache
# between the conversion and the matmul, big enough for an efficient matmul. Counted in working memory.
UPCAST_CHUNK_BYTES = 4 << 20
# Upper bounds on a config's sizes, each far beyond any real model (the largest have ~128 layers, hidden
# sizes ~2^14, vocabularies ~2^18): a config.json past them is damaged, and is refused before anything is
# sized from it (a 10^12-token vocabulary, 10^9 layers) rather than left to exhaust memory or disk.
MAX_SIZES = {
    "num_hidden_layers": 1 << 16,
    "hidden_size": 1 << 20,
    "n_head": 1 << 16,
    "ffn_embed_dim": 1 << 22,
    "vocab_size": 1 << 26,
    "max_seq_len": 1 << 30,
    "word_embed_proj_dim": 1 << 20,
    "n_kv_head": 1 << 16,
    "type_vocab_size": 1 << 16,
    "num_experts": 1 << 12,
    "shared_expert_dim": 1 << 22,
}
MAX_MODEL_BYTES = 1 << 50  # 1 PiB of weights

Shape = tuple[int, ...]


@dataclass(frozen=True)
class OptConfig:
    """Dimensions and flags of a decoder model, named after FlexGen's ``OptConfig``.

    OPT is the reference family; the extra fields (``n_kv_head``, ``gated_mlp``, ``position``...) let the
    same formulas describe the other architectures a policy maps onto the fused layer.
    """

    name: str
    num_hidden_layers: int
    hidden_size: int
    n_head: int
    ffn_embed_dim: int
    vocab_size: int = 50272
    max_seq_len: int = 2048
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    # Every id that ends a sequence when config.json lists several (Llama 3.1: end_of_text, eom, eot), the
    # first of them being eos_token_id; empty means eos_token_id alone.
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float16"
    # The dtype activations are computed in when it differs from the stored weights' dtype ("" = the same):
    # a CPU without bf16/fp16 matmul hardware computes a 16-bit model in float32 (``precision.py``).
    compute_dtype: str = ""
    do_layer_norm_before: bool = True
    # OPT-350m embeds tokens in 512 dims and projects in/out of the 1024-dim stack; 0 means hidden_size.
    word_embed_proj_dim: int = 0
    activation: str = "relu"
    enable_bias: bool = True
    # HF drops the final layer norm of post-LN OPT (350m) and of a few old fine-tunes.
    final_layer_norm: bool = True
    tie_word_embeddings: bool = True
    arch: str = "opt"
    # Grouped-query attention: key/value heads (0 means n_head).
    n_kv_head: int = 0
    # SwiGLU-style MLP with a gate projection (LLaMA); OPT has a plain two-matrix MLP.
    gated_mlp: bool = False
    # "learned" (OPT's table, read at position + position_offset), "rotary", "alibi" or "none".
    position: str = "learned"
    position_offset: int = 2
    # "layernorm" or "rmsnorm"; layer norms carry a bias when norm_bias is set.
    norm: str = "layernorm"
    norm_bias: bool = True
    layer_norm_eps: float = 1e-5
    # Biases by projection: ``enable_bias`` covers the MLP; the attention's QKV and output projections
    # follow it unless set (None), as in OPT (GPT-J and LLaMA have none, GPT-Neo only on the output).
    qkv_bias: bool | None = None
    attn_out_bias: bool | None = None
    # Attention scores scaled by 1/sqrt(head_dim) (GPT-Neo does not scale), and additionally by
    # 1/(layer index + 1) in GPT-2 models trained with scale_attn_by_inverse_layer_idx.
    attn_scale: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # Rotary embeddings (position == "rotary") on the first rotary_dim dims of each head (0 means all),
    # rotating interleaved pairs (GPT-J) or the two halves (GPT-NeoX, LLaMA), with base rope_theta.
    rotary_dim: int = 0
    rotary_interleaved: bool = False
    rope_theta: float = 10000.0
    # Rope scaling: transformers' rope parameters other than rope_theta and partial_rotary_factor (rope_type,
    # factor, original_max_position_embeddings, ...) as sorted (key, value) pairs, lists as tuples, so the
    # config stays hashable; a dict is accepted (config.json, the store's index). Empty: the plain rotation.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    # Per-layer attention window: "global" or "local" per layer (cycled; empty = all global) and the
    # local window in tokens (GPT-Neo).
    attention_layers: tuple[str, ...] = ()
    window_size: int = 0
    # Attention and MLP in parallel from the same input (GPT-J, GPT-NeoX use_parallel_residual); with
    # shared_norm one layer norm feeds both (GPT-J), else ln2 feeds the MLP (GPT-NeoX).
    parallel_attn: bool = False
    shared_norm: bool = False
    # A layer norm on the input embeddings (slots embed_ln_w / embed_ln_b): BLOOM's
    # word_embeddings_layernorm, BERT's embeddings.LayerNorm (over the sum with positions and token types).
    embed_norm: bool = False
    # A bias on the LM head (GPT-J).
    lm_head_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Encoders (BERT, RoBERTa): bidirectional attention, no KV cache and no LM head; `flexrun embed` runs them.
    encoder: bool = False
    # Token-type (segment) embeddings added to the input; 0 means none.
    type_vocab_size: int = 0
    # BERT's pooler: tanh(dense(first token's hidden state)) (slots pooler_w / pooler_b).
    pooler: bool = False
    # RoBERTa: a token's position counts only the non-pad tokens up to it (pads sit at position -1).
    positions_skip_pad: bool = False
    # Mixture of experts (0: a dense MLP): ``num_experts`` SwiGLU experts of width ffn_embed_dim per layer, a
    # token routed to the top ``experts_per_token`` of a softmax (renormalised when ``norm_topk_prob``); Qwen2-MoE's
    # shared expert of width ``shared_expert_dim`` is gated per token by sigmoid(shared_gate_w).
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    shared_expert_dim: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "n_head",
            "ffn_embed_dim",
            "vocab_size",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "word_embed_proj_dim",
            "n_kv_head",
            "rotary_dim",
            "window_size",
            "position_offset",
            "type_vocab_size",
            "num_experts",
            "experts_per_token",
            "shared_expert_dim",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name, top in MAX_SIZES.items():
            if getattr(self, name) > top:
                raise ConfigError(
                    f"{name} {getattr(self, name)} is past any real model's (at most {top}); is config.json damaged?"
                )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not _is_int(getattr(self, name)):  # any integer: an id outside the vocabulary is never produced
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))  # a list after a JSON round trip
        if not all(_is_int(t) for t in self.eos_token_ids):
            raise ConfigError(f"eos_token_ids must be integers, got {list(self.eos_token_ids)!r}")
        for name in ("layer_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.compute_dtype and self.compute_dtype not in DTYPE_BYTES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.compute_dtype!r}")
        if self.hidden_size % self.n_head:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.n_kv_head == 0:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        for name in ("qkv_bias", "attn_out_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.enable_bias)
        if self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.position == "rotary":
            if self.rotary_dim == 0:
                object.__setattr__(self, "rotary_dim", self.head_dim)
            if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
                raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        # JSON round trips turn tuples into lists; keep the config hashable.
        object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        bad = sorted(set(self.attention_layers) - {"global", "local"})
        if bad:
            raise ConfigError(f"attention_layers entries must be 'global' or 'local', got {', '.join(bad)}")
        if "local" in self.attention_layers and self.window_size <= 0:
            raise ConfigError("local attention layers need a positive window_size")
        if self.shared_norm and not self.parallel_attn:
            raise ConfigError("shared_norm (one layer norm for attention and MLP) needs parallel_attn")
        if self.position == "rotary" and self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.moe and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"experts_per_token must be in 1..num_experts {self.num_experts}, not {self.experts_per_token}"
            )
        if self.moe and (not self.gated_mlp or self.enable_bias or self.parallel_attn or not self.do_layer_norm_before):
            raise ConfigError("mixture-of-experts layers need a pre-norm, sequential, bias-free SwiGLU MLP")
        object.__setattr__(self, "rope_scaling", _rope_pairs(self.rope_scaling))
        if self.rope_scaling:
            if self.position != "rotary":
                raise ConfigError("rope_scaling needs rotary positions")
            if self.rope_type not in ROPE_TYPES:
                raise ConfigError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        if self.model_bytes() > MAX_MODEL_BYTES:
            raise ConfigError(
                f"the config describes {self.model_bytes() / 2**50:.0f} PiB of weights (hidden_size "
                f"{self.hidden_size}, {self.num_hidden_layers} layers, ffn_embed_dim {self.ffn_embed_dim}, "
                f"vocab_size {self.vocab_size}); is config.json damaged?"
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: key/value heads x head dim."""
        return self.n_kv_head * self.head_dim

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """The ids that end a sequence: eos_token_id and any others config.json lists."""
        return frozenset((self.eos_token_id, *self.eos_token_ids))

    @property
    def fill_token_id(self) -> int:
        """The id padding feeds the embedding: the pad id when the vocabulary holds it, else 0.

        Padding is never attended to, so any id the table holds gives the same results; config.json's special
        ids may lie outside a small vocabulary (GPT-J's default 50256 in a fine-tune with fewer tokens)."""
        return self.pad_token_id if 0 <= self.pad_token_id < self.vocab_size else 0

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the stored weights and of the KV cache."""
        return DTYPE_BYTES[self.dtype]

    @property
    def run_dtype(self) -> str:
        """The dtype hidden states and intermediates are computed in."""
        return self.compute_dtype or self.dtype

    @property
    def run_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.run_dtype]

    @property
    def rope_type(self) -> str:
        """transformers' rope_type: "default" (the plain rotation) or one of ``ROPE_TYPES``."""
        return str(dict(self.rope_scaling).get("rope_type", "default"))

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """``rope_scaling`` as transformers spells it: a dict, lists where the config has tuples."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_scaling}

    # ---- per-layer flags -----------------------------------------------------------------------
    def attention_window(self, layer: int) -> int:
        """Layer ``layer``'s local attention window in tokens, 0 for global attention."""
        if not self.attention_layers:
            return 0
        kind = self.attention_layers[layer % len(self.attention_layers)]
        return self.window_size if kind == "local" else 0

    def attention_scale(self, layer: int) -> float:
        """The factor layer ``layer`` multiplies its attention scores by."""
        scale = self.head_dim**-0.5 if self.attn_scale else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    def layer_shapes(self) -> dict[str, Shape]:
        """Shapes of one fused decoder layer's tensors, by slot name (Linear weights are [out, in]); a
        mixture-of-experts layer has a router, its experts (last) and an optional shared expert in the
        gate/fc1/fc2 slots, gated by ``shared_gate_w``."""
        h, f, bias = self.hidden_size, self.ffn_embed_dim, self.enable_bias
        qkv = self.hidden_size + 2 * self.kv_dim
        shapes: dict[str, Shape] = {"ln1_w": (h,)}
        if self.norm_bias:
            shapes["ln1_b"] = (h,)
        shapes["qkv_w"] = (qkv, h)
        if self.qkv_bias:
            shapes["qkv_b"] = (qkv,)
        shapes["out_w"] = (h, h)
        if self.attn_out_bias:
            shapes["out_b"] = (h,)
        if not self.shared_norm:
            shapes["ln2_w"] = (h,)
            if self.norm_bias:
                shapes["ln2_b"] = (h,)
        if self.moe:
            shapes["router_w"] = (self.num_experts, h)
            if self.shared_expert_dim:
                s = self.shared_expert_dim
                shapes.update(gate_w=(s, h), fc1_w=(s, h), fc2_w=(h, s), shared_gate_w=(1, h))
            for e in range(self.num_experts):  # last: the layout makes each expert a group of its own
                shapes.update({f"expert{e}_gate_w": (f, h), f"expert{e}_fc1_w": (f, h), f"expert{e}_fc2_w": (h, f)})
            return shapes
        if self.gated_mlp:
            shapes["gate_w"] = (f, h)
            if bias:
                shapes["gate_b"] = (f,)
        shapes["fc1_w"] = (f, h)
        if bias:
            shapes["fc1_b"] = (f,)
        shapes["fc2_w"] = (h, f)
        if bias:
            shapes["fc2_b"] = (h,)
        return shapes

    def global_shapes(self) -> dict[str, Shape]:
        """Shapes of the tensors outside the layer stack: embeddings, projections, final norm, LM head."""
        h, p = self.hidden_size, self.word_embed_proj_dim
        shapes: dict[str, Shape] = {"embed_tokens": (self.vocab_size, p)}
        if self.embed_norm:
            shapes["embed_ln_w"] = (p,)
            if self.norm_bias:
                shapes["embed_ln_b"] = (p,)
        if self.position == "learned":
            shapes["embed_positions"] = (self.max_seq_len + self.position_offset, h)
        if p != h:
            shapes["project_in"] = (h, p)
            shapes["project_out"] = (p, h)
        if self.final_layer_norm:
            shapes["final_ln_w"] = (h,)
            if self.norm_bias:
                shapes["final_ln_b"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, p)
        if self.lm_head_bias:
            shapes["lm_head_b"] = (self.vocab_size,)
        if self.type_vocab_size:
            shapes["embed_token_types"] = (self.type_vocab_size, h)
        if self.pooler:
            shapes["pooler_w"] = (h, h)
            shapes["pooler_b"] = (h,)
        return shapes

    def layer_bytes(self) -> int:
        """Bytes of one decoder layer's weights."""
        return sum(math.prod(s) for s in self.layer_shapes().values()) * self.dtype_bytes

    def model_bytes(self) -> int:
        """Bytes of all weights: layers, embeddings, norms, biases (a tied LM head counted once)."""
        glob = sum(math.prod(s) for s in self.global_shapes().values()) * self.dtype_bytes
        return self.num_hidden_layers * self.layer_bytes() + glob

    def cache_bytes(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the KV cache: K and V for every layer and token."""
        return 2 * self.num_hidden_layers * batch_size * seq_len * self.kv_dim * self.dtype_bytes

    def hidden_bytes(self, batch_size: int, seq_len: int) -> int:
        """Bytes of the hidden state (the activations passed from layer to layer)."""
        return batch_size * seq_len * self.hidden_size * self.run_dtype_bytes

    def working_bytes(self, batch_size: int, seq_len: int, cpu: bool) -> int:
        """Intermediates of one micro-batch's prefill (the largest step) on the compute device: what the
        engine reserves and the planner counts. ``cpu``: the compute device is a CPU."""
        b, s, h = batch_size, seq_len, self.hidden_size
        ffn_buffers = 3 if self.gated_mlp else 2  # up (and gate), activated
        act = b * s * (6 * self.hidden_size + ffn_buffers * self.ffn_embed_dim) * self.run_dtype_bytes
        scores = b * self.n_head * s * s * 4  # (b, nh, s, s) in float32
        if self.position == "alibi":  # the per-head bias is added to the mask: one more scores-sized tensor
            scores *= 2
        logits = 0 if self.encoder else 2 * b * self.vocab_size * 4  # (b, vocab) float32, twice for sampling
        upcast = 0
        if self.run_dtype != self.dtype:  # one weight chunk in the compute dtype and its output rows
            upcast = UPCAST_CHUNK_BYTES + b * s * UPCAST_CHUNK_BYTES // min(self.hidden_size, self.word_embed_proj_dim)
        # On a CPU, attention over a 16-bit cache (or in a 16-bit compute dtype) runs on float32 copies of
        # the micro-batch's K and V, kept as scratch buffers (kernels.cpu.cached_attention).
        sixteen_bit = min(self.dtype_bytes, self.run_dtype_bytes) < 4
        attn_scratch = 2 * b * s * self.kv_dim * 4 if cpu and sixteen_bit else 0
        # MoE: router logits and probabilities (float32), the experts' summed output, the shared expert.
        moe = b * s * (8 * self.num_experts + (h + 3 * self.shared_expert_dim) * self.run_dtype_bytes) * self.moe
        return act + scores + logits + upcast + attn_scratch + moe

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Left out when unset: stored indexes (and the store keys hashed from them) read as before.
        for key in ("extra", "compute_dtype", "eos_token_ids", "rope_scaling"):
            if not d[key]:
                d.pop(key)
        if not self.moe:
            for key in ("num_experts", "experts_per_token", "norm_topk_prob", "shared_expert_dim"):
                d.pop(key)
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_parameters
        return d


def _rope_pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    """Rope parameters (a dict, or (key, value) pairs after a JSON round trip) as sorted, hashable pairs."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"rope_scaling must be a mapping of rope parameters, got {value!r}") from None
    out = []
    for key, v in pairs:
        if not isinstance(key, str):
            raise ConfigError(f"rope_scaling keys must be strings, got {key!r}")
        v = tuple(v) if isinstance(v, list | tuple) else v
        for x in v if isinstance(v, tuple) else (v,):
            if not (isinstance(x, str | bool) or (isinstance(x, int | float) and math.isfinite(x))):
                raise ConfigError(f"rope_scaling {key!r} must be a finite number, a flag or a name, got {v!r}")
        out.append((key, v))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON's true is no size)."""
    return isinstance(value, int) and not isinstance(value, bool)
