"""Interactive-request latency through MolmoBackend.predict (params.context), idle and under bulk.

    python bench/interactive.py --model 8b --json $OUT/interactive.json

Full-size random-weight Molmo2 (bench/throughput.py's build), the real backend, scheduler and fast
decoder; a 1280x960 JPEG task image as a data URI (decoded on every request, as a fetched one
would be); the context Label Studio's UI sends for a typed request. Every answer is exactly
``--tokens`` new tokens (end tokens ignored: random weights stop anywhere). Then the same while a
bulk predict (3 labels per task) runs.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import build, noise_image  # noqa: E402

from molmo_backend.app.service import build_backend  # noqa: E402
from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.logs import configure_logging  # noqa: E402
from molmo_backend.settings import Settings  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="person"/><Label value="car"/><Label value="window"/>
  </KeyPointLabels>
  <TextArea name="prompt" toName="image" smart="true"/>
</View>"""
CONTEXT = {
    "result": [
        {
            "from_name": "prompt",
            "to_name": "image",
            "type": "textarea",
            "value": {"text": ["window: every window of the left building"]},
        }
    ]
}


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def stats(values):
    values = sorted(values)
    return {
        "runs": len(values),
        "p50_s": round(statistics.median(values), 3),
        "p95_s": round(values[min(len(values) - 1, int(0.95 * len(values)))], 3),
        "max_s": round(values[-1], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="8b", choices=["8b", "4b", "tiny"])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bulk-tasks", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging("WARNING", "text")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.monotonic()
    model, processor, params = build(args.model, device, dtype)
    engine = TransformersEngine(
        model,
        processor,
        model_id=f"Molmo2-{args.model}",
        revision="random",
        max_new_tokens=args.tokens,
        max_batch=128,
    )
    engine.seam.answer_tokens = args.tokens  # every answer args.tokens long (random weights stop anywhere)
    backend = build_backend(Settings(max_new_tokens=args.tokens), engine)
    print(
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, Molmo2-{args.model}, "
        f"{params / 1e9:.2f} B params, built in {time.monotonic() - t0:.0f} s",
        flush=True,
    )

    uris = [data_uri(img) for img in [noise_image((1280, 960), 1100 + i) for i in range(args.runs * 2 + 2)]]

    def interactive(uri, task_id):
        started = time.perf_counter()
        [prediction] = backend.predict(
            [{"id": task_id, "data": {"image": uri}}], context=CONTEXT, label_config=CONFIG
        )
        assert prediction["model_version"] == backend.model_version
        return time.perf_counter() - started

    interactive(uris[-1], 0)  # warm-up: graph capture for this batch shape
    idle = [interactive(uri, i) for i, uri in enumerate(uris[: args.runs])]
    out = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "model": args.model,
        "tokens": args.tokens,
        "command": " ".join(["python"] + sys.argv),
        "interactive_idle": stats(idle),
    }
    print("interactive idle:", out["interactive_idle"], flush=True)

    bulk_uris = [data_uri(img) for img in [noise_image((1280, 960), 2300 + i) for i in range(8)]]
    bulk_tasks = [
        {"id": 1000 + i, "data": {"image": bulk_uris[i % len(bulk_uris)] + " " * (i // len(bulk_uris))}}
        for i in range(args.bulk_tasks)
    ]
    done = threading.Event()
    bulk = {}

    def bulk_job():
        started = time.perf_counter()
        bulk["results"] = backend.predict(bulk_tasks, label_config=CONFIG)
        bulk["s"] = time.perf_counter() - started
        done.set()

    thread = threading.Thread(target=bulk_job)
    thread.start()
    time.sleep(2.0)
    loaded = []
    for i, uri in enumerate(uris[args.runs : 2 * args.runs]):
        if done.is_set():
            break
        loaded.append(interactive(uri, 500 + i))
        time.sleep(0.2)
    thread.join()
    out["interactive_under_bulk"] = stats(loaded) if loaded else None
    out["bulk"] = {
        "tasks": args.bulk_tasks,
        "pairs": 3 * args.bulk_tasks,
        "seconds": round(bulk["s"], 2),
        "preemptions": backend.scheduler.stats.get("preemptions"),
    }
    print("interactive under bulk:", out["interactive_under_bulk"], flush=True)
    print("bulk:", out["bulk"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
