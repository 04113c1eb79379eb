"""Where one prefill forward and one decode step spend their time, kernel by kernel.

    python bench/prefill_profile.py --json $OUT/prefill_profile.json --tables $OUT/prefill_profile.txt

On full-size random-weight Molmo2-8B (bench/workloads.py): the engine's image-prefix forward
(``SlotDecoder._prefill_images``: the model's own forward) for 1, 4 and 8 images of 1280x960 and
8 of mixed sizes, timed with CUDA events; its parts alone (vision tower + adapter, the language
model with and without the image block mask); and torch.profiler tables (self CUDA time, self
CPU time) of the 4-image forward and of an eager 128-row decode step. ``--tiny`` checks the
script on the CPU.
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

from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.engine.prefill import prepare_image, stack_images  # noqa: E402

MIXED = [
    (640, 480),
    (1280, 960),
    (4032, 3024),
    (1920, 1080),
    (800, 600),
    (300, 200),
    (1024, 1024),
    (1280, 960),
]


def timer(device):
    def ms(fn, repeat=5, warm=1):
        for _ in range(warm):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return round(1000 * (time.perf_counter() - started) / repeat, 2)

    return ms


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tables", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, processor, _ = build("tiny" if args.tiny else "8b", device, dtype)
    engine = TransformersEngine(model, processor, model_id="random", revision="random", max_batch=128)
    decoder = engine.decoder
    ms = timer(device)
    out: dict = {
        "date": datetime.date.today().isoformat(),
        "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
    }
    tables = []

    def prepared(sizes, seed=0):
        return [
            prepare_image(processor, noise_image(s, seed + i), device if device.type == "cuda" else None)
            for i, s in enumerate(sizes)
        ]

    from molmo_backend.engine.slots import SlotCache  # noqa: F401

    def prefix_forward(images):
        slots = list(range(decoder.interactive_slots, decoder.interactive_slots + len(images)))

        def run():
            from molmo_backend.engine.decoding import SlotRow

            rows = [SlotRow(s, [], 0) for s in slots]
            with torch.inference_mode():
                decoder._prefill_images(images, list(range(len(images))), list(range(len(images))), rows)

        return run

    for name, sizes in (
        ("1x1280", [(1280, 960)]),
        ("4x1280", [(1280, 960)] * 4),
        ("8x1280", [(1280, 960)] * 8),
        ("8mixed", MIXED),
    ):
        images = prepared(sizes)
        out[f"prefix_forward_{name}_ms"] = ms(prefix_forward(images))
        out[f"prefix_forward_{name}_tokens"] = sum(im.length for im in images)
        print(name, out[f"prefix_forward_{name}_ms"], flush=True)

    images = prepared([(1280, 960)] * 4)
    inputs = stack_images(images, device, dtype, engine._pad_id)
    inner = model.model
    with torch.inference_mode():
        out["vision_adapter_4x1280_ms"] = ms(
            lambda: inner.get_image_features(
                inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"]
            )
        )
        feats = torch.cat(
            inner.get_image_features(
                inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"]
            ).pooler_output
        )
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        out["lm_causal_no_mask_4x1280_ms"] = ms(
            lambda: inner.language_model(inputs_embeds=embeds, use_cache=False)
        )
        out["model_forward_4x1280_no_cache_ms"] = ms(lambda: inner(**inputs, use_cache=False))
        out["image_features_tokens"] = int(feats.shape[0])
        t, hidden = embeds.shape[1] * 4, embeds.shape[-1]
        a = torch.randn(t, hidden, device=device, dtype=dtype)
        w = torch.randn(12288 if not args.tiny else 128, hidden, device=device, dtype=dtype)
        gemm = ms(lambda: a @ w.T, repeat=20)
        out["gemm_tflops_4k"] = round(2 * t * hidden * w.shape[0] / gemm / 1e9, 1)
    print(json.dumps(out, indent=1), flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run = prefix_forward(images)
    run()
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables.append(
        "== prefix forward 4x1280, by self device time ==\n"
        + prof.key_averages().table(sort_by=sort, row_limit=30)
    )
    tables.append(
        "== prefix forward 4x1280, by self CPU time ==\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    )
    # one eager decode step over 128 bulk rows at 1280 positions (what a captured graph replays)
    first, count, read = decoder.interactive_slots, 128, 1280
    decoder.lengths[first : first + count] = 1000
    with torch.inference_mode():
        step = lambda: decoder._step(first, count, read)  # noqa: E731
        out["eager_decode_step_128x1280_ms"] = ms(step, repeat=10)
        step()
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    decoder.lengths.fill_(1)
    tables.append(
        "== eager decode step 128 rows x 1280, by self device time ==\n"
        + prof.key_averages().table(sort_by=sort, row_limit=30)
    )
    text = "\n\n".join(tables)
    print(text[-6000:], flush=True)
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.tables:
        args.tables.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
