"""Start-up time with and without MOLMO_COMPILE, cold and warm compile caches, and what the
compiled step buys an opened task.

    python bench/startup.py save /tmp/m8b --model 8b        # random-weight checkpoint on disk
    python bench/startup.py load /tmp/m8b --compile 1 --cache /tmp/inductor   # cold cache
    python bench/startup.py load /tmp/m8b --compile 1 --cache /tmp/inductor   # warm cache
    python bench/startup.py load /tmp/m8b --compile 0

``load`` is what the server's model-loader thread does before /health turns UP:
``TransformersEngine.load`` (from_pretrained, move to the GPU, cache slots, warm-up: the compile
when asked), each in a fresh process, so the cold/warm difference is the compile caches'
(TORCHINDUCTOR_CACHE_DIR and torch's FX graph cache under it). Then open-task latency (1 task x 3
labels, 40 tokens each, INTERACTIVE) idle, with that process's decode step. One JSON line per
run goes to ``--json`` (appended).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def save(args) -> dict:
    import torch
    from workloads import build

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    model, processor, params = build(
        args.model, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    )
    built = time.perf_counter() - started
    model.save_pretrained(args.path)
    processor.save_pretrained(args.path)
    return {
        "step": "save",
        "params_b": round(params / 1e9, 2),
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - started - built, 1),
    }


def load(args) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache)
    cold = not Path(args.cache).exists() or not any(Path(args.cache).iterdir())
    started = time.perf_counter()
    import torch
    from workloads import LABELS, noise_image

    from molmo_backend.engine.base import PointQuery
    from molmo_backend.engine.molmo2 import TransformersEngine
    from molmo_backend.engine.scheduler import Priority, Scheduler

    imported = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    engine = TransformersEngine.load(
        args.path,
        device="cuda" if cuda else "cpu",
        dtype=torch.bfloat16 if cuda else torch.float32,
        max_new_tokens=1024,
        max_batch=128,
        compile_step=args.compile == "1",
    )
    ready = time.perf_counter() - started
    scheduler = Scheduler(engine)
    seconds = []
    for i in range(args.runs + 1):
        image = noise_image((1280, 960), 500 + i)
        queries = [
            PointQuery(image, f"Point to the {label}.", image_key=i, answer_tokens=40) for label in LABELS
        ]
        t0 = time.perf_counter()
        scheduler.submit(queries, Priority.INTERACTIVE)
        seconds.append(time.perf_counter() - t0)
    scheduler.close()
    seconds = seconds[1:]  # the first one captures its graphs
    return {
        "step": "load",
        "compile": args.compile,
        "inductor_cache": "cold" if cold else "warm",
        "compiled_step": engine.decoder.compile_step,
        "import_s": round(imported, 1),
        "ready_s": round(ready, 1),
        "open_task_idle_p50_s": round(statistics.median(seconds), 3),
        "open_task_idle_max_s": round(max(seconds), 3),
        "runs": len(seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["save", "load"])
    parser.add_argument("path")
    parser.add_argument("--model", default="8b", help="8b, 4b, or tiny (a CPU check of this script)")
    parser.add_argument("--compile", default="1", choices=["0", "1"])
    parser.add_argument("--cache", default="/tmp/inductor-cache")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    row = save(args) if args.step == "save" else load(args)
    row.update(date=datetime.date.today().isoformat(), command=" ".join(["python"] + sys.argv))
    print(json.dumps(row), flush=True)
    if args.json:
        with args.json.open("a") as out:
            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
