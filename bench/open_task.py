"""Open-task latency with and without the compiled decode step (MOLMO_COMPILE), side by side.

    python bench/open_task.py --model 8b --json $OUT/open_task.json

One model, one card, the same inputs for both variants (those of bench/throughput.py: full-size
Molmo2 with random weights, 1280x960 images, 3 labels, every answer exactly 40 new tokens):

  eager:    the small-batch decode step captured as a CUDA graph (MOLMO_COMPILE=0)
  compiled: the same step through torch.compile (inductor, dynamic shapes), then captured

Per variant: warm-up seconds (the compile, for the compiled one), open-task latency (1 task x 3
labels through the scheduler) p50/p95 idle, a phase profile of one open task, and the answers
against plain ``generate()``; for the compiled one also the latency while a bulk job runs, and
whether its 40-token answers equal the eager step's. ``--tiny`` checks the script on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import (LABELS, NEW_TOKENS, build, images, latency_under_bulk, pairs,  # noqa: E402
                        percentile, sync)

from molmo_backend.engine.base import PointQuery  # noqa: E402
from molmo_backend.engine.scheduler import Priority, Scheduler  # noqa: E402
from molmo_backend.engine.transformers_engine import TransformersEngine  # noqa: E402


def make_engine(model, processor, name, compiled, args, device):
    engine = TransformersEngine(model, processor, model_id=name, revision="random", max_new_tokens=NEW_TOKENS,
                                max_batch=args.batch, compile_step=compiled)
    if device.type == "cpu":  # the CPU has no graphs to capture: run the slot path directly
        engine.decoder.reuse_buffers = True
        engine.decoder.compile_step = compiled
    return engine


def forced(engine, on: bool, device) -> None:
    """Every answer runs to NEW_TOKENS (on), or stops at the real end token (off)."""
    engine.decoder.eos = torch.tensor([-1] if on else sorted(engine._eos_ids), device=device)


def variant(engine, label, args, device, log, out, keys):
    row = {"variant": label}
    out["variants"].append(row)
    forced(engine, True, device)
    started = time.perf_counter()
    engine.warm_up()
    row["warm_up_s"] = round(time.perf_counter() - started, 1)
    row["compiled"] = engine.decoder.compile_step
    scheduler = Scheduler(engine, max_batch=args.batch)

    def open_task(img):
        queries = [PointQuery(img, f"Point to the {lab}.", image_key=next(keys)) for lab in LABELS]
        started = time.perf_counter()
        answers = scheduler.submit(queries, Priority.INTERACTIVE)
        return time.perf_counter() - started, answers

    pictures = images(args.runs + 2, 5)
    for img in pictures[args.runs:]:  # first calls capture this shape's graphs
        open_task(img)
    idle, texts = [], []
    for img in pictures[: args.runs]:
        seconds, answers = open_task(img)
        idle.append(seconds)
        texts.append([a.text for a in answers])
    row["open_task_idle"] = {"runs": len(idle), "p50_s": round(statistics.median(idle), 3),
                             "p95_s": round(percentile(idle, 95), 3)}
    log(f"  {label}: warm-up {row['warm_up_s']} s, open task idle {row['open_task_idle']}")

    engine.decoder.profile = {}
    sync(device)
    started = time.perf_counter()
    engine.generate(pairs(pictures[:1], next(keys)))
    sync(device)
    row["profile_open_task"] = {"total_s": round(time.perf_counter() - started, 3),
                                **{k: round(v, 3) for k, v in engine.decoder.profile.items()}}
    if row["profile_open_task"].get("steps"):
        row["ms_per_decode_step"] = round(1000 * row["profile_open_task"].get("decode", 0.0)
                                          / max(1, row["profile_open_task"]["steps"] - 1), 2)
    engine.decoder.profile = None
    log(f"  {label}: profile {row['profile_open_task']}")

    # answers against plain generate() with real end tokens (a batch of 6 pairs: a slot of 8)
    forced(engine, False, device)
    engine.max_new_tokens = 16
    check = pairs(images(2, 99), next(keys))
    fast = [a.text for a in engine.generate(check)]
    plain = [a.text for a in engine.generate_plain(check)]
    row["fast_equals_generate"] = f"{sum(f == p for f, p in zip(fast, plain))}/{len(check)}"
    engine.max_new_tokens = NEW_TOKENS
    forced(engine, True, device)
    log(f"  {label}: == generate(): {row['fast_equals_generate']}")

    if args.load_seconds > 0 and label == "compiled":
        bulk = pairs(images(max(4, int(args.bulk_rate * args.load_seconds / len(LABELS))), 6), 40_000)
        loaded, bulk_seconds = latency_under_bulk(scheduler, bulk, lambda img: open_task(img)[0],
                                                  images(args.runs, 8))
        row["open_task_under_bulk"] = {
            "runs": len(loaded), "p50_s": round(statistics.median(loaded), 3) if loaded else None,
            "p95_s": round(percentile(loaded, 95), 3) if loaded else None, "bulk_pairs": len(bulk),
            "bulk_seconds": round(bulk_seconds, 1), "preemptions": scheduler.stats["preemptions"]}
        log(f"  {label}: open task under bulk {row['open_task_under_bulk']}")
    scheduler.close()
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="8b", help="8b or 4b (tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of this script with a tiny model")
    parser.add_argument("--batch", type=int, default=144, help="engine batch size (pairs) for bulk work")
    parser.add_argument("--runs", type=int, default=20, help="open tasks timed per measurement")
    parser.add_argument("--load-seconds", type=float, default=20.0,
                        help="length of the bulk job under the compiled variant's latency test; 0 skips it")
    parser.add_argument("--bulk-rate", type=float, default=37.0,
                        help="bulk pairs/s to size that job by (bench/RESULTS.md: 8B on an H100)")
    parser.add_argument("--json", type=Path, help="write the results here (after every step)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = "tiny" if args.tiny else args.model

    def log(message):
        print(message, flush=True)

    out = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "command": " ".join(["python"] + sys.argv), "model": size, "new_tokens": NEW_TOKENS,
           "labels_per_image": len(LABELS), "variants": []}
    log(f"{out['device']}, torch {out['torch']}, transformers {out['transformers']}")
    model, processor, params = build(size, device, dtype)
    out["params_b"] = round(params / 1e9, 2)
    keys = iter(range(100_000, 10_000_000))
    answers = {}
    for label, compiled in [("eager", False), ("compiled", True)]:
        try:
            engine = make_engine(model, processor, f"Molmo2-{size}", compiled, args, device)
            answers[label] = variant(engine, label, args, device, log, out, keys)
        except Exception as exc:  # keep what the other variant measured
            traceback.print_exc()
            out["variants"].append({"variant": label, "error": repr(exc)})
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    if len(answers) == 2:
        same = sum(a == b for a, b in zip(answers["eager"], answers["compiled"]))
        out["compiled_equals_eager_40_tokens"] = f"{same}/{len(answers['eager'])} open tasks"
        log(f"compiled == eager on the timed open tasks: {out['compiled_equals_eager_40_tokens']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
