"""The cost model: predicted time and memory of a placement, as pure functions (no torch, no runtime).

Everything is per decoder layer, for one block of ``gpu_batch_size x num_gpu_batches`` sequences, in the
order the block schedule runs it: a layer's weights are loaded once per block and reused by every
micro-batch; each micro-batch loads its KV cache, computes, and stores its new cache and activations.
With I/O overlapped, a layer takes the longest of

- the read path:  disk->host + host->device transfers (data on disk goes through host memory),
- the write path: device->host + host->disk transfers,
- compute: the device's matmuls and attention, plus host-side attention (``cpu_cache_compute``), which
  runs between the same micro-batch's device work and so adds to it,

and without overlap their sum. A generation is one prefill step (the prompt) and ``gen_len - 1`` decode
steps at the mean context ``prompt_len + gen_len / 2``, as in FlexGen's cost model.

Every time and memory figure is an affine function of the nine shares (weights / cache / activations on
device / host / disk), kept as an ``Affine``: ``predict`` evaluates them at a placement's shares and the
LP in ``search`` uses the very same coefficients, so the planner and the prediction cannot disagree.

Simplifications, each small for the large models this is for: the embeddings and LM head are spread
evenly over the layers (bytes and FLOPs); (de)quantization is ``QUANT_PASSES`` passes over the fp16 data
at the device's memory bandwidth (weights once per block, the cache at every step), except for compressed
weights on a CPU whose spec has ``quant_rates``, priced as the CPU kernels run them (``_compressed_matmul``:
torch's fused ops at decode shapes, an int4 weight read from disk repacked for them first, a dequantization
into the compute dtype for a prefill's many rows); int8 weights are taken to be per row; padding to the disk alignment
is ignored; memory is what the runtime allocates up front (the whole KV cache of ``prompt + gen`` tokens,
activations of one layer boundary, double-buffered weight arenas, one micro-batch's intermediates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from flexrun import diskio
from flexrun.config import OptConfig
from flexrun.costmodel.affine import Affine, Key
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.hotset import LARGEST, WHOLE, hot_terms
from flexrun.layout import active_layer_bytes, expected_experts, expert_bytes, kv_stage_depth, stack_layout
from flexrun.placement import TIERS

KINDS = ("weights", "cache", "activations")
SHARE_KEYS: tuple[Key, ...] = tuple((kind, tier) for kind in KINDS for tier in TIERS)

# FlexGen's group-wise quantization: 4 bits per value, groups of 64 along one dimension, each group with
# an fp16 scale and min. Bytes per value: 4/8 + 2 * 2 / 64 = 0.5625, i.e. 0.28x of fp16.
QUANT_BITS = 4
QUANT_GROUP = 64
QUANT_META_BYTES = 2 * 2  # scale and min, fp16
# Group-wise (de)quantization in torch is a handful of elementwise passes (unpack, scale, shift, cast) over
# the full-precision tensor, each bound by memory bandwidth: a layer's weights are dequantized once per
# block, the cache read by attention at every decode step and the prompt's new cache quantized once.
QUANT_PASSES = 4
# Rows of x up to which the CPU runs a resident compressed weight through torch's fused op, and above which
# it dequantizes the weight chunk by chunk (``kernels.quantized.FUSED_MAX_ROWS``: the cost model imports no
# torch, so the figure is repeated here and a test keeps the two equal).
FUSED_MAX_ROWS = 64
# Tensor parallelism without a measured interconnect (``HardwareSpec.interconnect_bw`` 0): gloo between local
# CPU ranks over loopback TCP, about what a 2-core machine under load gives (benchmarks/tp.sh prints its own).
LOOPBACK_BW = 1e9  # bytes/s
LOOPBACK_LATENCY = 100e-6  # seconds per all-reduce


def compressed_fraction(dtype_bytes: int, kind: str = "int4") -> float:
    """Bytes of a compressed tensor over its bytes in a ``dtype_bytes`` dtype: group-wise int4 with a
    16-bit scale and min per group of 64 (0.28125 of fp16), or int8 (one byte a value; its per-row scale
    is negligible)."""
    if kind == "int8":
        return 1 / dtype_bytes
    return (QUANT_BITS / 8 + QUANT_META_BYTES / QUANT_GROUP) / dtype_bytes


def compression(flag: bool | str) -> str:
    """A compression option as its kind: "" (off), "int8" or "int4" (True, FlexGen's flag, is int4)."""
    return "int4" if flag is True else flag or ""


@dataclass(frozen=True)
class PhaseTerms:
    """Seconds per layer (whole block) of one phase: each link's transfers and the compute."""

    links: Mapping[str, Affine]  # "disk->host", "host->disk", "host->device", "device->host"
    compute: Affine  # device matmuls + attention
    host_compute: Affine  # host-side attention over a host/disk cache (cpu_cache_compute)

    def paths(self) -> dict[str, Affine]:
        return {
            "read": self.links["disk->host"] + self.links["host->device"],
            "write": self.links["device->host"] + self.links["host->disk"],
            "compute": self.compute + self.host_compute,
        }


@dataclass(frozen=True)
class CostTerms:
    """The affine cost model of one (model, machine, batch shape, options, lengths)."""

    prefill: PhaseTerms
    decode: PhaseTerms
    memory: Mapping[str, Affine]  # bytes held on each tier
    disk_weights: Affine  # weight bytes read in place from the tensor store (no offload-dir space)
    num_layers: int
    decode_steps: int
    gpu_batch_size: int
    num_gpu_batches: int
    prompt_len: int
    gen_len: int
    compress_weight: str  # "", "int8" or "int4"
    compress_cache: str
    cpu_cache_compute: bool
    device_is_host: bool
    # Breakpoints of the derived shares (``costmodel.hotset``) and the weight bytes a decode step reads from disk.
    derived: Mapping[Key, float] = field(default_factory=dict)
    step_reads: Affine = field(default_factory=Affine)

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


def _linear_params(cfg: OptConfig) -> int:
    """Weights of one layer's matmuls a token multiplies by (qkv, out, MLP; of a mixture of experts, the router
    and the k experts it is routed to): the per-token matmul FLOPs are twice this."""
    unrouted = (cfg.num_experts - cfg.experts_per_token) * expert_bytes(cfg) // cfg.dtype_bytes
    return sum(math.prod(s) for name, s in cfg.layer_shapes().items() if len(s) == 2) - unrouted


def _head_params(cfg: OptConfig) -> int:
    """Weights of the LM head matmuls (project_out, then the vocabulary projection)."""
    p = cfg.word_embed_proj_dim
    return cfg.vocab_size * p + (cfg.hidden_size * p if p != cfg.hidden_size else 0)


def _max_group_bytes(cfg: OptConfig) -> int:
    """The largest weight group the engine loads at once (a layer, the input embeddings or the head), plus one
    expert of a mixture (experts stream through arenas of their own)."""
    layout = stack_layout(cfg)
    largest = max(layout.group_elements(g) for g in layout.walked) * cfg.dtype_bytes
    return largest + (expert_bytes(cfg) if cfg.moe else 0)


def _compressed_matmul(
    kind: str, hw: HardwareSpec, params: int, calls: int, rows: int, dense_s: float
) -> Affine | None:
    """Seconds per layer of ``calls`` matmuls of ``rows`` rows each over a layer's ``params`` compressed
    weights, as the CPU kernels run them, given ``dense_s`` for the same matmuls over dense weights; None
    when ``hw`` has no figures for ``kind`` (a GPU: priced as dequantization passes)."""
    dequant, fused = hw.quant_rate(kind, "dequant"), hw.quant_rate(kind, "fused_mm_flops")
    if not hw.device_is_host or dequant is None or fused is None:
        return None
    dequantized = dense_s + calls * params / dequant  # chunk by chunk into the compute dtype, then multiplied
    if rows > FUSED_MAX_ROWS:
        return Affine(dequantized)
    fused_s = 2 * calls * rows * params / fused
    if kind == "int8":  # a per-row int8 weight goes to the fused op as read, from any tier
        return Affine(fused_s)
    # An int4 weight read from disk is repacked for the fused op each time it is read (else dequantized).
    repack = hw.quant_rate(kind, "repack")
    streamed = fused_s + calls * params / repack if repack else dequantized
    return Affine.share("weights", ["device", "host"], fused_s) + Affine.share("weights", ["disk"], streamed)


def all_reduce_seconds(cfg: OptConfig, hw: HardwareSpec, rows: int, tokens: int, calls: int) -> float:
    """Seconds per layer the tensor-parallel all-reduces take for ``calls`` micro-batches of ``rows`` x ``tokens``
    hidden states: one per row-parallel projection (two a layer, one for a parallel-residual layer), each moving
    2 (tp - 1) / tp of the hidden state's bytes (a ring) over the interconnect, plus its latency; 0 on one rank."""
    tp = hw.tp_ranks
    if tp <= 1:
        return 0.0
    bw = hw.interconnect_bw or LOOPBACK_BW
    latency = hw.interconnect_latency or LOOPBACK_LATENCY
    per_layer = 1 if cfg.parallel_attn else 2
    nbytes = 2 * (tp - 1) / tp * rows * tokens * cfg.hidden_size * cfg.run_dtype_bytes
    return calls * per_layer * (latency + nbytes / bw)


def working_bytes(cfg: OptConfig, gpu_batch_size: int, max_len: int, cpu: bool) -> int:
    """Intermediates of one micro-batch's prefill on the compute device, as the engine reserves them."""
    return cfg.working_bytes(gpu_batch_size, max_len, cpu)


def block_bytes(cfg: OptConfig, block_size: int) -> int:
    """Buffers of the whole block beside one micro-batch's working memory, as the engine reserves them: its
    logits as float32 three times over (the heads' outputs, one per micro-batch in prefill or one merged
    in decode; their concatenation; the sampler's copy) and a decode step's merged rows through a layer."""
    if cfg.encoder:
        return 0
    ffn_buffers = 3 if cfg.gated_mlp else 2
    rows = block_size * (6 * cfg.hidden_size + ffn_buffers * cfg.ffn_embed_dim) * cfg.run_dtype_bytes
    return 3 * block_size * cfg.vocab_size * 4 + rows


#: Scored positions per LM-head matmul in a scorer's pass (``runtime.scorer``).
SCORED_ROWS = 128


def scorer_bytes(cfg: OptConfig, gpu_batch_size: int, seq_len: int) -> int:
    """A scorer's buffers beside one micro-batch's working memory, as it reserves them: one layer's K and V of
    a micro-batch in the compute dtype (kept one layer long: a scorer keeps no KV cache), and the float32
    logits of ``SCORED_ROWS`` scored positions with their log-softmax."""
    return 2 * gpu_batch_size * seq_len * cfg.kv_dim * cfg.run_dtype_bytes + 2 * SCORED_ROWS * cfg.vocab_size * 4


def cost_terms(
    cfg: OptConfig,
    hw: HardwareSpec,
    gpu_batch_size: int,
    num_gpu_batches: int,
    prompt_len: int,
    gen_len: int,
    compress_weight: bool | str = False,
    compress_cache: bool | str = False,
    cpu_cache_compute: bool = False,
    head: bool = True,
) -> CostTerms:
    """The cost model's affine terms for this batch shape and these options (shares left free). ``gen_len`` 0:
    a scorer's pass (prefill only, nothing generated), which keeps no KV cache. ``head`` False leaves out the
    LM head's share of each layer's compute: the layers alone, as a probe of one layer times them."""
    hw = hw.for_dtype(cfg.run_dtype)  # the compute rates of the dtype the model runs in
    cpu_cache_compute = cpu_cache_compute and not hw.device_is_host  # the host *is* the device there
    dt, h, l = cfg.dtype_bytes, cfg.hidden_size, cfg.num_hidden_layers
    # Tensor parallelism: each rank holds 1/tp of every matrix, of the KV cache and of the attention and matmul
    # work (norms and the hidden state are replicated), and all-reduces its partial sums.
    tp = max(1, int(hw.tp_ranks))
    kvd = cfg.kv_dim / tp
    b, nb = gpu_batch_size, num_gpu_batches
    B = b * nb
    s, n = prompt_len, gen_len
    S = s + n  # the cache and activation buffers are sized for the longest sequence
    L = s + n / 2  # mean context length over the decode steps
    compress_weight, compress_cache = compression(compress_weight), compression(compress_cache)
    prefill_only = n == 0
    if prefill_only:  # no cache to compress
        compress_cache = ""
    w_frac = compressed_fraction(dt, compress_weight) if compress_weight else 1.0
    c_frac = compressed_fraction(dt, compress_cache) if compress_cache else 1.0

    weights_total = cfg.model_bytes() * w_frac / tp
    w_layer = weights_total / l  # per layer, with the embeddings and head spread over the stack
    # A mixture of experts reads only the experts its tokens are routed to: in prefill the expected union over
    # each micro-batch's b x s tokens (once per micro-batch), at a decode step the union over the block's B.
    experts = cfg.num_experts * expert_bytes(cfg) * w_frac  # (mixtures of experts run on one rank)
    w_layer_p = w_layer - experts + nb * expected_experts(cfg, b * s) * expert_bytes(cfg) * w_frac
    w_layer_d = w_layer - experts + expected_experts(cfg, B) * expert_bytes(cfg) * w_frac
    kv_tok = 2 * kvd * dt * c_frac  # K and V of one token in one layer  # (2, kv_dim)
    h_tok = h * cfg.run_dtype_bytes  # the hidden state of one token  # (h,)
    off_device = ("host", "disk")

    # ---- compute (seconds per layer, whole block) ----
    # A prefill micro-batch's matmuls read the layer's weights from device memory once: with small
    # micro-batches that, not the FLOP rate, bounds them (a roofline per micro-batch, summed over the block).
    # A decode step's matmuls run once over the whole block's rows (the engine merges its micro-batches).
    weight_read = active_layer_bytes(cfg, b * s) / tp / hw.device_mem_bw
    mm_p = max(2 * B * s * _linear_params(cfg) / tp / hw.mm_flops_prefill, nb * weight_read)
    mm_rate_d = hw.mm_decode_rate(B)
    mm_d = max(2 * B * _linear_params(cfg) / tp / mm_rate_d, active_layer_bytes(cfg, B) / tp / hw.device_mem_bw)
    head_params = _head_params(cfg) if head else 0
    head_s = 2 * B * head_params / tp / l / mm_rate_d  # logits of the last position only
    # A weight stored in another dtype than the compute dtype is converted as each matmul reads it, chunk by
    # chunk (``kernels.cpu.linear``): a pass reading it and writing its copy per call. A prefill calls each
    # matmul (and the head) once per micro-batch, a decode step once: fewer, bigger micro-batches convert less.
    if cfg.run_dtype != cfg.dtype and not compress_weight:
        params = _linear_params(cfg) + head_params / l
        upcast = params / tp * (dt + cfg.run_dtype_bytes) / hw.device_mem_bw
        mm_p, mm_d = mm_p + nb * upcast, mm_d + upcast
    attn_p = 4 * B * s * s * h / tp / hw.bmm_flops_prefill  # Q K^T and P V over (s, s) per head
    attn_d = 4 * B * L * h / tp  # FLOPs over the cache, on whichever side holds it
    reduce_p, reduce_d = all_reduce_seconds(cfg, hw, b, s, nb), all_reduce_seconds(cfg, hw, B, 1, 1)
    kv_full = 2 * kvd * dt  # K and V of one token in one layer, uncompressed
    quant_w = QUANT_PASSES * cfg.layer_bytes() / hw.device_mem_bw if compress_weight else 0.0
    mm_pre, mm_dec, cpu_kernels = Affine(mm_p), Affine(mm_d), False
    if compress_weight:
        params = _linear_params(cfg)
        cpu_pre = _compressed_matmul(compress_weight, hw, params, nb, b * s, mm_p)
        cpu_dec = _compressed_matmul(compress_weight, hw, params, 1, B, mm_d)
        if cpu_pre is not None and cpu_dec is not None:
            mm_pre, mm_dec, quant_w, cpu_kernels = cpu_pre, cpu_dec, 0.0, True
    quant_p = QUANT_PASSES * B * s * kv_full / hw.device_mem_bw if compress_cache else 0.0
    quant_d = QUANT_PASSES * B * L * kv_full / hw.device_mem_bw if compress_cache else 0.0
    if cpu_cache_compute:
        dev_attn = Affine.share("cache", ["device"], attn_d / hw.bmm_flops_decode)
        host_attn = Affine.share("cache", off_device, attn_d / hw.host_attn_flops)
    else:
        dev_attn, host_attn = Affine(attn_d / hw.bmm_flops_decode), Affine()

    # ---- transfers (seconds per layer, whole block) ----
    def link(link_name: str, parts: list[Affine]) -> Affine:
        if hw.device_is_host and link_name in ("host->device", "device->host"):
            return Affine()  # one memory: nothing to copy
        return sum(parts, Affine())

    h2d, d2h = hw.link_bw("host->device") or 1.0, hw.link_bw("device->host") or 1.0
    d2h_c, h2disk, h2disk_c = (
        hw.cache_write_bw("device->host") or 1.0,
        hw.host_to_disk_bw,
        hw.cache_write_bw("host->disk"),
    )
    disk2h = hw.disk_to_host_bw
    # The hot set (``costmodel.hotset``): the tables read by rows go to disk first, and cost only their rows.
    hot, per_layer = hot_terms(cfg), w_frac / tp / l
    gathered = hot.hot.gathered * per_layer
    disk_w = hw.disk_read_rate(hot.request * w_frac / tp)  # weights are read a tensor a call: at that call's rate

    def weight_reads(w_layer: float, rows: float, bw: float, host: bool = False) -> Affine:
        """Seconds per layer to read the disk share's weights (``host``: and the host share's) at ``bw``."""
        read = Affine(0.0, {WHOLE: (w_layer - gathered) / bw}) + Affine.share(
            "weights", ["disk"], hot.rows_bytes(rows) / l / bw
        )
        return read + Affine.share("weights", ["host"], w_layer / bw) if host else read

    weights_in = weight_reads(w_layer_p, nb * min(b * s, cfg.vocab_size), h2d, host=True)
    weights_disk = weight_reads(w_layer_p, nb * min(b * s, cfg.vocab_size), disk_w)

    def acts(tokens: float) -> dict[str, Affine]:
        """The block's hidden state in at the layer's start and out at its end, from/to its tier."""
        nbytes = B * tokens * h_tok
        return {
            "host->device": Affine.share("activations", off_device, nbytes / h2d),
            "disk->host": Affine.share("activations", ["disk"], nbytes / disk2h),
            "device->host": Affine.share("activations", off_device, nbytes / d2h),
            "host->disk": Affine.share("activations", ["disk"], nbytes / h2disk),
        }

    def cache_out(tokens: float) -> dict[str, Affine]:
        """New K/V of ``tokens`` positions stored to the cache's tier."""
        nbytes = B * tokens * kv_tok
        return {
            "device->host": Affine.share("cache", off_device, nbytes / d2h_c),
            "host->disk": Affine.share("cache", ["disk"], nbytes / h2disk_c),
        }

    a_p, c_p = acts(s), cache_out(0 if prefill_only else s)
    prefill = PhaseTerms(
        links={
            "disk->host": link("disk->host", [weights_disk, a_p["disk->host"]]),
            "host->device": link("host->device", [weights_in, a_p["host->device"]]),
            "device->host": link("device->host", [a_p["device->host"], c_p["device->host"]]),
            "host->disk": link("host->disk", [a_p["host->disk"], c_p["host->disk"]]),
        },
        compute=mm_pre + (head_s + attn_p + quant_w + quant_p + reduce_p),  # prefill attention runs on the device
        host_compute=Affine(),
    )

    a_d, c_d = acts(1), cache_out(1)
    weights_in = weight_reads(w_layer_d, B, h2d, host=True)
    weights_disk = weight_reads(w_layer_d, B, disk_w)
    cache_read = B * L * kv_tok  # the context's K/V, read by each decode step
    # A layer whose window is shorter than the run keeps (and reads) only a ring of its window on disk.
    windows = [cfg.attention_window(i) for i in range(l)]
    ring_len = sum(min(w, L) if 0 < w < S else L for w in windows) / l
    ring_share = sum(w / S if 0 < w < S else 1.0 for w in windows) / l
    disk_cache = Affine.share("cache", ["disk"], B * ring_len * kv_tok / disk2h)
    if cpu_cache_compute:
        # Only the new token's q, k, v go to the host and the attention output comes back.
        qkv_out = Affine.share("cache", off_device, B * (h + 2 * kvd) * dt / d2h)
        attn_back = Affine.share("cache", off_device, B * h_tok / h2d)
        decode_links = {
            "disk->host": [weights_disk, a_d["disk->host"], disk_cache],
            "host->device": [weights_in, a_d["host->device"], attn_back],
            "device->host": [a_d["device->host"], qkv_out],
            "host->disk": [a_d["host->disk"], c_d["host->disk"]],
        }
    else:
        cache_in = Affine.share("cache", off_device, cache_read / h2d)
        decode_links = {
            "disk->host": [weights_disk, a_d["disk->host"], disk_cache],
            "host->device": [weights_in, a_d["host->device"], cache_in],
            "device->host": [a_d["device->host"], c_d["device->host"]],
            "host->disk": [a_d["host->disk"], c_d["host->disk"]],
        }
    decode = PhaseTerms(
        links={name: link(name, parts) for name, parts in decode_links.items()},
        compute=mm_dec + (head_s + quant_w + quant_d + reduce_d) + dev_attn,
        host_compute=host_attn,
    )

    # ---- memory (bytes held on each tier) ----
    slot = b * S * kvd * dt * c_frac  # K (or V) of one micro-batch in one layer  # (S, b, kv_dim)
    cache_total = cfg.cache_bytes(B, S) * c_frac / tp
    if prefill_only:  # nothing cached, nothing staged
        slot = cache_total = 0.0
    acts_total = B * S * h_tok  # one layer boundary of the block  # (B, S, h)
    group = _max_group_bytes(cfg) * w_frac / tp
    # Staging buffers the runtime allocates when any of a kind is off a tier; prorated by the share
    # (exact at 0% and 100%, and the relaxation factor covers splits).
    device = (
        Affine.share("weights", ["device"], weights_total)
        + Affine.share("weights", off_device, 2 * group)  # double-buffered arena for streamed weights
        + Affine.share("cache", ["device"], cache_total)
        + Affine.share("activations", ["device"], acts_total)
        + working_bytes(cfg, b, S, hw.device_is_host)
        # The whole block's logits and a decode step's merged rows, and a shared prefill's scratch (one
        # micro-batch's K and V and the stem's, the stem's hidden state: runtime.prefix); or a scorer's buffers.
        + (
            scorer_bytes(cfg, b, S)
            if prefill_only
            else block_bytes(cfg, B) + 2 * (b + 1) * S * kvd * dt * c_frac + S * h_tok
        )
        + (cfg.layer_bytes() if compress_weight else 0)  # one dequantized layer
    )
    # Two micro-batches' K and V in flight through the device (a prefill attends over them with host-side
    # attention too), and the next micro-batch's hidden state brought in while one computes.
    device += Affine.share("cache", off_device, 4 * slot)
    device += Affine.share("activations", off_device, b * S * h_tok)
    # The disk's double buffer holds the largest group on disk: the next largest until the largest goes too.
    nl, lg = hot.hot.next_largest * per_layer * l, hot.hot.largest * per_layer * l
    stage_turns = kv_stage_depth(nb, diskio.padded(math.ceil(slot)), hw.device_is_host)
    ex = expert_bytes(cfg) * w_frac if cfg.moe else 0.0  # experts stream through arenas of their own
    arena = Affine(0.0, {WHOLE: 2 * (nl + ex), LARGEST: 2 * (lg - nl)})
    host = (
        Affine.share("weights", ["host"], weights_total)
        + arena
        + Affine.share("weights", ["disk"], hot.buffer_bytes)  # the gathered tables' read buffers
        + Affine.share("cache", ["host"], cache_total)
        + Affine.share("cache", ["disk"], 2 * stage_turns * slot)  # the disk cache's staging turns, K and V
        + Affine.share("activations", ["host"], acts_total)
    )
    if compress_weight == "int4" and cpu_kernels:
        # The CPU holds a resident int4 weight's codes once, in the fused op's layout, with the op's bfloat16
        # scale and zero per group beside the canonical scales (4 bytes a group more).
        host += Affine.share("weights", ["host"], _linear_params(cfg) * l * 4 / QUANT_GROUP)
    if cpu_cache_compute:
        host += b * (cfg.n_head * S * 4 + 4 * h_tok)  # one micro-batch's scores (fp32) and q, k, v, out
    disk = Affine.share("cache", ["disk"], cache_total * ring_share) + Affine.share("activations", ["disk"], acts_total)
    if hw.device_is_host:
        # The device tier is host RAM: its working memory lives there; no device copies of anything.
        host = host + device.const
        device = Affine()
    return CostTerms(
        prefill=prefill,
        decode=decode,
        memory={"device": device, "host": host, "disk": disk},
        disk_weights=Affine.share("weights", ["disk"], weights_total),
        num_layers=l,
        decode_steps=max(n - 1, 0),
        gpu_batch_size=b,
        num_gpu_batches=nb,
        prompt_len=s,
        gen_len=n,
        compress_weight=compress_weight,
        compress_cache=compress_cache,
        cpu_cache_compute=cpu_cache_compute,
        device_is_host=hw.device_is_host,
        derived=hot.starts,
        step_reads=(weights_disk * disk_w) * l,
    )
