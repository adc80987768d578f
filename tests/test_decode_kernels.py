"""The one-sequence decode kernels against their references: in-place rotary of q's and k's heads together,
the rotary table, grouped-query attention without expanded K/V, the float32 RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexrun.kernels.cpu as C
import flexrun.kernels.positions as P
import flexrun.kernels.reference as R
from flexrun.config import OptConfig


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # whole heads, and a partial rotary (the rest passes through)
def test_in_place_rotary_is_bit_equal_to_the_reference(interleaved: bool, rotary_dim: int) -> None:
    torch.manual_seed(0)
    b, s, heads, d = 2, 3, 5, 16
    x = torch.randn(b, s, heads, d)
    cos, sin = P.rotary_cos_sin(torch.arange(s).repeat(b, 1) + 7, rotary_dim, 100.0, interleaved, torch.float32)
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (b, s, 1, rd)
    want = R.apply_rotary(x, cos, sin, interleaved)
    got = C.apply_rotary_(x, cos, sin, interleaved)
    assert got.data_ptr() == x.data_ptr()  # written in place
    # Each value is the same two products summed in the same order: equal to the bit.
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rotary_table_rows_equal_the_angles_computed_alone() -> None:
    cfg = OptConfig(name="t", num_hidden_layers=1, hidden_size=32, n_head=2, ffn_embed_dim=64, position="rotary")
    rope = P.Rope(cfg)
    pos = torch.tensor([[-1, -1, 0, 1], [0, 1, 2, 3]])  # left-padded
    cos, sin = rope.cos_sin(pos, torch.float32)
    want_cos, want_sin = P.rotary_cos_sin(pos[1:], 16, cfg.rope_theta, False, torch.float32, inv_freq=rope.inv_freq)
    torch.testing.assert_close(cos[1:], want_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[1:], want_sin, rtol=0, atol=0)
    torch.testing.assert_close(cos[0, :, 2:], want_cos[0, :, :2], rtol=0, atol=0)
    # A later, longer position grows the table; the rows already handed out keep their values.
    far, _ = rope.cos_sin(torch.tensor([[1000]]), torch.float32)
    torch.testing.assert_close(
        far[0, 0, 0], P.rotary_cos_sin(torch.tensor([[1000]]), 16, cfg.rope_theta, False, torch.float32)[0][0, 0, 0]
    )


@pytest.mark.parametrize("s", [1, 4])
def test_grouped_attention_equals_expanded_heads(s: int) -> None:
    torch.manual_seed(0)
    b, nh, nkv, t, d = 2, 6, 2, 9, 8
    q, k, v = torch.randn(b, nh, s, d), torch.randn(b, nkv, t, d), torch.randn(b, nkv, t, d)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False
    mask = P.additive_mask(valid, s, torch.float32)
    expanded = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(R.attention(q, k, v, mask, 0.3), expanded, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hidden", [48, 576])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_rms_norm_is_the_reference_to_the_bit(hidden: int, bias: bool) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(3, 2, hidden) * 7, torch.randn(hidden)
    b = torch.randn(hidden) if bias else None
    torch.testing.assert_close(C.rms_norm(x, w, b, 1e-6), R.rms_norm(x, w, b, 1e-6), rtol=0, atol=0)
    # A 16-bit input keeps the reference's own arithmetic (float32 inside, cast back, then the weight).
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(C.rms_norm(xb, wb, None, 1e-6), R.rms_norm(xb, wb, None, 1e-6), rtol=0, atol=0)


def test_a_scratch_made_under_inference_mode_is_remade_for_writes_outside_it() -> None:
    # The engine's steps run under inference mode; calibration or another runner in the same thread may not.
    with torch.inference_mode():
        made = C.scratch("test-inference", 16, torch.float32, torch.device("cpu"))
        assert made.is_inference()
    again = C.scratch("test-inference", 16, torch.float32, torch.device("cpu"))
    again.copy_(torch.ones(16))  # an inference tensor would refuse this write
    assert not again.is_inference()
