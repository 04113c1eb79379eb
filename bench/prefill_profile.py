"""Where one packed prefill step and one decode step spend their time, kernel by kernel.

    python bench/prefill_profile.py --json $OUT/prefill_profile.json --tables $OUT/prefill_profile.txt

On full-size random-weight Molmo2-8B (bench/workloads.py): the engine's packed prefill step
(``SlotDecoder.step``: image prefixes and their prompts, no decode rows) for 1, 4 and 8 images of
1280x960 and 8 of mixed sizes, timed; its vision part alone (``image_features``); the model's own
padded forward of 4 images (the processor's batching) as the reference; a large GEMM's rate; and
torch.profiler tables (self CUDA time, self CPU time) of the 4-image packed step, of the vision
tower on 8 mixed images, and of eager 4-row and 256-row decode steps; the captured decode step's
time for 1 to 256 rows, and the rate it reads the language model's weights at (a step of a few
rows reads them all and little else). ``--tiny`` checks the script on the CPU.

(The H100 figures of the padded per-size-group forward in bench/RESULTS.md, 2026-12-06, came from
this script at commit 068ba99, when the engine still had that forward.)
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

from molmo_backend.engine import prefix_attention  # noqa: E402
from molmo_backend.engine.decoding import SlotRow  # noqa: E402
from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.engine.prefill import image_features, prepare_image  # noqa: E402

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
        return round(1000 * (time.perf_counter() - started) / repeat, 3)

    return ms


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tables", type=Path)
    parser.add_argument("--batch", type=int, default=256, help="bulk rows (the decode steps go up to it)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, processor, _ = build("tiny" if args.tiny else "8b", device, dtype)
    engine = TransformersEngine(
        model, processor, model_id="random", revision="random", max_batch=args.batch, triton_kernels=True
    )
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

    def prefix_forward(images):
        """One packed step admitting one row per image (the prompt of one label)."""
        suffix = list(engine._suffix_ids("Point to the person."))
        slots = [decoder.take_slot(False, image.length + len(suffix)) for image in images]

        def run():
            decoder.step(images, list(range(len(images))), slots, [suffix] * len(images))

        return run, slots

    for name, sizes in (
        ("1x1280", [(1280, 960)]),
        ("4x1280", [(1280, 960)] * 4),
        ("8x1280", [(1280, 960)] * 8),
        ("8mixed", MIXED),
    ):
        images = prepared(sizes)
        run, slots = prefix_forward(images)
        out[f"packed_prefill_{name}_ms"] = ms(run)
        decoder.release(slots)
        out[f"packed_prefill_{name}_tokens"] = sum(im.length for im in images)
        print(name, out[f"packed_prefill_{name}_ms"], flush=True)

    # the same 8 mixed images with the image prefixes' attention the other way than the default
    # (FlashAttention-2 among themselves, or read back from their slots), where both can run
    geometry = (device, dtype, decoder.kv_heads, decoder.head_dim, decoder.kv_groups)
    default = decoder.prefix_flash
    out["prefix_flash"] = default
    if default or (decoder.varlen and prefix_attention.works(*geometry)):
        decoder.prefix_flash = not default
        run, slots = prefix_forward(prepared(MIXED))
        out[f"packed_prefill_8mixed_{'slot' if default else 'flash'}_prefixes_ms"] = ms(run)
        decoder.release(slots)
        decoder.prefix_flash = default
    images = prepared([(1280, 960)] * 4)
    pictures = [noise_image((1280, 960), i) for i in range(4)]
    batch = processor(
        images=[[p] for p in pictures], text=[processor.image_token] * 4, padding=True, return_tensors="pt"
    ).to(device)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    inner = model.model
    with torch.inference_mode():
        out["vision_adapter_4x1280_ms"] = ms(lambda: image_features(model, images, dtype))
        feats = image_features(model, images, dtype)
        out["model_forward_4x1280_no_cache_ms"] = ms(lambda: inner(**batch, use_cache=False))
        out["image_features_tokens"] = int(feats.shape[0])
        t, hidden = feats.shape[0], model.config.text_config.hidden_size
        a = torch.randn(t, hidden, device=device, dtype=dtype)
        w = torch.randn(12288 if not args.tiny else 128, hidden, device=device, dtype=dtype)
        gemm = ms(lambda: a @ w.T, repeat=20)
        out["gemm_tflops_4k"] = round(2 * t * hidden * w.shape[0] / gemm / 1e9, 1)
    print(json.dumps(out, indent=1), flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run, slots = prefix_forward(images)
    run()
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    decoder.release(slots)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables.append(
        "== packed prefill step 4x1280, by self device time ==\n"
        + prof.key_averages().table(sort_by=sort, row_limit=30)
    )
    tables.append(
        "== packed prefill step 4x1280, by self CPU time ==\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    )
    mixed = prepared(MIXED, seed=20)
    with torch.inference_mode():
        image_features(model, mixed, dtype)
        with profile(activities=activities) as prof:
            image_features(model, mixed, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
    tables.append(
        "== vision tower + adapter, 8 mixed images, by self device time ==\n"
        + prof.key_averages().table(sort_by=sort, row_limit=30)
    )
    # decode steps over bulk rows as the engine lays them out (its own step list and attention
    # layout), every row live at ~1000 keys in its own run, rows in threes sharing a 900-token
    # image prefix (3 labels an image): the captured graph's time for each row count, and the
    # eager step's kernels at a few
    first, read = decoder.space.regions[False].first, 1280
    spacing = -(-read // 128)  # each row's run of blocks: rows read keys of their own
    lm = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    weight_bytes -= lm.embed_tokens.weight.numel() * lm.embed_tokens.weight.element_size()
    out["decode_weight_gb"] = round(weight_bytes / 1e9, 2)
    counts = [c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256) if c <= decoder.bulk_slots]
    for count in counts:
        slots = [first + i * spacing for i in range(count)]
        rows = [SlotRow(slot, [], 1000, 900, i // 3) for i, slot in enumerate(slots)]
        index = torch.tensor(slots, device=device)
        decoder.live[index] = 1
        decoder.lengths[index] = 1000
        with torch.inference_mode():
            steps = decoder._load_step(False, [(row, 0, 0) for row in rows])
            if decoder.use_cuda_graph:
                graph = decoder._graph(False, steps, read)
                graph.replay()
                out[f"graph_decode_step_{count}x1280_ms"] = ms(graph.replay, repeat=20)
                out[f"graph_decode_step_{count}x1280_weight_tb_s"] = round(
                    weight_bytes / out[f"graph_decode_step_{count}x1280_ms"] / 1e9, 2
                )
            if count in (4, 256) or args.tiny:
                step = lambda: decoder._step(False, steps, read)  # noqa: E731
                out[f"eager_decode_step_{count}x1280_ms"] = ms(step, repeat=10)
                step()
                with profile(activities=activities) as prof:
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                tables.append(
                    f"== eager decode step {count} rows x 1280, by self device time ==\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=40)
                )
        decoder.live.zero_()
        decoder.lengths.zero_()
        print(count, {k: v for k, v in out.items() if f"_{count}x1280" in k}, flush=True)
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
