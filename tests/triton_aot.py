"""Compiles every Triton kernel of flexrun ahead of time for CUDA targets, with no GPU present: Triton's
front end and the NVIDIA back end (its bundled ptxas) down to a cubin, for each dtype and kernel variant
the Triton set launches. The interpreter (tests/test_triton_kernels.py) checks what the kernels compute but
not that they compile; this checks that they compile, not what they compute.

Run as a script without TRITON_INTERPRET (the interpreter's functions cannot be compiled):
``env -u TRITON_INTERPRET python tests/triton_aot.py [capability ...]`` (default: 80 90). Prints one line a
kernel and exits 1 if any fails to compile.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flexrun.kernels import triton_attention as TA  # noqa: E402
from flexrun.kernels import triton_norm as TN  # noqa: E402
from flexrun.kernels import triton_quant as TQ  # noqa: E402

I32 = "i32"


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _variants(dt: str) -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, argument types, constexprs) for each variant the Triton set launches with ``dt`` activations."""
    precision = "ieee" if dt == "fp32" else "tf32"
    out: list[tuple[Any, dict[str, str], dict[str, Any]]] = []
    norm_types = {n: _ptr(dt) for n in ("x_ptr", "d_ptr", "w_ptr", "b_ptr", "sum_ptr", "out_ptr")}
    norm_types |= {n: I32 for n in ("H", "stride_x", "stride_d", "stride_s", "stride_o")} | {"eps": "fp32"}
    for rms in (True, False):
        for delta in (True, False):
            out.append(
                (TN._norm_kernel, norm_types, {"HAS_DELTA": delta, "HAS_BIAS": not rms, "RMS": rms, "BLOCK_H": 4096})
            )
    for int4, group in ((True, 64), (False, 0), (False, 128)):
        code = "u8" if int4 else "i8"
        parts = {"q_ptr": _ptr(code), "scale_ptr": "*fp16", "low_ptr": "*fp16"}
        dq = parts | {"out_ptr": _ptr(dt)} | {n: I32 for n in ("N", "K", "stride_q", "stride_s", "stride_o")}
        out.append((TQ._dequant_kernel, dq, {"GROUP": group, "INT4": int4, "BLOCK_N": 64, "BLOCK_K": 64}))
        mm = parts | {"x_ptr": _ptr(dt), "bias_ptr": _ptr(dt), "y_ptr": _ptr(dt)}
        mm |= {n: I32 for n in ("M", "N", "K", "stride_xm", "stride_q", "stride_s", "stride_ym")}
        consts = {"GROUP": group, "INT4": int4, "HAS_BIAS": True, "PRECISION": precision}
        out.append((TQ._qmatmul_kernel, mm, consts | {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}))
    scalars = ["T", "NKV", "split_len", "sq_b", "sq_h", "sq_s", "sk_t", "sk_b", "sk_h", "sv_t", "sv_b", "sv_h"]
    for kind, code_bytes in ((0, 0), (1, 128), (2, 64)):
        kv = _ptr(dt) if kind == 0 else "*u8"
        at = {"q_ptr": _ptr(dt), "k_ptr": kv, "v_ptr": kv, "mask_ptr": _ptr(dt), "scale": "fp32"}
        at |= {n: "*fp32" for n in ("acc_ptr", "m_ptr", "l_ptr")} | {n: I32 for n in (*scalars, "sm_b", "sm_h", "sm_s")}
        for s, group in ((1, 4), (3, 1)):
            consts = {"S": s, "GROUP": group, "D": 128, "CODE_BYTES": code_bytes, "KIND": kind, "PRECISION": precision}
            out.append((TA._split_kernel, at, consts | {"BLOCK_R": 16, "BLOCK_D": 128, "BLOCK_T": 32}))
    red = {n: "*fp32" for n in ("acc_ptr", "m_ptr", "l_ptr")} | {"out_ptr": _ptr(dt)}
    red |= {n: I32 for n in ("n_splits", "NKV", "so_b", "so_h", "so_s")}
    out.append((TA._reduce_kernel, red, {"S": 1, "GROUP": 4, "D": 128, "BLOCK_R": 16, "BLOCK_D": 128}))
    return out


def main(capabilities: list[int]) -> int:
    failed = 0
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for dt in ("fp32", "bf16", "fp16"):
            for fn, types, consts in _variants(dt):
                signature = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
                what = f"sm_{cap} {dt} {fn.__name__} {consts}"
                try:
                    compiled = triton.compile(ASTSource(fn, signature, consts), target=target)
                    print(f"ok {what}: {len(compiled.asm['cubin'])} bytes of cubin")
                except Exception:
                    failed += 1
                    print(f"FAILED {what}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [80, 90]))
