"""The engine's Triton kernels compiled for an H100 (sm_90) without a GPU: their PTX, for tests.

:func:`h100_ptx` runs ``python -m tests.support.kernel_ptx`` without ``TRITON_INTERPRET`` (the
interpreter, which the tests use, patches Triton's language for the whole process). Each kernel
is compiled with the specialisation and options a launch of Molmo2-8B's geometry gets (32 query
heads, 8 key heads of 128, a 256-row step of 5 chunks): Triton marks a pointer, and an integer
argument not in the kernel's ``do_not_specialize``, as divisible by 16 where it is, and only then
may it read 16 bytes at a time.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS, HEADS, KV, DIM, COLUMNS, CHUNK = 256, 32, 8, 128, 10, 512
PART_STRIDES = {
    "stride_or": HEADS * COLUMNS * DIM, "stride_oh": COLUMNS * DIM, "stride_oc": DIM,
    "stride_lr": HEADS * COLUMNS, "stride_lh": COLUMNS,
}  # fmt: skip


@functools.cache
def h100_ptx() -> dict[str, str]:
    """Each kernel's PTX by name (``chunk`` and ``merge``: flash_decode; ``rotary``: fused_rotary)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.kernel_ptx"],
        cwd=Path(__file__).resolve().parents[2],  # the repository, where ``tests`` is a package
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def compiled_for_h100(kernel, values: dict, constants: dict, **options) -> str:
    """``kernel``'s PTX for sm_90 with ``values`` (a pointer's type, or an int or float)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    varying = set(kernel.do_not_specialize)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = values[name]
        signature[name] = value if isinstance(value, str) else "fp32" if isinstance(value, float) else "i32"
        aligned = isinstance(value, str) or value % 16 == 0
        attrs[(index,)] = [["tt.divisibility", 16]] if aligned and name not in varying else []
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def main() -> None:
    from molmo_backend.engine import flash_decode, fused_rotary

    chunk = compiled_for_h100(
        flash_decode._chunk_kernel,
        {
            **dict.fromkeys(("Q", "K", "V"), "*bf16"), "PartOut": "*fp32", "PartLse": "*fp32",
            "Table": "*i32", "count": ROWS, "dim": DIM, "chunk": CHUNK, "splits": 5, "scale_log2": 0.1,
            "stride_qr": HEADS * DIM, "stride_qh": DIM, "stride_kt": KV * DIM, "stride_kh": DIM,
            **PART_STRIDES,
        },
        {"GROUPS": HEADS // KV, "TILE": 16, "KEYS": flash_decode.KEY_TILE, "DIM": DIM, "IEEE": False},
    )  # fmt: skip
    merge = compiled_for_h100(
        flash_decode._merge_kernel,
        {
            "PartOut": "*fp32", "PartLse": "*fp32", "Prefix": "*i32", "Own": "*i32", "Out": "*bf16",
            "dim": DIM, "chunk": CHUNK, "splits": 5, **PART_STRIDES,
            "stride_xr": HEADS * DIM, "stride_xh": DIM,
        },
        {"COLUMNS": 16, "DIM": DIM},
    )  # fmt: skip
    strides = [f"s{tensor}{axis}" for tensor in "qkc" for axis in "bhs" if tensor + axis != "ch"]
    strides += [f"s{tensor}{axis}" for tensor in "op" for axis in "bhs"]
    rotary = compiled_for_h100(
        fused_rotary._rotary_kernel,
        {
            **dict.fromkeys(("Q", "K", "Cos", "Sin", "QOut", "KOut"), "*bf16"), "seq": 1, "heads_q": HEADS,
            "heads_k": KV, **{name: DIM for name in strides},
        },
        {"HALF": DIM // 2, "HEADS": HEADS, "HALF_PAD": DIM // 2},
        **fused_rotary.LAUNCH,
    )  # fmt: skip
    print(json.dumps({"chunk": chunk, "merge": merge, "rotary": rotary}))


if __name__ == "__main__":
    main()
