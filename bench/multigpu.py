"""Bulk throughput with one model replica per GPU: 1 GPU vs all visible GPUs, in one run.

    python bench/multigpu.py --model 8b --json $OUT/multigpu.json

Same workload as bench/throughput.py (full-size random-weight Molmo2 built from config, 1280x960
images, 3 labels, exactly 40 new tokens). One TransformersEngine per GPU; the scheduler feeds
them all from one queue, as ``MOLMO_GPUS=all`` does in the server.
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

from workloads import build, fixed40  # noqa: E402

NEW_TOKENS = 40

from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.engine.scheduler import Priority, Scheduler  # noqa: E402
from molmo_backend.logs import configure_logging  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="8b", choices=["8b", "4b"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images-per-gpu", type=int, default=160)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging("WARNING", "text")
    count = torch.cuda.device_count()
    engines = []
    for i in range(count):
        model, processor, _ = build(args.model, torch.device("cuda", i), torch.bfloat16)
        engine = TransformersEngine(
            model,
            processor,
            model_id=f"Molmo2-{args.model}",
            revision="random",
            max_new_tokens=NEW_TOKENS,
            max_batch=args.batch,
        )
        engine.seam.answer_tokens = NEW_TOKENS  # every answer NEW_TOKENS long (random weights stop anywhere)
        engines.append(engine)
    print(f"{count} x {torch.cuda.get_device_name(0)}, Molmo2-{args.model.upper()}", flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0),
        "gpus": count,
        "command": " ".join(["python"] + sys.argv),
        "batch": args.batch,
        "runs": [],
    }
    for n in sorted({1, count}):
        scheduler = Scheduler(engines[:n], max_batch=args.batch)
        warm = fixed40(max(1, args.batch // 3) * n, 100 + n).queries
        scheduler.submit(warm, Priority.BULK)  # warm-up: every replica captures its graphs
        bulk = fixed40(args.images_per_gpu * n, 200 + n).queries
        for i in range(n):
            torch.cuda.synchronize(i)
        started = time.perf_counter()
        scheduler.submit(bulk, Priority.BULK)
        for i in range(n):
            torch.cuda.synchronize(i)
        seconds = time.perf_counter() - started
        row = {
            "gpus": n,
            "pairs": len(bulk),
            "seconds": round(seconds, 2),
            "pairs_per_s": round(len(bulk) / seconds, 2),
            "failed_queries": scheduler.stats["failed_queries"],
        }
        results["runs"].append(row)
        print(row, flush=True)
        scheduler.close()
    if len(results["runs"]) == 2:
        results["speedup"] = round(results["runs"][1]["pairs_per_s"] / results["runs"][0]["pairs_per_s"], 2)
        print(f"speed-up {count} GPUs vs 1: {results['speedup']}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
