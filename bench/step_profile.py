"""Where a decode step and a prefill spend their time, piece by piece (CUDA events).

    python bench/step_profile.py --json $OUT/step_profile.json

On full-size random-weight Molmo2-8B: the engine's captured decode step for row counts x read
lengths; decode attention alone, as the engine calls it (SDPA on strided slot views) and
alternatives; prefill of 1, 4 and 8 images; image preparation on the CPU and on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import build, noise_image  # noqa: E402

from molmo_backend.engine.base import PointQuery, Row  # noqa: E402
from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.engine.prefill import prepare_image  # noqa: E402


def cuda_ms(fn, repeat=10, warm=2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeat, 3)


def wall_ms(fn, repeat=3) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - started) / repeat, 2)


def attention_variants(out, device):
    """Decode attention of 128 rows, 8 kv heads x 4 query heads, head 128, bf16."""
    slots, length, heads, kv, dim = 145, 2560, 32, 8, 128
    cache = torch.randn(slots, kv, length, dim, device=device, dtype=torch.bfloat16)
    cache_bmhk = torch.randn(slots, length, kv, dim, device=device, dtype=torch.bfloat16)
    for rows in (16, 128):
        q = torch.randn(rows, heads, 1, dim, device=device, dtype=torch.bfloat16)
        for read in (1280, 2048):
            lengths = torch.randint(read // 2, read, (rows,), device=device)
            mask = torch.where(torch.arange(read, device=device)[None, :] <= lengths[:, None], 0.0, -1e30)
            mask = mask.to(torch.bfloat16)[:, None, None, :]
            k = cache[16 : 16 + rows, :, :read]
            packed = q.reshape(rows, kv, heads // kv, dim)
            key = f"rows{rows}_read{read}"
            out[key + "_sdpa_strided_packgqa"] = cuda_ms(
                lambda: torch.nn.functional.scaled_dot_product_attention(packed, k, k, attn_mask=mask)
            )
            kc = k.contiguous()
            out[key + "_sdpa_contiguous_packgqa"] = cuda_ms(
                lambda: torch.nn.functional.scaled_dot_product_attention(packed, kc, kc, attn_mask=mask)
            )
            out[key + "_kv_bytes_gb"] = round(2 * rows * read * kv * dim * 2 / 1e9, 3)
            try:  # per-row key lengths: the efficient kernel reads only each row's own keys
                flat = cache_bmhk.view(1, slots * length, kv, dim)
                qp = (
                    q.reshape(rows, kv, heads // kv, dim)
                    .permute(0, 2, 1, 3)
                    .reshape(1, rows * heads // kv, kv, dim)
                )
                seqstart_q = torch.arange(rows + 1, device=device, dtype=torch.int32) * (heads // kv)
                seqstart_k = (torch.arange(rows + 1, device=device, dtype=torch.int32) + 16) * length
                seqlen_k = (lengths + 1).to(torch.int32)

                def varlen():
                    return torch.ops.aten._efficient_attention_forward(
                        qp,
                        flat,
                        flat,
                        None,
                        seqstart_q,
                        seqstart_k,
                        heads // kv,
                        read,
                        0.0,
                        0,
                        False,
                        scale=None,
                        seqlen_k=seqlen_k,
                    )

                out[key + "_efficient_seqlen_k"] = cuda_ms(varlen)
            except Exception as exc:  # noqa: BLE001
                out[key + "_efficient_seqlen_k"] = repr(exc)[:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    out = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "command": " ".join(["python"] + sys.argv),
    }
    attention_variants(out, device)
    print(json.dumps(out, indent=1), flush=True)
    model, processor, _ = build("8b", device, torch.bfloat16)
    engine = TransformersEngine(
        model, processor, model_id="8b", revision="random", max_new_tokens=1024, max_batch=128
    )
    decoder = engine.decoder
    for interactive, counts, reads in (
        (False, (16, 64, 128), (512, 1280, 2048)),
        (True, (2, 4, 16), (1280,)),
    ):
        for rows in counts:
            for read in reads:
                # every row live, reading ~read - 250 keys (a replay adds one); rows in threes
                # share a prefix of all but ~100 of them (3 labels an image), for the cascade
                decoder.live.fill_(1)
                decoder.lengths.fill_(read - 256)
                first = decoder.space.regions[interactive].first
                decoder._cascade[interactive].load(
                    [(first + i, i // 3, max(1, read - 356)) for i in range(rows)]
                )
                graph = decoder._graph(interactive, rows, read)
                graph.replay()
                name = "interactive_step" if interactive else "decode_step"
                out[f"{name}_rows{rows}_read{read}_ms"] = cuda_ms(graph.replay)
    decoder.live.zero_()
    decoder.lengths.zero_()
    print(json.dumps(out, indent=1), flush=True)
    for size in ((1280, 960), (4032, 3024), (1920, 1080)):
        image = noise_image(size, 3)
        out[f"prepare_cpu_{size[0]}x{size[1]}_ms"] = round(
            1000 * min(_timed(lambda: prepare_image(processor, image, None)) for _ in range(3)), 1
        )
        out[f"prepare_gpu_{size[0]}x{size[1]}_ms"] = wall_ms(lambda: prepare_image(processor, image, device))
    for images in (1, 4, 8):
        queries = [
            PointQuery(noise_image((1280, 960), 10 + i), "Point to the person.", image_key=i)
            for i in range(images)
        ]

        def prefill():
            rows = [Row(q, False) for q in queries]
            engine.prefill(rows)
            engine.release(rows)

        out[f"prefill_{images}x1280x960_ms"] = wall_ms(prefill)
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
