"""Print the split-key decode kernels' PTX for an H100 (sm_90) as JSON, compiled without a GPU.

Run as ``python -m tests.support.kernel_ptx`` without ``TRITON_INTERPRET`` (the interpreter
patches Triton's language for the whole process). Each kernel is compiled with the
specialisation a launch of Molmo2-8B's geometry gets (32 query heads, 8 key heads of 128, a
256-row step of 5 chunks): Triton marks a pointer, and an integer argument not in the kernel's
``do_not_specialize``, as divisible by 16 where it is, and only then may it read 16 bytes at a time.
"""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from molmo_backend.engine import flash_decode

ROWS, HEADS, KV, DIM, COLUMNS, CHUNK = 256, 32, 8, 128, 10, 512
PART_STRIDES = {
    "stride_or": HEADS * COLUMNS * DIM, "stride_oh": COLUMNS * DIM, "stride_oc": DIM,
    "stride_lr": HEADS * COLUMNS, "stride_lh": COLUMNS,
}  # fmt: skip


def compiled_for_h100(kernel, values: dict, constants: dict) -> str:
    """``kernel``'s PTX for sm_90 with ``values`` (a pointer's type, or an int or float)."""
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
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def main() -> None:
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
    print(json.dumps({"chunk": chunk, "merge": merge}))


if __name__ == "__main__":
    main()
