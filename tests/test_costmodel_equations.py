"""The cost model's equations on small cases computed by hand, and the hardware spec (presets, JSON, loading).

The hand cases use a tiny OPT (2 layers, hidden 64, 4 heads, ffn 256, vocab 1000, 128 positions, fp16)
and a made-up GPU box with round figures, so every number below can be checked with a pencil:

    per layer:  linear weights 192*64 + 64*64 + 256*64 + 64*256 = 49152 params
                norms and biases 64*4 + 192 + 64 + 256 + 64      =   832 params
                layer_bytes = (49152 + 832) * 2                  = 99968 B
    globals:    embed_tokens 1000*64 + embed_positions 130*64 + final norm 2*64 = 72448 params = 144896 B
    model_bytes = 2 * 99968 + 144896 = 344832 B; per layer, embeddings spread over the stack: 172416 B
    one token:  hidden 64 * 2 = 128 B; K and V 2 * 64 * 2 = 256 B per layer
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from flexrun.config import OptConfig
from flexrun.costmodel.equations import Affine, compressed_fraction, cost_terms
from flexrun.costmodel.hardware import PRESETS, HardwareSpec, load_hardware, preset_names
from flexrun.costmodel.prediction import evaluate, kind_bytes, placement_shares, predict
from flexrun.errors import ConfigError, FlexrunError
from flexrun.placement import Placement, Shares
from flexrun.resolver import resolve

US = 1e-6

TINY = OptConfig(
    name="tiny", num_hidden_layers=2, hidden_size=64, n_head=4, ffn_embed_dim=256, vocab_size=1000, max_seq_len=128
)
BOX = HardwareSpec(
    name="box",
    source="round numbers for hand calculation",
    device_mem=1 << 30,
    host_mem=4 << 30,
    disk_mem=16 << 30,
    disk_to_host_bw=1e8,
    host_to_disk_bw=1e8,
    host_to_device_bw=1e9,
    device_to_host_bw=1e9,
    device_mem_bw=1e11,
    mm_flops_prefill=1e12,
    mm_flops_decode=1e11,
    bmm_flops_prefill=1e11,
    bmm_flops_decode=1e10,
    host_attn_flops=1e9,
)
ON_HOST = Placement(gpu_batch_size=2, num_gpu_batches=3)  # everything on host (the Placement default)


def test_tiny_sizes_match_the_docstring() -> None:
    assert TINY.layer_bytes() == 99968
    assert TINY.model_bytes() == 344832


def test_compressed_fraction_is_flexgens_int4_group_64() -> None:
    # 4 bits per value + an fp16 scale and min per 64 values: 0.5 + 4/64 = 0.5625 B, over 2 B of fp16.
    assert compressed_fraction(2) == pytest.approx(0.28125)
    assert compressed_fraction(4) == pytest.approx(0.140625)


def test_affine_arithmetic() -> None:
    a = Affine.share("weights", ["host", "disk"], 2.0) + 1.0
    b = Affine.share("weights", ["disk"], 3.0) * 2
    shares = {("weights", "host"): 0.25, ("weights", "disk"): 0.75}
    assert (a + b).value(shares) == pytest.approx(1 + 2 * 1.0 + 6 * 0.75)


def test_prefill_all_on_host_by_hand() -> None:
    # Block 2 x 3 = 6 sequences, prompt 16, gen 4.
    p = predict(TINY, BOX, ON_HOST, prompt_len=16, gen_len=4)
    links = p.prefill.links
    # host->device: the layer's weights 172416 B + the block's hidden state 6*16*128 = 12288 B, at 1 GB/s.
    assert links["host->device"] == pytest.approx((172416 + 12288) / 1e9)  # 184.704 us
    # device->host: hidden state out 12288 B + new K/V 6*16*256 = 24576 B.
    assert links["device->host"] == pytest.approx((12288 + 24576) / 1e9)  # 36.864 us
    assert links["disk->host"] == 0 and links["host->disk"] == 0
    # compute: matmuls max(2*6*16*49152 / 1e12 = 9.437 us, roofline 3 micro-batches * 99968 B / 1e11 = 3.0 us)
    #          + LM head 2*6*(1000*64) / 2 layers / 1e11 = 3.84 us + attention 4*6*16*16*64 / 1e11 = 3.932 us.
    assert p.prefill.compute == pytest.approx((9.437184 + 3.84 + 3.93216) * US)
    assert p.prefill.seconds == pytest.approx(184.704 * US)
    assert p.prefill.bottleneck == "host->device"
    assert p.prefill_s == pytest.approx(2 * 184.704 * US)


def test_decode_all_on_host_by_hand() -> None:
    p = predict(TINY, BOX, ON_HOST, prompt_len=16, gen_len=4)
    links = p.decode.links
    # Mean context 16 + 4/2 = 18 tokens. host->device: weights 172416 + hidden 6*128 = 768
    # + the cache read for device attention 6*18*256 = 27648 B.
    assert links["host->device"] == pytest.approx((172416 + 768 + 27648) / 1e9)  # 200.832 us
    # device->host: hidden 768 + one new token's K/V 6*256 = 1536 B.
    assert links["device->host"] == pytest.approx((768 + 1536) / 1e9)
    # compute: matmuls max(2*6*49152 / 1e11 = 5.898 us, 3.0 us) + head 3.84 us + attention 4*6*18*64 / 1e10.
    assert p.decode.compute == pytest.approx((5.89824 + 3.84 + 2.7648) * US)
    assert p.decode.seconds == pytest.approx(200.832 * US)
    # gen 4 = 1 prefill + 3 decode steps, over 2 layers; 4 tokens for each of 6 sequences.
    assert p.decode_s == pytest.approx(2 * 3 * 200.832 * US)
    assert p.throughput == pytest.approx(24 / ((2 * 184.704 + 6 * 200.832) * US))
    assert p.decode_throughput == pytest.approx(3 * 6 / p.decode_s)


def test_memory_all_on_host_by_hand() -> None:
    p = predict(TINY, BOX, ON_HOST, prompt_len=16, gen_len=4)
    # host: all weights 344832 + the cache of 6 sequences x 20 tokens, K and V in 2 layers: 2*2*6*20*64*2 = 61440
    #       + one layer boundary of activations 6*20*128 = 15360.
    assert p.peak["host"] == 344832 + 61440 + 15360
    # device: double-buffered arena for the largest weight group (the input embeddings, (1000+130)*64*2
    #   = 144640 B) = 289280; K/V staging for two micro-batches 4 * 2*20*64*2 = 20480; one micro-batch's
    #   intermediates 2*20*(6*64 + 2*256)*2 + 2*4*20*20*4 + 2*2*1000*4 = 71680 + 12800 + 16000 = 100480;
    #   the block's (6 sequences') logits 3*6*1000*4 and a decode step's rows 6*(6*64 + 2*256)*2 = 82752;
    #   the next micro-batch's hidden state brought in while one computes 2*20*64*2 = 5120.
    #   a shared prefill's scratch: K and V of a micro-batch and the stem 2*3*20*64*2 + its hidden state 20*128 = 17920.
    assert p.peak["device"] == 289280 + 20480 + 100480 + 82752 + 5120 + 17920
    assert p.peak["disk"] == 0 and p.disk_weight_bytes == 0


def test_host_side_attention_by_hand() -> None:
    placement = dataclasses.replace(ON_HOST, cpu_cache_compute=True)
    p = predict(TINY, BOX, placement, prompt_len=16, gen_len=4)
    links = p.decode.links
    # The cache stays on the host: only the attention output 6*128 B comes back to the device ...
    assert links["host->device"] == pytest.approx((172416 + 768 + 768) / 1e9)
    # ... after the new token's q, k, v (6 * (64 + 2*64) * 2 = 2304 B) went to the host.
    assert links["device->host"] == pytest.approx((768 + 2304) / 1e9)
    # Host attention 4*6*18*64 / 1e9 = 27.648 us, after the device's matmuls + head.
    assert p.decode.host_compute == pytest.approx(27.648 * US)
    assert p.decode.compute == pytest.approx((5.89824 + 3.84) * US)
    # The device peak as without it: a prefill still attends over the cache staged on the device.
    assert p.peak["device"] == 289280 + 20480 + 100480 + 82752 + 5120 + 17920


def test_disk_weights_add_to_the_read_path() -> None:
    placement = dataclasses.replace(ON_HOST, weights=Shares(host=0.5, disk=0.5))
    p = predict(TINY, BOX, placement, prompt_len=16, gen_len=4)
    # The hot set: the tied embeddings (the head) stay resident, the position table (16640 B) goes to disk
    # first and is read by rows. Half the weights on disk: 0.5 * 344832 - 16640 B read whole a step, 77888 B
    # a layer, and half of the 6 sequences' rows, a page a row of each table (of the position table's 5
    # pages at most), 11264 B a layer, at 0.1 GB/s; then the host's half and those over host->device
    # (1 GB/s), beside the 28.416 us of cache.
    assert p.decode.links["disk->host"] == pytest.approx((77888 + 11264) / 1e8)  # 891.52 us
    assert p.decode.links["host->device"] == pytest.approx((172416 / 2 + 77888 + 11264) / 1e9 + 28.416 * US)
    assert p.decode.seconds == pytest.approx((891.52 + 203.776) * US)
    assert p.decode.bottleneck == "disk->host"
    assert p.disk_weight_bytes == 344832 // 2
    assert p.step_weight_reads == 2 * (77888 + 11264)
    # The disk arena: two copies of the largest group on disk, a layer (99968 B), for the share read whole
    # (0.5 - g) / (1 - g), g = 16640 / 344832; the read buffers of the two tables (each held whole, 131072
    # and 20480 B padded), prorated by the disk share.
    whole = (0.5 - 16640 / 344832) / (1 - 16640 / 344832)
    buffers = (131072 + 20480) / 2
    assert p.peak["host"] == round(344832 // 2 + 2 * 99968 * whole + buffers + 61440 + 15360)


def test_compression_shrinks_transfers() -> None:
    placement = dataclasses.replace(ON_HOST, compress_weight=True, compress_cache=True)
    plain = predict(TINY, BOX, ON_HOST, 16, 4)
    packed = predict(TINY, BOX, placement, 16, 4)
    f = compressed_fraction(2)
    assert packed.prefill.links["host->device"] == pytest.approx((172416 * f + 12288) / 1e9)
    assert packed.prefill.links["device->host"] == pytest.approx((12288 + 24576 * f) / 1e9)
    assert packed.peak["host"] < plain.peak["host"]
    # Dequantization: 4 passes over the layer's fp16 weights (99968 B) once per block and, in decode, over
    # the context's fp16 cache (6*18*256 = 27648 B), at the device's 1e11 B/s.
    assert packed.decode.compute - plain.decode.compute == pytest.approx(4 * (99968 + 27648) / 1e11)
    assert kind_bytes(TINY, 6, 16, 4, True, True)["cache"] == int(61440 * f)


def test_no_overlap_sums_the_paths() -> None:
    p = predict(TINY, BOX, dataclasses.replace(ON_HOST, overlap=False), 16, 4)
    assert p.prefill.seconds == pytest.approx((184.704 + 36.864 + 17.209344) * US)


def test_device_is_host_has_no_copies_and_merges_device_into_host() -> None:
    cpu = dataclasses.replace(BOX, name="cpubox", device_is_host=True, host_to_device_bw=0.0, device_to_host_bw=0.0)
    assert cpu.device_mem == 0 and cpu.tiers() == ("host", "disk")
    on_device = Placement(Shares.only("device"), Shares.only("device"), Shares.only("device"), 2, 3)
    p = predict(TINY, cpu, on_device, 16, 4)
    assert p.prefill.links["host->device"] == 0 and p.decode.links["device->host"] == 0
    assert p.peak["device"] == 0
    # Everything, including the device's working memory, is host RAM; no arenas, no staging. A CPU's
    # working memory also holds float32 copies of a micro-batch's float16 K and V for attention:
    # 2 * 2*20*64 * 4 = 20480. And a shared prefill's scratch, 17920.
    assert p.peak["host"] == 344832 + 61440 + 15360 + 100480 + 20480 + 82752 + 17920
    assert placement_shares(on_device, device_is_host=True)[("weights", "host")] == 1.0


def test_evaluate_matches_predict() -> None:
    terms = cost_terms(TINY, BOX, 2, 3, 16, 4)
    assert evaluate(terms, placement_shares(ON_HOST)) == predict(TINY, BOX, ON_HOST, 16, 4)


def test_flexgen_published_30b_policy_predicts_near_its_measurement() -> None:
    # FlexGen measured 7.32 tok/s for this policy on its T4 box; the model uses FlexGen's fitted constants but
    # its own structure (decode weight copies overlap compute), so only the neighbourhood is asserted.
    flexgen = Placement(Shares(0.2, 0.8, 0), Shares.only("host"), Shares.only("host"), 48, 3, cpu_cache_compute=True)
    p = predict(resolve("opt-30b"), PRESETS["t4"], flexgen, 512, 32)
    assert 7.32 / 2 < p.throughput < 7.32 * 2
    assert p.decode.bottleneck == "host attention"


# ---- hardware spec ---------------------------------------------------------------------------------
def test_presets_are_complete_and_sourced() -> None:
    assert {"cpu", "t4", "a100-40gb", "a100-80gb", "h100-80gb"} <= set(preset_names())
    for spec in PRESETS.values():
        assert spec.source
    assert PRESETS["cpu"].device_is_host and PRESETS["cpu"].host_mem == 24 << 30
    t4 = PRESETS["t4"]
    assert t4.device_mem == 15 << 30 and t4.host_mem == 204 << 30 and t4.disk_mem == 1500 << 30
    assert t4.host_to_device_bw == pytest.approx(12.89 * (1 << 30))
    assert t4.cache_write_bw("device->host") == pytest.approx(0.97 * (1 << 30))


def test_json_round_trip_and_overrides(tmp_path) -> None:
    path = PRESETS["t4"].save(tmp_path / "t4.json")
    assert load_hardware(str(path)) == PRESETS["t4"]
    spec = load_hardware("T4").with_memory(device=8 << 30, host=None, disk=0)
    assert (spec.device_mem, spec.host_mem, spec.disk_mem) == (8 << 30, 204 << 30, 0)
    assert PRESETS["cpu"].with_memory(device=8 << 30).device_mem == 0  # no separate device memory


def test_bad_specs_are_reported(tmp_path) -> None:
    with pytest.raises(FlexrunError, match="a100-40gb"):
        load_hardware("v100")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**PRESETS["t4"].to_dict(), "warp_speed": 9}))
    with pytest.raises(ConfigError, match="warp_speed"):
        load_hardware(str(bad))
    with pytest.raises(ConfigError, match="mm_flops_decode"):
        dataclasses.replace(PRESETS["t4"], mm_flops_decode=0.0)


def test_for_dtype_swaps_in_that_dtypes_compute_rates() -> None:
    # BOX's own rates are fp16's; float32 runs 4x slower on its matmuls, 2x on attention.
    slow = {"mm_flops_prefill": 2.5e11, "mm_flops_decode": 2.5e10, "bmm_flops_decode": 5e9}
    box = dataclasses.replace(BOX, rates_by_dtype={"float32": slow})
    f32 = box.for_dtype("float32")
    assert (f32.dtype, f32.mm_flops_decode, f32.bmm_flops_decode) == ("float32", 2.5e10, 5e9)
    assert f32.bmm_flops_prefill == BOX.bmm_flops_prefill  # a rate not measured in float32 stays
    assert box.for_dtype("float16") is box and box.for_dtype("bfloat16") is box  # own dtype / none measured
    assert HardwareSpec.from_dict(json.loads(json.dumps(box.to_dict()))) == box


def test_predict_uses_the_models_dtype_rates() -> None:
    # The same fp32 model on the same box: decode compute (matmul-bound at one token per sequence) follows
    # the float32 matmul rate when the spec has one; transfers do not change.
    tiny32 = dataclasses.replace(TINY, dtype="float32")
    box = dataclasses.replace(BOX, rates_by_dtype={"float32": {"mm_flops_decode": 1e10}})
    base, slow = predict(tiny32, BOX, ON_HOST, 16, 4), predict(tiny32, box, ON_HOST, 16, 4)
    assert slow.decode.compute > 5 * base.decode.compute
    assert slow.decode.links == base.decode.links


def test_rates_by_dtype_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown rate 'disk_to_host_bw'"):
        dataclasses.replace(BOX, rates_by_dtype={"float32": {"disk_to_host_bw": 1.0}})
    with pytest.raises(ConfigError, match="must be > 0"):
        dataclasses.replace(BOX, rates_by_dtype={"float32": {"mm_flops_decode": 0.0}})


def test_decode_rate_per_micro_batch_size(tmp_path) -> None:
    # Calibrated on this CPU in float32: small micro-batches fall off the BLAS fast paths.
    curve = {"float32": {"1": 6e9, "4": 7e9, "16": 40e9, "64": 90e9}}
    cpu = dataclasses.replace(PRESETS["cpu"], dtype="float32", decode_by_batch=curve)
    assert cpu.mm_decode_rate(1) == 6e9 and cpu.mm_decode_rate(64) == 90e9 and cpu.mm_decode_rate(512) == 90e9
    assert 7e9 < cpu.mm_decode_rate(8) < 40e9  # log-log between 4 and 16: 16.7 GFLOP/s
    assert cpu.mm_decode_rate(8) == pytest.approx((7e9 * 40e9) ** 0.5)
    # Without a curve for the spec's dtype, the single rate stands.
    assert PRESETS["t4"].mm_decode_rate(4) == PRESETS["t4"].mm_flops_decode
    # Decode runs a step's matmuls once over the block's rows: per sequence, a block of 4 is slower than
    # one of 16, and 4 micro-batches of 4 cost what one of 16 does.
    cfg = dataclasses.replace(resolve("opt-350m"), dtype="float32")
    small = predict(cfg, cpu, Placement(gpu_batch_size=4, num_gpu_batches=1), 128, 8)
    split = predict(cfg, cpu, Placement(gpu_batch_size=4, num_gpu_batches=4), 128, 8)
    whole = predict(cfg, cpu, Placement(gpu_batch_size=16, num_gpu_batches=1), 128, 8)
    assert small.decode.compute / 4 > 3 * whole.decode.compute / 16
    assert split.decode.compute == pytest.approx(whole.decode.compute)
    # JSON round trip; bad curves are refused.
    assert HardwareSpec.load(cpu.save(tmp_path / "c.json")) == cpu
    with pytest.raises(ConfigError, match="decode_by_batch"):
        dataclasses.replace(cpu, decode_by_batch={"float32": {"zero": 1.0}})


def test_specs_saved_before_the_per_dtype_fields_still_load(tmp_path) -> None:
    old = PRESETS["cpu"].to_dict()
    del old["rates_by_dtype"], old["decode_by_batch"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    spec = HardwareSpec.load(tmp_path / "old.json")
    assert spec.mm_decode_rate(4) == spec.mm_flops_decode == PRESETS["cpu"].mm_flops_decode
    assert not spec.decode_by_batch and not spec.rates_by_dtype
