"""A first-use probe of one real decoder layer of a job's model: the shape it runs at, its key in the
calibration cache, and what the cost model predicts for that same layer and shape.

The first-use calibration times bare matmuls; a real layer also runs norms, rotary, attention, activations,
dtype conversions and the engine's per-op overhead, which on a CPU leave it a third to a half of the bare
matmul rate. The probe (``runtime.probe`` times it, ``jobs.layerprobe`` caches it) gives the planner
measured / predicted for this model's layer, the starting correction of "prefill compute" and "decode
compute" (``calcache.Calibration.corrections``), so a machine's first plan is already close.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from flexrun.config import OptConfig
from flexrun.costmodel.equations import cost_terms
from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.prediction import placement_shares
from flexrun.placement import Placement

# Bumped when what the probe runs changes: entries of an older probe are measured again.
PROBE_VERSION = 1
# Tokens of the probed prefill micro-batch when the job's is not known yet (the planner chooses it), and
# decode rows likewise: past a few hundred tokens (rows) the layer's measured / predicted barely moves.
PREFILL_TOKENS = 1024
DECODE_ROWS = 64
# Seconds one probed call may take as the uncorrected spec predicts it (a real layer takes 2-3x that), and
# bytes of the probed decode step's KV cache: together they bound the probe to a second or two.
MAX_CALL_S = 0.15
MAX_CACHE_BYTES = 256 << 20
# The shortest prompt a probe shrinks to; a layer predicted past TOO_SLOW x MAX_CALL_S even at one row of it
# (the largest models on a small CPU) is not probed: the recorded runs correct its compute instead.
MIN_PROMPT = 16
TOO_SLOW = 4


@dataclass(frozen=True)
class JobShape:
    """What a probe needs of a job: its lengths and, when known, its micro-batch size and block size."""

    prompt_len: int
    gen_len: int
    gpu_batch_size: int | None = None
    block_size: int | None = None
    num_prompts: int | None = None


@dataclass(frozen=True)
class ProbeShape:
    """The probed work: a prefill of ``rows`` x ``prompt_len`` tokens, and a decode step of ``decode_rows``
    rows (0: none) over a cache of ``prompt_len + gen_len // 2`` tokens, the cost model's mean context."""

    rows: int
    prompt_len: int
    decode_rows: int
    gen_len: int

    @property
    def context(self) -> int:
        return self.prompt_len + self.gen_len // 2

    def bucket(self) -> str:
        """The shapes that share one probe: each size rounded up to a power of two."""
        up = [1 << max(n - 1, 0).bit_length() for n in (self.rows, self.prompt_len, self.decode_rows, self.context)]
        return f"p{up[0]}x{up[1]}" + (f"-d{up[2]}@{up[3]}" if self.decode_rows else "")

    def describe(self) -> str:
        decode = f", decode {self.decode_rows} rows at {self.context} tokens" if self.decode_rows else ""
        return f"prefill {self.rows} x {self.prompt_len} tokens{decode}"

    def to_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "prompt_len": self.prompt_len,
            "decode_rows": self.decode_rows,
            "gen_len": self.gen_len,
        }


def layer_key(cfg: OptConfig) -> str:
    """What one layer's compute depends on, as a short name: the architecture's sizes and flags and the
    stored dtype (a model's depth, vocabulary and name left out: models of one layer share a key)."""
    fields = {
        "shapes": cfg.layer_shapes(),
        "heads": (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rotary_dim),
        "flags": (cfg.norm, cfg.activation, cfg.position, cfg.do_layer_norm_before, cfg.parallel_attn),
        "more": (cfg.shared_norm, cfg.gated_mlp, cfg.rotary_interleaved, cfg.attention_window(0)),
        "dtype": cfg.dtype,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.arch} h{cfg.hidden_size} f{cfg.ffn_embed_dim} {cfg.dtype} {digest}"


def probe_key(cfg: OptConfig, shape: ProbeShape, threads: int) -> str:
    """The calibration cache's key of a probe: the layer, the compute dtype, the shape's bucket, the compute
    threads and the probe's version."""
    return f"{layer_key(cfg)} | {cfg.run_dtype} | {shape.bucket()} | t{threads} | v{PROBE_VERSION}"


def layer_compute(cfg: OptConfig, hw: HardwareSpec, shape: ProbeShape) -> tuple[float, float]:
    """Seconds of one layer's compute as the cost model prices it, the LM head left out: the prefill of
    ``shape``'s micro-batch and its decode step (0.0 without one), weights resident and uncompressed."""
    resident = placement_shares(Placement(), hw.device_is_host)
    gen_len = max(shape.gen_len, 1)
    prefill = cost_terms(cfg, hw, shape.rows, 1, shape.prompt_len, gen_len, head=False).prefill.compute
    if not shape.decode_rows:
        return prefill.value(resident), 0.0
    decode = cost_terms(cfg, hw, shape.decode_rows, 1, shape.prompt_len, gen_len, head=False).decode.compute
    return prefill.value(resident), decode.value(resident)


def probe_shape(cfg: OptConfig, hw: HardwareSpec, job: JobShape) -> ProbeShape | None:
    """The shape to probe for ``job``: its prefill micro-batch and decode block where known (else
    ``PREFILL_TOKENS`` and ``DECODE_ROWS``), no more rows than it has prompts, then fewer rows (then a
    shorter prompt, to ``MIN_PROMPT`` tokens) until each call is predicted within ``MAX_CALL_S`` and the
    cache within ``MAX_CACHE_BYTES``; None when even the smallest is predicted to take ``TOO_SLOW`` x that
    (a layer that slow is left to the recorded runs)."""
    prompts = job.num_prompts or 1 << 30
    rows = min(job.gpu_batch_size or max(1, PREFILL_TOKENS // job.prompt_len), prompts)
    decode_rows = min(job.block_size or DECODE_ROWS, prompts) if job.gen_len > 1 else 0
    shape = ProbeShape(max(rows, 1), job.prompt_len, decode_rows, job.gen_len)
    while True:
        prefill_s, decode_s = layer_compute(cfg, hw, shape)
        cache = 2 * shape.decode_rows * (shape.context + 1) * cfg.kv_dim * cfg.dtype_bytes
        if shape.decode_rows > 1 and (decode_s > MAX_CALL_S or cache > MAX_CACHE_BYTES):
            shape = dataclasses.replace(shape, decode_rows=shape.decode_rows // 2)
        elif prefill_s > MAX_CALL_S and shape.rows > 1:
            shape = dataclasses.replace(shape, rows=shape.rows // 2)
        elif (prefill_s > MAX_CALL_S or cache > MAX_CACHE_BYTES) and shape.prompt_len > MIN_PROMPT:
            shorter = max(math.ceil(shape.prompt_len / 2), MIN_PROMPT)
            gen_len = min(shape.gen_len, max(shape.gen_len * shorter // shape.prompt_len, 2))
            shape = ProbeShape(shape.rows, shorter, shape.decode_rows, gen_len)
        elif max(prefill_s, decode_s) > TOO_SLOW * MAX_CALL_S:
            return None
        else:
            return shape
