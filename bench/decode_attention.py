"""Decode attention alone, side by side: CUTLASS's memory-efficient kernel (each row reading all
its keys, and the cascade that reads each image prefix once) against the split-key Triton
kernels of molmo_backend/engine/flash_decode.py (split in 256- or 512-key chunks, or not), and
the engine's kernels with other launches (``TUNINGS``) and as commit c21eaa8 compiled them.

    python bench/decode_attention.py --json $OUT/decode_attention.json

Molmo2-8B's head geometry (32 query heads, 8 key heads of 128), bf16, one layer's call as a
decode step makes it (36 a step), timed as a CUDA graph of 36 calls. Steps of 16 to 256 rows laid
out as the realistic bulk job lays them: three rows an image, each image's prefix 200-1500 tokens
(the realistic mix's images), each row's own keys its ~15-token prompt suffix plus an answer so
far drawn from bench/workloads.py's answer lengths. Reports microseconds a call, the bytes that
must be read (each prefix once, each row's own keys, the queries), the bandwidth that makes, and
each variant's largest difference from CUTLASS reading all keys.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import answer_length  # noqa: E402

from molmo_backend.engine import cascade, flash_decode, slot_attention  # noqa: E402

HEADS, KV, DIM, LAYERS, STRIDE = 32, 8, 128, 36, 2560


def step_layout(rows: int, rng: random.Random):
    """(slot, image, prefix, length) for ``rows`` rows, three an image, in step order."""
    out = []
    for r in range(rows):
        if r % 3 == 0:
            prefix = rng.randint(200, 1500)
        answer = answer_length(rng)
        length = prefix + 15 + rng.randint(0, answer)
        out.append((r, r // 3, prefix, min(length, STRIDE - 1)))
    return out


def graph_us(fn, calls=LAYERS, replays=20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(1000 * start.elapsed_time(end) / (replays * calls), 2)


#: launches of the chunk kernel beside the engine's (flash_decode.KEY_TILE, WARPS, STAGES), and
#: the kernels of commit c21eaa8, whose head size was not specialised (each element masked alone)
TUNINGS = {
    "keys_32": {"KEY_TILE": 32},
    "keys_128": {"KEY_TILE": 128},
    "warps_8": {"WARPS": 8},
    "stages_2": {"STAGES": 2},
    "stages_4": {"STAGES": 4},
    "head_size_unspecialised": {"unspecialised": True},
}


def tuned(fn, unspecialised: bool = False, **constants):
    """``fn`` run with ``flash_decode``'s launch constants changed (restored after each call)."""

    def run():
        saved = {name: getattr(flash_decode, name) for name in constants}
        kernels = flash_decode._chunk_kernel, flash_decode._merge_kernel
        for name, value in constants.items():
            setattr(flash_decode, name, value)
        if unspecialised:
            flash_decode._chunk_kernel, flash_decode._merge_kernel = UNSPECIALISED
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(flash_decode, name, value)
            flash_decode._chunk_kernel, flash_decode._merge_kernel = kernels

    return run


def _unspecialised():
    """The two kernels as commit c21eaa8 compiled them: the head size among the arguments
    Triton does not specialise, so it cannot prove a row of 128 values unmasked."""
    jit = flash_decode.triton.JITFunction
    return (
        jit(flash_decode._chunk_kernel.fn, do_not_specialize=["count", "dim", "chunk", "splits"]),
        jit(flash_decode._merge_kernel.fn, do_not_specialize=["dim", "chunk", "splits"]),
    )


UNSPECIALISED = _unspecialised()


def measure(rows: int, keys, values, device) -> dict:
    rng = random.Random(rows)
    layout = step_layout(rows, rng)
    groups, scaling = HEADS // KV, DIM**-0.5

    def int32(values):
        return torch.tensor(values, device=device, dtype=torch.int32)

    query = torch.randn(rows, HEADS, 1, DIM, device=device, dtype=torch.bfloat16)
    for slot, image, prefix_length, _ in layout:  # an image's rows hold the same prefix
        first = 3 * image
        keys[slot, :prefix_length], values[slot, :prefix_length] = (
            keys[first, :prefix_length],
            values[first, :prefix_length],
        )
    slots = [slot for slot, *_ in layout]
    read = -(-max(n + 1 for *_, n in layout) // 128) * 128
    plan = slot_attention.Plan(
        [keys],
        [values],
        int32(range(0, (rows + 1) * groups, groups)),
        int32([s * STRIDE for s in slots + slots[-1:]]),
        int32([n + 1 for *_, n in layout]),
        read,
    )
    flat_k, flat_v = keys.view(-1, KV, DIM), values.view(-1, KV, DIM)
    prefix_rows = [(slot, image, prefix) for slot, image, prefix, _ in layout]
    shared = cascade.Cascade(*(int32(v) for v in cascade.layout(prefix_rows, KV, groups, STRIDE)))
    table, prefix = flash_decode.layout(prefix_rows, groups, STRIDE)
    table, own_length = flash_decode.sequences(int32(table), int32(prefix), plan.seqstart_k, plan.seqlen_k)
    prefix = int32(prefix)

    def rows_alone():
        return slot_attention.decode_varlen(query, keys, values, plan, scaling)

    def cascaded():
        return shared.attend(query[:, :, 0], flat_k, flat_v, plan, scaling)

    def split(chunk):
        return lambda: flash_decode.attention(
            query[:, :, 0], flat_k, flat_v, table, prefix, own_length, read, scaling, chunk
        )

    variants = {
        "cutlass_rows": rows_alone,
        "cutlass_cascade": cascaded,
        "split_256": split(256),
        "split_512": split(512),
        "whole": split(read),
        "engine_default": split(None),
        # the engine's chunk rule with other launches of the chunk kernel
        **{name: tuned(split(None), **change) for name, change in TUNINGS.items()},
    }
    want = rows_alone()[:, 0].float()
    prefix_tokens = sum(p for i, (_, _, p, _) in enumerate(layout) if i % 3 == 0)
    own_tokens = sum(n + 1 - p for _, _, p, n in layout)
    needed = (prefix_tokens + own_tokens) * KV * DIM * 2 * 2 + rows * HEADS * DIM * 2 * 2
    result = {"rows": rows, "read_length": read, "needed_mb": round(needed / 1e6, 1)}
    for name, fn in variants.items():
        try:
            us = graph_us(fn)
            got = fn()
            got = got[:, 0] if got.dim() == 4 else got
            result[name] = {
                "us": us,
                "gb_per_s": round(needed / (us * 1e-6) / 1e9),
                "max_difference": round((got.float() - want).abs().max().item(), 5),
            }
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            result[name] = {"error": repr(exc)[:300]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rows", default="8,16,32,64,128,256")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    counts = [int(n) for n in args.rows.split(",")]
    keys = torch.randn(max(counts), STRIDE, KV, DIM, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": getattr(flash_decode.triton, "__version__", None),
        "command": " ".join(["python"] + sys.argv),
        "chunks": [flash_decode.CHUNK, flash_decode.BIG_CHUNK, flash_decode.SMALL_STEP],
        "launch": {
            "KEY_TILE": flash_decode.KEY_TILE,
            "WARPS": flash_decode.WARPS,
            "STAGES": flash_decode.STAGES,
        },
        "tunings": TUNINGS,
        "steps": [],
    }
    for rows in counts:
        results["steps"].append(measure(rows, keys, values, device))
        print(json.dumps(results["steps"][-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
