"""The seams new formats, kernels and tensor parallelism plug into: a weight type the linear dispatches on,
the reduction point of each row-parallel projection, the KV format, the one stack layout, and options the
runtime does not carry out refused rather than ignored."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flexrun import kernels
from flexrun.config import OptConfig
from flexrun.costmodel.equations import _max_group_bytes
from flexrun.errors import CheckpointError, FlexrunError, InputError, PlacementError
from flexrun.jobs.embed import encoder_placement
from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
from flexrun.kernels import REFERENCE, select_kernels
from flexrun.layout import INPUT_GLOBALS, stack_layout
from flexrun.placement import Placement, Shares
from flexrun.runtime.engine import Engine
from flexrun.runtime.kvformat import PlainKV
from flexrun.runtime.layer import FusedLayer, LayerSpec, LayerWeights
from flexrun.weights.convert import write_dummy_store
from flexrun.weights.store import TensorStore

CPU = torch.device("cpu")


def _cfg(**fields: object) -> OptConfig:
    base: dict[str, object] = dict(
        name="t", num_hidden_layers=2, hidden_size=32, n_head=4, ffn_embed_dim=48, vocab_size=97, dtype="float32"
    )
    base.update(fields)
    return OptConfig(**base)  # type: ignore[arg-type]


def _random_layer(cfg: OptConfig, seed: int = 0) -> LayerWeights:
    gen = torch.Generator().manual_seed(seed)
    slots = {name: torch.randn(shape, generator=gen) * 0.2 for name, shape in cfg.layer_shapes().items()}
    return LayerWeights.from_slots(slots)


def _run_layer(layer: FusedLayer, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """One prefill of x (b, s, h) over an empty cache."""
    b, s, _ = x.shape
    k = torch.zeros(s * layer.kv.row_elems(b))
    v = torch.zeros_like(k)
    valid = torch.ones(b, s, dtype=torch.bool)
    mask = kernels.positions.additive_mask(valid, s, x.dtype)
    core = layer.cached_core(layer.kv.slot(k, s, b), layer.kv.slot(v, s, b), 0, mask)
    return layer(w, x, core)


# ---- a weight type of its own ------------------------------------------------------------------------
@dataclass
class Int8Rows:
    """A toy compressed weight: int8 values with one float scale per output row."""

    q: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,)

    @classmethod
    def of(cls, w: torch.Tensor) -> Int8Rows:
        scale = w.abs().amax(dim=1) / 127
        return cls(torch.round(w / scale[:, None]).to(torch.int8), scale)

    def dense(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def _int8_linear(x: torch.Tensor, w: Int8Rows, b: torch.Tensor | None) -> torch.Tensor:
    out = (x @ w.q.float().t()) * w.scale
    return out if b is None else out + b


def test_a_weight_type_plugs_into_the_layer_through_the_linear_dispatch(monkeypatch) -> None:
    monkeypatch.setitem(kernels._LINEARS, (Int8Rows, None), _int8_linear)
    cfg = _cfg()
    dense = _random_layer(cfg)
    matrices = ("qkv_w", "out_w", "fc1_w", "fc2_w")
    packed = LayerWeights(**{**vars(dense), **{n: Int8Rows.of(getattr(dense, n)) for n in matrices}})
    # The dense reference computes on the same rounded values the packed weights hold.
    rounded = LayerWeights(**{**vars(dense), **{n: getattr(packed, n).dense() for n in matrices}})
    ks = select_kernels(CPU)
    assert ks.linears[Int8Rows] is _int8_linear  # chosen once, with the kernel set
    fmt = PlainKV(torch.float32, cfg.n_kv_head, cfg.head_dim)
    layer = FusedLayer(LayerSpec.from_config(cfg), ks, fmt)
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    # Float32 sums in another order (scale after the matmul instead of before): ~1e-6 relative.
    torch.testing.assert_close(_run_layer(layer, packed, x), _run_layer(layer, rounded, x), rtol=1e-5, atol=1e-5)


def test_a_weight_type_without_a_kernel_is_refused_by_name() -> None:
    with pytest.raises(FlexrunError, match="no reference linear kernel for Int8Rows weights"):
        REFERENCE.linear(torch.ones(1, 4), Int8Rows.of(torch.ones(3, 4)), None)


def test_a_slot_the_layer_has_no_place_for_is_an_error_not_dropped() -> None:
    slots = {n: torch.ones(s) for n, s in _cfg().layer_shapes().items()}
    with pytest.raises(CheckpointError, match="no slot qkv_scale"):
        LayerWeights.from_slots({**slots, "qkv_scale": torch.ones(3)})


# ---- the reduction point -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, reductions",
    [
        ({}, 2),  # pre-LN OPT: attention output and the second MLP matrix, one each
        ({"do_layer_norm_before": False}, 2),  # post-LN
        ({"parallel_attn": True, "shared_norm": True, "enable_bias": False, "attn_out_bias": False}, 1),  # GPT-J
        ({"parallel_attn": True}, 1),  # GPT-NeoX: one reduction for attention + MLP together
    ],
)
def test_each_row_parallel_projection_is_reduced_before_its_bias_and_residual(fields, reductions) -> None:
    """Two ranks holding half of each row-parallel matrix, summed by ``reduce``, give the one-rank layer:
    only if the reduction comes before the bias, and the bias is added once."""
    cfg = _cfg(**fields)
    w = _random_layer(cfg)
    fmt = PlainKV(torch.float32, cfg.n_kv_head, cfg.head_dim)
    whole = FusedLayer(LayerSpec.from_config(cfg), select_kernels(CPU), fmt)
    calls = []

    def reduce(partial: torch.Tensor) -> torch.Tensor:
        calls.append(partial.shape)
        return partial * 2  # the other rank's identical half

    halves = LayerWeights(**{**vars(w), "out_w": w.out_w / 2, "fc2_w": w.fc2_w / 2})  # halving is exact
    split = FusedLayer(LayerSpec.from_config(cfg), select_kernels(CPU), fmt, reduce=reduce)
    x = torch.randn(2, 4, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    # The same products summed in another order where the biases are added apart: ~1e-7 relative.
    torch.testing.assert_close(_run_layer(split, halves, x), _run_layer(whole, w, x), rtol=1e-5, atol=1e-6)
    assert len(calls) == reductions


# ---- the KV format -------------------------------------------------------------------------------------
def test_kv_format_appends_rows_and_reads_them_as_attention_does() -> None:
    fmt = PlainKV(torch.bfloat16, n_kv_head=2, head_dim=3)
    assert fmt.row_bytes(4) == 4 * 6 * 2
    slot = fmt.slot(torch.zeros(10 * fmt.row_elems(4), dtype=torch.bfloat16), 10, 4)  # (10, 4, 6)
    first, more = torch.randn(4, 3, 6), torch.randn(4, 2, 6)  # (b, s, kv_dim)
    fmt.append(slot, 0, first)
    fmt.append(slot, 3, more)
    read = fmt.read(slot, 5)  # (t, b, nkv, d)
    assert read.shape == (5, 4, 2, 3)
    expected = torch.cat([first, more], dim=1).bfloat16().view(4, 5, 2, 3).transpose(0, 1)
    assert torch.equal(read, expected)


# ---- one stack layout ----------------------------------------------------------------------------------
LAYOUT_CONFIGS = {
    "opt, tied": _cfg(),
    "llama-like, untied": _cfg(
        norm="rmsnorm", norm_bias=False, gated_mlp=True, activation="silu", enable_bias=False,
        position="rotary", tie_word_embeddings=False, n_kv_head=2,
    ),
    "bloom-like, embedding norm": _cfg(embed_norm=True, position="alibi"),
    "opt-350m-like, projections": _cfg(word_embed_proj_dim=16, do_layer_norm_before=False, final_layer_norm=False),
    "bert-like encoder": _cfg(encoder=True, type_vocab_size=2, pooler=True, embed_norm=True, final_layer_norm=False),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUT_CONFIGS))
def test_one_layout_for_the_converter_the_weight_manager_and_the_cost_model(name: str, tmp_path: Path) -> None:
    cfg = LAYOUT_CONFIGS[name]
    layout = stack_layout(cfg)
    order = layout.store_order
    assert len(order) == len(set(order)) == len(cfg.global_shapes()) + cfg.num_hidden_layers * len(cfg.layer_shapes())
    kinds = [g.kind for g in layout.groups]
    assert kinds == ["input"] + ["layer"] * cfg.num_hidden_layers + ["output"]
    assert set(layout.groups[0].names) == {n for n in cfg.global_shapes() if n in INPUT_GLOBALS}
    tied = cfg.tie_word_embeddings and not cfg.encoder
    assert ("embed_tokens" in layout.groups[-1].names) == tied  # a tied head reads the embeddings again
    # The cost model's weight buffers hold the largest group, in bytes.
    biggest = max(sum(math.prod(layout.shapes[n]) for n in g.names) for g in layout.groups)
    assert _max_group_bytes(cfg) == biggest * cfg.dtype_bytes
    # The converter writes the store in that order, and the weight manager walks the same groups.
    store = TensorStore(write_dummy_store(cfg, tmp_path / "s", progress=False))
    assert list(store.index["tensors"]) == order
    if not cfg.encoder:
        with Engine(store, Placement(), 8, offload_dir=tmp_path) as engine:
            assert engine.weights.groups == [list(g.names) for g in layout.groups]


def test_the_walk_computes_vectors_in_the_compute_dtype_and_leaves_matrices_as_stored(tmp_path: Path) -> None:
    store = TensorStore(write_dummy_store(_cfg(dtype="bfloat16"), tmp_path / "s", progress=False))
    with Engine(store, Placement(), 8, offload_dir=tmp_path, compute_dtype="float32") as engine:
        for group, w in engine.walk():
            for name, t in w.items():
                assert t.dtype == (torch.float32 if t.dim() == 1 else torch.bfloat16), (group.kind, name)
        engine.settle()


# ---- options the runtime does not carry out ------------------------------------------------------------
def test_weights_compressed_otherwise_than_the_store_holds_them_are_refused(tmp_path: Path) -> None:
    store = TensorStore(write_dummy_store(_cfg(), tmp_path / "s", progress=False))
    with pytest.raises(PlacementError, match="asks for int4 weights but the store .* holds uncompressed ones"):
        Engine(store, Placement(compress_weight="int4"), 8, offload_dir=tmp_path)


def test_host_side_attention_is_what_a_cpu_does_anyway(tmp_path: Path) -> None:
    store = TensorStore(write_dummy_store(_cfg(), tmp_path / "s", progress=False))
    with Engine(store, Placement(cpu_cache_compute=True), 8, offload_dir=tmp_path) as engine:
        assert engine.placement.cpu_cache_compute


def test_an_encoder_refuses_a_cache_placement() -> None:
    opts = EngineOptions(ModelOptions("bert"), PlacementRequest(mode="manual", cache=Shares.only("disk")))
    with pytest.raises(InputError, match="keeps no KV cache"):
        encoder_placement(opts)


def test_a_placement_request_is_planned_only_in_auto_mode_with_something_left_open() -> None:
    given = dict(weights=Shares(), cache=Shares(), activations=Shares(), gpu_batch_size=2, num_gpu_batches=3)
    assert PlacementRequest().planned
    assert not PlacementRequest(mode="manual").planned
    assert not PlacementRequest(**given).planned  # type: ignore[arg-type]
    manual = PlacementRequest(mode="manual", weights=Shares.only("disk"), overlap=False).manual()
    assert manual == Placement(weights=Shares.only("disk"), gpu_batch_size=4, num_gpu_batches=1, overlap=False)


# ---- module size ---------------------------------------------------------------------------------------
def test_no_module_is_over_450_lines() -> None:
    root = Path(__file__).parents[1] / "flexrun"
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these modules: {long}"
