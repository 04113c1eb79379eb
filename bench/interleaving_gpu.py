"""Issue #12's interleaving check on the GPU: CUDA-graph decode steps, compiled step on and off,
and packed steps (rows admitted while others decode in the same forward).

    python bench/interleaving_gpu.py --json $OUT/interleaving.json

The same trials as tests/engine/test_interleaving.py (tests/support/interleave.py): bulk jobs of every
size class, opened tasks arriving at random prefill and decode steps, every answer compared with
the same query run alone. The model is Molmo2-8B's geometry (vision tower, text dims) with fewer
text layers (``--layers``, so a compile takes seconds), random weights, in float32 with TF32 off:
random weights give nearly flat logits, and bf16's rounding, which differs with the number of
rows a step runs, would flip greedy picks between a query alone and in a batch; in float32 a
difference means state was shared, not rounding. ``--tiny`` checks the script on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import build, noise_image  # noqa: E402

from molmo_backend.engine import cascade, slots  # noqa: E402
from molmo_backend.engine.decoding import SlotDecoder  # noqa: E402
from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from tests.support.interleave import run_trials  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--compiled", default="0,1", help="which variants: 0 (CUDA graphs), 1 (graphs + compiled step)"
    )
    parser.add_argument(
        "--cascade-min-rows",
        type=int,
        default=1,
        help="decode steps of this many rows or more read shared prefixes once (engine/cascade.py; "
        "the engine's default is 32, which these 24-slot trials never reach)",
    )
    parser.add_argument(
        "--answer-room",
        type=int,
        default=slots.ANSWER_ROOM,
        help="answer tokens a bulk row's run holds at admission (0: runs fit the prompt, so rows "
        "outgrow them at once and move: engine/row_memory.py)",
    )
    parser.add_argument(
        "--pool-rows",
        type=int,
        default=0,
        help="a bulk pool of this many longest rows (few: rows wait for memory and are handed back)",
    )
    parser.add_argument(
        "--triton",
        default="1",
        help="1 (the server's default, MOLMO_TRITON_KERNELS): split-key decode attention and the fused "
        "rotary embedding where they pass their checks; 0: CUTLASS's kernels and Hugging Face's",
    )
    parser.add_argument(
        "--texts",
        action="store_true",
        help="force every answer as a pointing answer of 0-3 points and check guessed tokens in the "
        "decode steps (MOLMO_DRAFT): one slot several entries of a captured step",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cascade.MIN_ROWS = args.cascade_min_rows
    slots.ANSWER_ROOM = args.answer_room
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, processor, params = build("tiny" if args.tiny else "8b", device, torch.float32, layers=args.layers)
    sizes = [(300, 200), (640, 480), (1280, 960), (1920, 1080), (500, 500)]
    images = [noise_image(size, 40 + i) for i, size in enumerate(sizes)]
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python"] + sys.argv),
        "model": f"Molmo2-8B geometry, {args.layers} text layers, float32",
        "params_b": round(params / 1e9, 2),
        "variants": [],
    }
    for compiled in [flag == "1" for flag in args.compiled.split(",")]:
        engine = TransformersEngine(
            model,
            processor,
            model_id="check",
            revision="random",
            max_new_tokens=64 if args.texts else 12,
            max_batch=24,
            compile_step=compiled,
            triton_kernels=args.triton == "1",
            draft=args.texts,
        )
        if args.pool_rows:  # the same decoder over a small bulk pool (the big one freed first)
            longest, engine.decoder = engine.decoder.max_length, None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            engine.decoder = SlotDecoder(
                model,
                sorted(engine._eos_ids),
                engine._pad_id,
                bulk_slots=24,
                max_length=longest,
                bulk_tokens=args.pool_rows * longest,
                compile_step=compiled and device.type == "cuda",
                triton=args.triton == "1",
            )
        started = time.perf_counter()
        engine.warm_up()
        warm = round(time.perf_counter() - started, 1)
        engine.decoder.profile = {} if args.texts else None  # counts the guessed tokens checked
        trials = run_trials(
            engine, images, args.trials, seed_base=7000 + 100 * compiled, tolerance=1e-3, texts=args.texts
        )
        row = {
            "cuda_graphs": engine.decoder.use_cuda_graph,
            "compiled_step": engine.decoder.compile_step,
            "split_key": engine.decoder.flash,
            "fused_rotary": engine.decoder.rotary,
            "drafting": engine.drafting is not None,
            "guessed_tokens": (engine.decoder.profile or {}).get("guessed", 0),
            "cascade": engine.decoder.cascade,
            "cascade_min_rows": cascade.MIN_ROWS,
            "suffix_two_pass": engine.decoder.suffix_pass,
            "answer_room": slots.ANSWER_ROOM,
            "bulk_pool_tokens": engine.decoder.space.regions[False].count * slots.BLOCK_TOKENS,
            "moves": engine.decoder.moves,
            "waits": engine.decoder.waits,
            "warm_up_s": warm,
            "trials": len(trials),
            "answers": sum(t["answers"] for t in trials),
            "arrived_mid_bulk": sum(t["arrived_mid_bulk"] for t in trials),
            "mismatches": sum(len(t["mismatches"]) for t in trials),
            "seeds": [t["seed"] for t in trials],
            "failing_seeds": [t["seed"] for t in trials if t["mismatches"]],
        }
        results["variants"].append(row)
        print(row, flush=True)
        del engine
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
