"""Throughput and open-task latency of Molmo2 pointing, three ways, on one GPU, in one run.

    python bench/throughput.py --models 8b,4b --json $OUT/results.json

Full-size Molmo2-8B / -4B are built from config with random weights (no download: FACTS §3);
the tokenizer is the demo model's small one (the text vocabulary and lm_head keep their full
151936 rows, so compute is the real model's). Every variant sees the same inputs: 1280x960
images, 3 labels per image, prompt "Point to the {label}.", exactly 40 new tokens per answer
(end tokens are ignored: random weights would stop at random places).

(a) seed:   one (image, label) pair per ``generate()``, as Supervisely's Serve Molmo did
(b) plain:  Hugging Face ``generate()`` on left-padded batches of pairs
(c) engine: this project's scheduler + fast decoder (one prefill per image, static KV cache,
            CUDA-graph decode steps), also without CUDA graphs, at two batch sizes; ``--compile``
            also compiles the small-batch decode step (opened tasks), as the server does by default

Then open-task latency (1 task x 3 labels through the scheduler at INTERACTIVE priority) idle
and while a bulk job runs, and peak GPU memory per variant. ``--tiny`` runs everything on the
CPU with a tiny model, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molmo_backend.demo import CHAT_TEMPLATE, build_tokenizer  # noqa: E402
from molmo_backend.engine.base import PointQuery  # noqa: E402
from molmo_backend.engine.scheduler import Priority, Scheduler  # noqa: E402
from molmo_backend.engine.transformers_engine import TransformersEngine  # noqa: E402

LABELS = ["person", "car", "dog"]
NEW_TOKENS = 40
# text dims per FACTS §3: (hidden, layers, heads, kv heads, head_dim, mlp)
SIZES = {"8b": (4096, 36, 32, 8, 128, 12288), "4b": (2560, 36, 32, 8, 128, 9728)}


def build(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import (Molmo2Config, Molmo2ForConditionalGeneration, Molmo2ImageProcessor,
                              Molmo2Processor, Molmo2VideoProcessor)

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ["<im_start>", "<im_end>", "<im_patch>", "<low_res_im_start>", "<frame_start>", "<frame_end>"]}
    if size == "tiny":
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=128)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, image_size=[56, 56], num_position_embeddings=16)
        adapter = dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128)
    else:
        hidden, layers, heads, kv, head_dim, mlp = SIZES[size]
        text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv, head_dim=head_dim, intermediate_size=mlp)
        vision = {}  # Molmo2VisionConfig() defaults are the released SigLIP geometry
        adapter = dict(intermediate_size=mlp)
    config = Molmo2Config(
        vision_config=vision,
        adapter_config=dict(adapter, text_hidden_size=text["hidden_size"],
                            **({} if size == "tiny" else {"hidden_size": 1152})),
        text_config=dict(text, vocab_size=151936, additional_vocab_size=128, max_position_embeddings=36864),
        image_start_token_id=ids["<im_start>"], image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Molmo2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    crop = 56 if size == "tiny" else 378
    image_processor = Molmo2ImageProcessor(
        size={"height": crop, "width": crop}, patch_size=14, max_crops=8,
        overlap_margins=[1, 1] if size == "tiny" else [4, 4], pooling_size=[2, 2],
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = Molmo2Processor(
        image_processor=image_processor, video_processor=Molmo2VideoProcessor(), tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE, image_use_col_tokens=True, use_single_crop_col_tokens=False,
        use_single_crop_start_token=True,
    )
    params = sum(p.numel() for p in model.parameters())
    return model.eval(), processor, params


def images(n: int, seed: int, size=(1280, 960)):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=generator,
                                          dtype=torch.uint8).numpy()) for _ in range(n)]


def pairs(imgs, key_offset=0):
    return [PointQuery(img, f"Point to the {label}.", image_key=key_offset + i)
            for i, img in enumerate(imgs) for label in LABELS]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None


def run_plain(engine, queries, batch):
    """(a)/(b): generate() on left-padded batches, exactly NEW_TOKENS tokens each."""
    processor, model = engine.processor, engine.model
    for start in range(0, len(queries), batch):
        chunk = queries[start:start + batch]
        inputs = processor(images=[[q.image] for q in chunk], text=[engine.chat_text(q.prompt) for q in chunk],
                           padding=True, return_tensors="pt").to(engine.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def timed(fn, device):
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def latency_under_bulk(scheduler, bulk, time_one, imgs, gap=0.2):
    """Open tasks timed one after another (``time_one(img)`` seconds each, ``gap`` s apart) while
    ``bulk`` runs through ``scheduler``; returns their seconds and the bulk job's."""
    done = {}

    def bulk_job():
        started = time.perf_counter()
        scheduler.submit(bulk, Priority.BULK)
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=bulk_job)
    thread.start()
    time.sleep(1.0)
    loaded = []
    for img in imgs:
        if not thread.is_alive():
            break
        loaded.append(time_one(img))
        time.sleep(gap)
    thread.join()
    return loaded, done["seconds"]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def bench_model(size, args, device, dtype, log):
    out = {"model": f"Molmo2-{size.upper()}" if size != "tiny" else "tiny"}
    started = time.perf_counter()
    model, processor, params = build(size, device, dtype)
    out["params_b"] = round(params / 1e9, 2)
    out["build_s"] = round(time.perf_counter() - started, 1)
    engine = TransformersEngine(model, processor, model_id=out["model"], revision="random",
                                max_new_tokens=NEW_TOKENS, max_batch=args.batch[0], compile_step=args.compile)
    engine.decoder.eos = torch.tensor([-1], device=device)  # run every answer to NEW_TOKENS
    if engine.decoder.compile_step:
        started = time.perf_counter()
        engine.warm_up()
        out["compile_s"] = round(time.perf_counter() - started, 1)
        log(f"  decode step for small batches compiled in {out['compile_s']} s")
    prompt_tokens = processor(images=[images(1, 0)[0]], text=[engine.chat_text("Point to the person.")],
                              return_tensors="pt")["input_ids"].shape[1]
    out["prompt_tokens"] = prompt_tokens
    log(f"{out['model']}: {out['params_b']} B params, built in {out['build_s']} s, {prompt_tokens} prompt tokens")

    # correctness on the full-size model: fast decoder vs generate() on the same inputs (bf16)
    check = pairs(images(2, 99))
    engine.decoder.eos = torch.tensor(sorted(engine._eos_ids), device=device)
    engine.max_new_tokens = 16
    fast = [a.text for a in engine.generate(check)]
    plain = [a.text for a in engine.generate_plain(check)]
    out["fast_equals_generate"] = f"{sum(f == p for f, p in zip(fast, plain))}/{len(check)}"
    engine.decoder.eos = torch.tensor([-1], device=device)
    engine.max_new_tokens = NEW_TOKENS
    log(f"  fast decoder == generate(): {out['fast_equals_generate']} answers identical")

    # (a) the seed's way
    run_plain(engine, pairs(images(1, 1))[:1], 1)  # warm-up
    seed_pairs = pairs(images(args.seed_images, 2))
    peak_reset(device)
    seconds = timed(lambda: run_plain(engine, seed_pairs, 1), device)
    out["a_seed"] = {"pairs": len(seed_pairs), "seconds": round(seconds, 2),
                     "pairs_per_s": round(len(seed_pairs) / seconds, 2), "peak_gib": peak_gib(device)}
    log(f"  (a) seed, 1 pair/generate: {out['a_seed']}")

    # (b) plain batched generate
    plain_pairs = pairs(images(args.plain_images, 3))
    run_plain(engine, plain_pairs[:args.plain_batch], args.plain_batch)  # warm-up
    peak_reset(device)
    seconds = timed(lambda: run_plain(engine, plain_pairs, args.plain_batch), device)
    out["b_plain"] = {"pairs": len(plain_pairs), "batch": args.plain_batch, "seconds": round(seconds, 2),
                      "pairs_per_s": round(len(plain_pairs) / seconds, 2), "peak_gib": peak_gib(device)}
    log(f"  (b) plain generate: {out['b_plain']}")

    # (c) our engine through the scheduler
    bulk_imgs = images(args.bulk_images, 4)
    out["c_engine"] = []
    variants = [(b, True) for b in args.batch] + [(args.batch[0], False)]
    for batch, graphs in variants:
        engine.max_batch = batch
        engine.decoder.use_cuda_graph = graphs and device.type == "cuda"
        scheduler = Scheduler(engine, max_batch=batch)
        scheduler.submit(pairs(bulk_imgs[: max(1, batch // 3)], 10_000), Priority.BULK)  # warm-up
        peak_reset(device)
        bulk = pairs(bulk_imgs)
        seconds = timed(lambda: scheduler.submit(bulk, Priority.BULK), device)
        row = {"batch": batch, "cuda_graphs": engine.decoder.use_cuda_graph, "pairs": len(bulk),
               "seconds": round(seconds, 2), "pairs_per_s": round(len(bulk) / seconds, 2),
               "peak_gib": peak_gib(device)}
        out["c_engine"].append(row)
        log(f"  (c) engine: {row}")
        scheduler.close()

    # where the time goes: one bulk batch and one open task, phase by phase (GPU synchronised)
    best = max(out["c_engine"], key=lambda r: r["pairs_per_s"])
    engine.max_batch = best["batch"]
    engine.decoder.use_cuda_graph = best["cuda_graphs"]
    out["profile"] = {}
    for name, queries in [("bulk_batch", pairs(bulk_imgs[: best["batch"] // 3], 50_000)),
                          ("open_task", pairs(images(1, 7), 60_000))]:
        engine.decoder.profile = {}
        seconds = timed(lambda: engine.generate(queries), device)
        out["profile"][name] = {"pairs": len(queries), "total_s": round(seconds, 3),
                                **{k: round(v, 3) for k, v in engine.decoder.profile.items()}}
        engine.decoder.profile = None
        log(f"  profile {name}: {out['profile'][name]}")

    # open-task latency, idle and under bulk load, with the best bulk setting
    scheduler = Scheduler(engine, max_batch=best["batch"])
    open_imgs = images(args.latency_runs * 2 + 2, 5)
    key = iter(range(20_000, 30_000))

    def open_task(img):
        queries = [PointQuery(img, f"Point to the {label}.", image_key=next(key)) for label in LABELS]
        started = time.perf_counter()
        scheduler.submit(queries, Priority.INTERACTIVE)
        return time.perf_counter() - started

    open_task(open_imgs[-1])  # warm-up
    idle = [open_task(img) for img in open_imgs[: args.latency_runs]]
    out["open_task_idle"] = {"runs": len(idle), "p50_s": round(statistics.median(idle), 3),
                             "p95_s": round(percentile(idle, 95), 3)}
    log(f"  open task idle: {out['open_task_idle']}")

    bulk_pairs = pairs(images(max(8, int(best["pairs_per_s"] * args.load_seconds / 3)), 6), 40_000)
    loaded, bulk_seconds = latency_under_bulk(scheduler, bulk_pairs, open_task,
                                              open_imgs[args.latency_runs: 2 * args.latency_runs])
    out["open_task_under_bulk"] = {"runs": len(loaded), "preemptions": scheduler.stats["preemptions"], "p50_s": round(statistics.median(loaded), 3) if loaded else None,
                                   "p95_s": round(percentile(loaded, 95), 3) if loaded else None,
                                   "bulk_pairs": len(bulk_pairs), "bulk_seconds": round(bulk_seconds, 1)}
    log(f"  open task under bulk: {out['open_task_under_bulk']}")
    scheduler.close()

    # the same correctness check again, now that cached small-batch graphs have been reused
    engine.decoder.eos = torch.tensor(sorted(engine._eos_ids), device=device)
    engine.max_new_tokens = 16
    fast = [a.text for a in engine.generate(check)] + [a.text for a in engine.generate(check[:3])]
    plain = [a.text for a in engine.generate_plain(check)] + [a.text for a in engine.generate_plain(check[:3])]
    out["fast_equals_generate_after_reuse"] = f"{sum(f == p for f, p in zip(fast, plain))}/{len(fast)}"
    log(f"  fast decoder == generate() after buffer reuse: {out['fast_equals_generate_after_reuse']}")
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="8b,4b", help="comma-separated: 8b, 4b (or tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of this script with a tiny model")
    parser.add_argument("--batch", default="96,144", help="engine batch sizes (pairs) to compare")
    parser.add_argument("--plain-batch", type=int, default=48)
    parser.add_argument("--seed-images", type=int, default=2)
    parser.add_argument("--plain-images", type=int, default=32)
    parser.add_argument("--bulk-images", type=int, default=160)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--load-seconds", type=float, default=30.0, help="length of the bulk job under latency test")
    parser.add_argument("--compile", action="store_true",
                        help="compile the small-batch decode step as MOLMO_COMPILE=1 does (bench/open_task.py "
                             "compares the two; the committed throughput run was without)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    models = ["tiny"] if args.tiny else args.models.split(",")

    def log(message):
        print(message, flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "command": " ".join(["python"] + sys.argv), "new_tokens": NEW_TOKENS, "labels_per_image": len(LABELS),
        "models": [],
    }
    log(f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}")
    for size in models:
        try:
            results["models"].append(bench_model(size, args, device, dtype, log))
            gc.collect()  # the decoder's cached graphs form reference cycles with it
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # keep what was measured for the other model
            import traceback

            traceback.print_exc()
            results["models"].append({"model": size, "error": repr(exc)})
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
