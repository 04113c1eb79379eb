"""Throughput and open-task latency of Molmo2 pointing, three ways, on one GPU, in one run.

    python bench/throughput.py --model 8b --json $OUT/results.json --summary $OUT/summary.json

Workloads (bench/workloads.py): ``fixed40`` (1280x960, every answer 40 tokens), ``realistic``
(mixed image sizes up to 12 MP, answer lengths as pointing gives them with a heavy tail, cap
1024) and ``mean_length`` (the realistic images, every answer at the mean length). Variants,
each on the same inputs:

(a) seed:    one (image, label) pair per ``generate()``, as Supervisely's Serve Molmo did
(b) plain:   Hugging Face ``generate()`` on left-padded batches (each runs to its longest answer)
(c) was the previous engine (one padded batch until its longest answer ends), measured beside
    (d) at commit b6d7db6 (bench/RESULTS.md) and then removed.
(d) engine:  continuous batching (``MOLMO_DECODER=fast``, the default): rows join and leave
             between decode steps, CUDA-graph decode steps; and its ablations on the realistic
             workload: prefill and decode in forwards of their own (``apart``), decode
             attention in CUTLASS's kernel instead of the split-key Triton kernels
             (``cutlass``), steps of over 64 rows reading each sequence's keys in one program
             instead of 512-key chunks (``unsplit``), Hugging Face's rotary embedding instead of one Triton kernel
             (``rotary``), no cascade attention (``flat``, with CUTLASS), vision features
             computed in the packed step instead of on the preparation thread (``ahead``), preparations on a high-priority CUDA stream
             (``priority``, an experiment), Hugging Face's unfused RMS norms (``norms``),
             prompt suffixes reading their whole slots instead of their image's prefix once
             (``suffix``), and no more bulk rows than slots of the longest row's length would
             hold, as the engine had before runs sized by each row's length (``rows``),
             image prefixes reading their keys back from their slots with CUTLASS's kernel
             instead of FlashAttention-2 (``prefixes``), and, on realistic and mean_length both,
             the GIL switched every 0.5 ms instead of Python's 5 ms (``gil``), four preparation
             threads instead of two (``workers``) and torch's CPU ops on 4 threads instead of one
             a core (``threads``): what the time between steps is (bench/RESULTS.md: the
             vision tower on the preparation stream; none of the three is faster), and 384
             and 256 bulk rows where ``--batch`` gave more (``rows384``, ``rows256``)

``--try mlp`` runs the kernel that is not on by default beside it: the MLP's SiLU and
multiplication in one kernel (the FlashAttention-2 prefixes were a trial too until measured and
turned on; the ``prefixes`` ablation times them off). ``--try draft`` runs the realistic
workload's images and point counts with each answer forced as Molmo2's pointing text
(``realistic_text``) and its mean-length twin (``mean_length_text``), one token a step
(``d_text``) and with the point format's guesses checked in the step (``d_draft``,
``MOLMO_DRAFT=1``), and the open-task latency with a three-point answer each way.

Then, for (d): open-task latency (1 task x 3 labels, 40 tokens, INTERACTIVE) idle and while the
realistic bulk job runs, a phase profile of the realistic workload, answers against plain
``generate()``, and truncated answers. ``--tiny`` runs everything on the CPU with a tiny model
to check the script. (a) and (b) run on a subset of the pairs (they are slow); pairs/s is what
is compared.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# MOLMO_BENCH_CODE=DIR: the engine of another checkout (e.g. the previous commit's), timed on the
# same workloads and card as this one (its bench/ must take the same options it is given)
if os.environ.get("MOLMO_BENCH_CODE"):
    sys.path.insert(0, os.environ["MOLMO_BENCH_CODE"])

from workloads import (  # noqa: E402
    LABELS,
    LONG_SEED,
    REALISTIC_SEED,
    build,
    fixed40,
    mean_length,
    mean_length_text,
    noise_image,
    pointing_text,
    realistic,
    realistic_text,
    subset,
)

from molmo_backend.engine import phases  # noqa: E402
from molmo_backend.engine import scheduler as scheduler_module  # noqa: E402
from molmo_backend.engine.base import PointQuery  # noqa: E402
from molmo_backend.engine.molmo2 import TransformersEngine  # noqa: E402
from molmo_backend.engine.scheduler import Priority, Scheduler  # noqa: E402
from molmo_backend.logs import configure_logging  # noqa: E402

try:  # absent from an older checkout timed through MOLMO_BENCH_CODE (skip norms there)
    from molmo_backend.engine import fused_norms  # noqa: E402
except ImportError:
    fused_norms = None
try:  # likewise (skip unsplit there)
    from molmo_backend.engine import flash_decode  # noqa: E402
except ImportError:
    flash_decode = None
try:  # likewise (no --try there)
    from molmo_backend.engine import fused_mlp  # noqa: E402
except ImportError:
    fused_mlp = None
try:  # likewise (skip rotary there)
    from molmo_backend.engine import fused_rotary  # noqa: E402
except ImportError:
    fused_rotary = None

#: options of every scheduler this run makes (``--prefill-tokens``)
SCHEDULER_OPTIONS: dict = {}
#: ``--trace``: each engine run's steps (:func:`molmo_backend.engine.phases.resolve`), by run
TRACES: dict | None = None
#: decode steps summed by their stepping rows, in these ranges
TRACE_ROWS = ((1, 8), (9, 32), (33, 96), (97, 192), (193, 256), (257, 1 << 20))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_plain(engine, queries, batch):
    """(a)/(b): generate() on left-padded batches; each batch runs to its longest answer."""
    processor, model = engine.processor, engine.model
    for start in range(0, len(queries), batch):
        chunk = queries[start : start + batch]
        tokens = max(q.answer_tokens for q in chunk)
        inputs = processor(
            images=[[q.image] for q in chunk],
            text=[engine.chat_text(q.prompt) for q in chunk],
            padding=True,
            return_tensors="pt",
        ).to(engine.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def recapture(decoder) -> None:
    """Capture every decode graph again, into a fresh memory pool (capturing into the pool of
    graphs just deleted trips an assertion in torch 2.11's caching allocator)."""
    decoder._graphs.clear()
    gc.collect()
    if decoder.use_cuda_graph:
        torch.cuda.empty_cache()
        decoder._graph_pool = torch.cuda.graph_pool_handle()
    decoder.capture_graphs()


def rate(pairs, seconds):
    return round(pairs / seconds, 2)


def alloc_retries(device) -> int:
    """Times the caching allocator has freed its blocks to retry a cudaMalloc (each one
    synchronises the GPU); 0 off CUDA."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


def scheduled(engine, workload, device, log, label, **options) -> dict:
    scheduler = Scheduler(engine, **SCHEDULER_OPTIONS, **options)
    retries = alloc_retries(device)
    peak_reset(device)
    decoder = engine.decoder
    moves, waits = getattr(decoder, "moves", 0), getattr(decoder, "waits", 0)
    if TRACES is not None:
        decoder.trace = []
    answers = []
    seconds = timed(lambda: answers.extend(scheduler.submit(workload.queries, Priority.BULK)), device)
    stats = dict(scheduler.stats)
    scheduler.close()
    steps = None
    if TRACES is not None:
        steps, decoder.trace = phases.resolve(decoder.trace), None
        TRACES[f"{label}/{workload.name}"] = steps
    row = {
        "variant": label,
        "workload": workload.name,
        "pairs": len(workload.queries),
        "seconds": round(seconds, 2),
        "pairs_per_s": rate(len(workload.queries), seconds),
        "peak_gib": peak_gib(device),
        "failed_queries": stats["failed_queries"],
        "truncated": stats["truncated"],
        "decode_steps": stats["decode_steps"],
        # rows moved to a longer run, row-steps spent waiting for memory, rows handed back
        "moves": getattr(decoder, "moves", 0) - moves,
        "waits": getattr(decoder, "waits", 0) - waits,
        "requeued": stats.get("requeued", 0),
        "gil_switch_ms": round(sys.getswitchinterval() * 1000, 3),
        "cpu_threads": torch.get_num_threads(),
        "alloc_retries": alloc_retries(device) - retries,
    }
    if steps is not None:
        row["trace"] = trace_summary(steps, seconds)
    log(f"  {label} {workload.name}: {row}")
    if workload.lengths is not None:  # forced texts: the caller checks them (not logged)
        row["texts"] = [a.text for a in answers]
    return row


def try_draft(engine, drafting, workload, tokenizer, device, log, args) -> dict:
    """``workload``'s images and point counts with forced pointing texts, and their mean-length
    twin, one token a step and with guesses (``drafting``); the open-task latency with a
    three-point answer each way. Every answer must come out as its forced text."""
    texts = realistic_text(workload, tokenizer)
    twin = mean_length_text(texts, tokenizer)
    out = {"draft_workloads": {w.name: w.describe() for w in (texts, twin)}, "draft_runs": []}
    log(f"  draft workloads: {json.dumps(out['draft_workloads'])}")
    if drafting is None:
        log("  --try draft: this tokenizer gets no guesses")
        return out
    opened = pointing_text(3, random.Random(5), "person")
    for label, guesses in (("d_text", None), ("d_draft", drafting)):
        engine.drafting = guesses
        for job in (texts, twin):
            row = scheduled(engine, job, device, log, label)
            row["answers_are_the_texts"] = row.pop("texts") == [q.answer_text for q in job.queries]
            out["draft_runs"].append(row)
            log(f"  {label} {job.name}: answers are the forced texts: {row['answers_are_the_texts']}")
        out[f"open_task_idle_{label}"] = open_task_latency(engine, device, args.latency_runs, text=opened)
        log(f"  {label} open task idle, three points: {out[f'open_task_idle_{label}']}")
    engine.drafting = None
    return out


def try_kernels(engine, model, workload, device, log, trial: str, plain: list[str]) -> dict:
    """The realistic workload with a kernel that is not on by default (``--try``): ``mlp``
    (SiLU-and-multiply in one Triton kernel, fused_mlp.py), only where its check at start passes
    (the row says whether it ran, and whether the engine's greedy answers still equal ``plain``:
    plain ``generate()``'s, taken on the default model, since the fused MLP runs in generate()
    too). The default engine is restored after."""
    default = engine.fused_mlp
    fused = default or fused_mlp.fuse(model)
    if fused != default:
        recapture(engine.decoder)
    row = scheduled(engine, workload, device, log, f"d_try_{trial}")
    row.update(
        fused_mlp=bool(fused),
        # what turning the trial on by default would need: greedy answers still plain generate()'s
        engine_equals_generate=equal_to_generate(engine, plain),
    )
    log(f"  d_try_{trial} == generate(): {row['engine_equals_generate']}")
    if fused and not default:
        fused_mlp.unfuse(model)
        recapture(engine.decoder)
    return row


def bulk_row_limit(space) -> int:
    """Most bulk rows running at once (0 in older code, which has no row space)."""
    return space.limit[False] if space is not None else 0


def set_bulk_row_limit(space, rows: int) -> None:
    space.limit[False] = rows


def both_workloads(engine, work, device, log, label) -> list[dict]:
    """Realistic and mean_length, one run each: for experiments on the time between steps,
    whose share of the two differs."""
    return [scheduled(engine, work[name], device, log, label) for name in ("realistic", "mean_length")]


def trace_summary(steps: list[dict], seconds: float) -> dict:
    """Where a traced run's wall time went: the GPU's time in packed and decode steps, the host's
    time building them, the idle gaps between steps, and the decode steps by their row count;
    the drain is the steps after the last packed one (nothing left to admit)."""

    def total(part, key):
        return round(sum(step[key] for step in part) / 1000, 3)

    def mean(part, key):
        return round(sum(step[key] for step in part) / len(part), 3)

    packed = [step for step in steps if step["kind"] == "packed"]
    decode = [step for step in steps if step["kind"] == "decode"]
    last = max((i for i, step in enumerate(steps) if step["kind"] == "packed"), default=-1)
    drain = steps[last + 1 :]
    by_rows = {}
    for low, high in TRACE_ROWS:
        part = [step for step in decode if low <= step["rows"] <= high]
        if part:
            by_rows[f"{low}-{high}"] = {
                "steps": len(part),
                **{f"mean_{key}": mean(part, key) for key in ("gpu_ms", "host_ms", "gap_ms")},
            }
    return {
        "wall_s": round(seconds, 3),
        "packed_steps": len(packed),
        "packed_gpu_s": total(packed, "gpu_ms"),
        "packed_host_s": total(packed, "host_ms"),
        "decode_steps": len(decode),
        "decode_gpu_s": total(decode, "gpu_ms"),
        "decode_host_s": total(decode, "host_ms"),
        "gap_s": total(steps, "gap_ms"),
        "drain_steps": len(drain),
        "drain_s": round(total(drain, "gpu_ms") + total(drain, "host_ms") + total(drain, "gap_ms"), 3),
        "decode_by_rows": by_rows,
    }


def open_task_latency(engine, device, runs, bulk=None, gap=0.2, seed=7, text=None) -> dict:
    """Seconds for 1 task x 3 labels (40 tokens each, or each answer ``text``) at INTERACTIVE
    priority, one after another; with ``bulk``, while that job runs (the timings end when it
    does)."""
    scheduler = Scheduler(engine, **SCHEDULER_OPTIONS)
    keys = iter(range(10**6))
    images = [noise_image((1280, 960), seed * 1000 + i) for i in range(runs + 1)]

    def one(img):
        queries = [
            PointQuery(
                img,
                f"Point to the {label}.",
                image_key=("open", next(keys)),
                answer_tokens=None if text else 40,
                answer_text=text,
            )
            for label in LABELS
        ]
        started = time.perf_counter()
        answers = scheduler.submit(queries, Priority.INTERACTIVE)
        assert all(a.error is None for a in answers), answers
        return time.perf_counter() - started

    one(images[-1])  # warm-up
    done: dict = {}
    thread = None
    if bulk is not None:

        def bulk_job():
            started = time.perf_counter()
            scheduler.submit(bulk.queries, Priority.BULK)
            done["bulk_s"] = time.perf_counter() - started

        thread = threading.Thread(target=bulk_job)
        thread.start()
        time.sleep(2.0)  # let the bulk job fill its slots
    seconds = []
    for img in images[:runs]:
        if thread is not None and not thread.is_alive():
            break
        seconds.append(one(img))
        if thread is not None:
            time.sleep(gap)
    if thread is not None:
        thread.join()
    stats = dict(scheduler.stats)
    scheduler.close()
    out = {
        "runs": len(seconds),
        "p50_s": round(statistics.median(seconds), 3) if seconds else None,
        "p95_s": round(percentile(seconds, 95), 3) if seconds else None,
        "max_s": round(max(seconds), 3) if seconds else None,
    }
    if bulk is not None:
        out.update(
            bulk_pairs=len(bulk.queries),
            bulk_s=round(done.get("bulk_s", 0), 1),
            bulk_paused_steps=stats["bulk_paused_steps"],
        )
    return out


CHECK_SIZES = [(1280, 960), (640, 480)]


def greedy_texts(engine, plain: bool) -> list[str]:
    """Greedy answers (real end tokens, 16 new) to the check's six pairs, bf16: the engine's own
    steps, or plain generate() through the model's modules."""
    check = [
        PointQuery(noise_image(size, 99 + i), f"Point to the {label}.", image_key=("check", i))
        for i, size in enumerate(CHECK_SIZES)
        for label in LABELS
    ]
    cap = engine.max_new_tokens
    engine.max_new_tokens = 16
    try:
        answers = engine.generate_plain(check) if plain else engine.generate(check)
    finally:
        engine.max_new_tokens = cap
    return [a.text for a in answers]


def equal_to_generate(engine, plain: list[str]) -> str:
    """How many of the engine's greedy answers equal ``plain`` (plain generate()'s)."""
    fast = greedy_texts(engine, plain=False)
    return f"{sum(f == p for f, p in zip(fast, plain))}/{len(plain)}"


def profile(engine, workload, device) -> dict:
    """Where the time goes for the realistic workload (GPU synchronised after each phase: a
    little slower than the timed run): packed steps (prefill, with decode rows riding along) and
    decode-only steps."""
    engine.decoder.profile = {}
    scheduler = Scheduler(engine, **SCHEDULER_OPTIONS)
    seconds = timed(lambda: scheduler.submit(workload.queries, Priority.BULK), device)
    scheduler.close()
    phases = engine.decoder.profile
    engine.decoder.profile = None
    prefill_tokens = sum(engine.prefill_cost(q) for q in workload.queries[:: len(LABELS)])
    out = {
        "total_s": round(seconds, 2),
        **{k: round(v, 3) for k, v in phases.items()},
        "prefill_tokens": prefill_tokens,
    }
    if phases.get("packed"):
        # matmul work of the packed forwards: 2 x the language model's weights a token (the
        # vision tower's work on top is not counted), over their synchronised seconds
        lm = engine.model.model.language_model
        params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
        out["packed_lm_tflops"] = round(2 * params * phases["packed_tokens"] / phases["packed"] / 1e12, 1)
    if phases.get("steps"):
        out["decode_ms_per_step"] = round(1000 * phases.get("decode", 0) / phases["steps"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="8b", help="8b or 4b (tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of this script with a tiny model")
    parser.add_argument(
        "--images",
        type=int,
        default=160,
        help="images of the fixed40 workload and of the "
        "realistic job behind the open-task latency (3 pairs each)",
    )
    parser.add_argument(
        "--realistic-images",
        type=int,
        default=480,
        help="images of the realistic and mean_length workloads: a bulk retrieve of that many tasks",
    )
    parser.add_argument(
        "--long-images",
        type=int,
        default=0,
        help="images of realistic_long and mean_length_long (--only names them): a larger bulk "
        "retrieve, over which the heavy tail's drain is paid once",
    )
    parser.add_argument("--batch", type=int, default=128, help="bulk rows of (d)")
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        help="prefill tokens a packed step may admit (the engine's default: 8192); fewer shorten "
        "an opened task's wait for the step in flight",
    )
    parser.add_argument("--plain-batch", type=int, default=48)
    parser.add_argument("--seed-pairs", type=int, default=6)
    parser.add_argument("--plain-pairs", type=int, default=48)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: a,b,latency,profile,apart,cutlass,unsplit,rotary,"
        "flat,ahead,priority,norms,suffix,rows,prefixes,gil,workers,threads,rows384,rows256",
    )
    parser.add_argument(
        "--only",
        default="fixed40,realistic,mean_length,realistic_small",
        help="comma-separated workloads the engine runs",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--summary", type=Path, help="write the summary (issue #13's keys) here")
    parser.add_argument(
        "--try",
        dest="trials",
        default="",
        choices=["", "mlp", "draft"],
        help="what is not on by default: mlp (SiLU-and-multiply in one kernel, on the realistic "
        "workload); draft (guessed tokens of pointing answers, on forced pointing texts)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        help="write every engine run's steps here (GPU, host and idle milliseconds of each, from "
        "CUDA events) and a summary of them into each run's results",
    )
    args = parser.parse_args()
    global TRACES
    if args.trace:
        TRACES = {}
    # the engine's warnings with their fields (a failed query's error), as the server logs them
    configure_logging("WARNING", "text")
    logging.getLogger("molmo_backend.engine.fused_rotary").setLevel(logging.INFO)  # its check's result
    skip = set(filter(None, args.skip.split(",")))
    if args.prefill_tokens:
        SCHEDULER_OPTIONS["prefill_tokens"] = args.prefill_tokens
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = "tiny" if args.tiny else args.model

    def log(message):
        print(message, flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "command": " ".join(["python"] + sys.argv),
        "labels_per_image": len(LABELS),
        "scheduler_options": SCHEDULER_OPTIONS,
    }

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        if args.trace:
            args.trace.write_text(json.dumps(TRACES))

    log(f"{results['device']}, torch {results['torch']}, transformers {results['transformers']}")
    started = time.perf_counter()
    model, processor, params = build(size, device, dtype)
    results.update(
        model=f"Molmo2-{size.upper()}" if size != "tiny" else "tiny",
        params_b=round(params / 1e9, 2),
        build_s=round(time.perf_counter() - started, 1),
    )
    engine = TransformersEngine(
        model,
        processor,
        model_id=results["model"],
        revision="random",
        max_new_tokens=1024,
        max_batch=args.batch,
        triton_kernels=True,  # the default (MOLMO_TRITON_KERNELS); the cutlass ablation turns it off
        draft=True,  # only --try draft uses it (MOLMO_DRAFT is off by default)
    )
    drafting, engine.drafting = engine.drafting, None
    decoder = engine.decoder
    longest = getattr(decoder, "max_length", None) or decoder.slot_length  # older code: slot_length
    results["bulk_rows"], results["longest_row_tokens"] = engine.max_batch, longest
    space = getattr(decoder, "space", None)  # runs sized by each row's length (not in older code)
    results["bulk_pool_tokens"] = space.regions[False].count * 128 if space else engine.max_batch * longest
    results["varlen_attention"] = engine.decoder.varlen
    results["cascade_attention"] = getattr(engine.decoder, "cascade", None)
    results["split_key_attention"] = getattr(engine.decoder, "flash", None)  # flash_decode.py
    results["fused_rotary"] = getattr(engine.decoder, "rotary", None)  # fused_rotary.py
    started = time.perf_counter()
    results["graphs_captured"] = engine.decoder.capture_graphs()
    results["capture_s"] = round(time.perf_counter() - started, 1)
    log(
        f"{results['model']}: {results['params_b']} B params, built in {results['build_s']} s; "
        f"up to {engine.max_batch} bulk rows in a pool of {results['bulk_pool_tokens']} tokens (longest "
        f"row {longest}), varlen attention "
        f"{engine.decoder.varlen}, cascade {results['cascade_attention']}, rotary {results['fused_rotary']}; "
        f"{results['graphs_captured']} decode graphs captured in {results['capture_s']} s"
    )
    plain_answers = greedy_texts(engine, plain=True)  # the default model's, for the trials too
    results["engine_equals_generate"] = equal_to_generate(engine, plain_answers)
    log(f"  engine == generate(): {results['engine_equals_generate']}")

    work = {
        "fixed40": fixed40(args.images, 1),
        "realistic": realistic(args.realistic_images, REALISTIC_SEED),
        "realistic_small": realistic(args.images, 5),
    }
    work["realistic_small"].name = "realistic_small"
    work["mean_length"] = mean_length(work["realistic"])
    if args.long_images:
        work["realistic_long"] = realistic(args.long_images, LONG_SEED)
        work["mean_length_long"] = mean_length(work["realistic_long"])
        work["realistic_long"].name, work["mean_length_long"].name = "realistic_long", "mean_length_long"
    results["workloads"] = {name: w.describe() for name, w in work.items()}
    log(f"  workloads: {json.dumps(results['workloads'])}")
    results["runs"] = []
    save()

    # (d) the engine, first: its figures are the ones that matter
    warm = realistic(12, 99)
    warm_up = Scheduler(engine, **SCHEDULER_OPTIONS)  # prepare threads, allocator, any missing graph
    warm_up.submit(warm.queries)
    warm_up.close()  # its worker holds the engine: left open, (b) ran out of memory on an H100
    del warm_up  # and so does the scheduler itself: kept, (b) ran out of memory at 256 rows
    for name in filter(None, args.only.split(",")):
        results["runs"].append(scheduled(engine, work[name], device, log, "d_engine"))
        save()
    if "apart" not in skip:  # the same engine with prefill and decode in forwards of their own
        results["runs"].append(
            scheduled(engine, work["realistic"], device, log, "d_apart_steps", packed_steps=False)
        )
        save()
    if "cutlass" not in skip and getattr(engine.decoder, "flash", False):
        engine.decoder.flash = False  # decode attention in CUTLASS's kernel, with the cascade
        recapture(engine.decoder)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_cutlass_decode"))
        engine.decoder.flash = True
        recapture(engine.decoder)
        save()
    if "unsplit" not in skip and getattr(engine.decoder, "flash", False) and flash_decode is not None:
        big = flash_decode.BIG_CHUNK  # steps over SMALL_STEP rows read each sequence in one program
        flash_decode.BIG_CHUNK = 1 << 20
        recapture(engine.decoder)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_unsplit_big_steps"))
        flash_decode.BIG_CHUNK = big
        recapture(engine.decoder)
        save()
    if "prefixes" not in skip and getattr(engine.decoder, "prefix_flash", False):
        engine.decoder.prefix_flash = False  # image prefixes read back from their slots (CUTLASS)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_slot_prefixes"))
        engine.decoder.prefix_flash = True
        save()
    # the time between steps: each knob set for one run of both workloads, then put back
    # (older code timed through MOLMO_BENCH_CODE has no PREPARE_WORKERS: skipped there)
    experiments = {
        "gil": ("d_gil_switch_0.5ms", sys.getswitchinterval, sys.setswitchinterval, 0.0005),
        "workers": (
            "d_prepare_workers_4",
            lambda: getattr(scheduler_module, "PREPARE_WORKERS", None),
            lambda value: setattr(scheduler_module, "PREPARE_WORKERS", value),
            4,
        ),
        "threads": ("d_cpu_threads_4", torch.get_num_threads, torch.set_num_threads, 4),
        # fewer bulk rows than --batch, in the same process and pool: does the heavy tail's drain
        # shrink when more rows run (its last long answers admitted earlier)?
        **{
            f"rows{rows}": (
                f"d_rows_{rows}",
                lambda rows=rows, limit=bulk_row_limit(space): limit if limit > rows else None,
                functools.partial(set_bulk_row_limit, space),
                rows,
            )
            for rows in (384, 256)
        },
    }
    for part, (label, get, put, value) in experiments.items():
        if part in skip or (before := get()) is None:
            continue
        put(value)
        results["runs"] += both_workloads(engine, work, device, log, label)
        put(before)
        save()
    if args.trials == "mlp":  # the kernel not on by default
        results["runs"].append(
            try_kernels(engine, model, work["realistic"], device, log, args.trials, plain_answers)
        )
        save()
    if args.trials == "draft":
        results.update(try_draft(engine, drafting, work["realistic"], processor.tokenizer, device, log, args))
        save()
    if "rotary" not in skip and results["fused_rotary"]:  # Hugging Face's ten rotary kernels
        fused_rotary.uninstall()
        recapture(engine.decoder)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_unfused_rotary"))
        fused_rotary.install()
        recapture(engine.decoder)
        save()
    if "flat" not in skip and results["cascade_attention"]:  # every row reads all its keys
        flash, engine.decoder.flash = engine.decoder.flash, False  # CUTLASS's kernel, no cascade
        engine.decoder.cascade = False
        engine.decoder.capture_graphs()  # the steps without the cascade (graphs are keyed by it)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_flat_decode"))
        engine.decoder.cascade, engine.decoder.flash = True, flash
        save()
    if "ahead" not in skip:  # vision features computed in the packed step, as before
        engine.features_ahead = False
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_features_in_step"))
        engine.features_ahead = True
        save()
    if "priority" not in skip and device.type == "cuda":  # preparations on a high-priority stream
        # (not the engine's default: an experiment on the preparation wait of the profile)
        normal = engine._prepare_stream
        engine._prepare_stream = torch.cuda.Stream(device, priority=-1)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_prepare_high_priority"))
        engine._prepare_stream = normal
        save()
    if "norms" not in skip and fused_norms is not None:  # Hugging Face's RMS norms, seven kernels each
        fused_norms.unfuse(model)
        recapture(engine.decoder)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_unfused_norms"))
        fused_norms.fuse(model)
        recapture(engine.decoder)
        save()
    if "suffix" not in skip and getattr(engine.decoder, "suffix_pass", False):
        engine.decoder.suffix_pass = False  # every suffix row reads its whole slot (dense SDPA)
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_suffix_dense"))
        engine.decoder.suffix_pass = True
        save()
    if "rows" not in skip and space is not None:  # as many rows as longest-length slots would hold
        limit = space.limit[False]
        space.limit[False] = min(limit, results["bulk_pool_tokens"] // longest)
        results["rows_as_slots"] = space.limit[False]
        results["runs"].append(scheduled(engine, work["realistic"], device, log, "d_rows_as_slots"))
        space.limit[False] = limit
        save()
    if "latency" not in skip:
        results["open_task_idle"] = open_task_latency(engine, device, args.latency_runs)
        log(f"  (d) open task idle: {results['open_task_idle']}")
        # long enough for the 20 runs (~1 s each with its gap): the timings end when it does
        bulk = realistic(args.realistic_images // 2, 3)
        results["open_task_under_bulk"] = open_task_latency(engine, device, args.latency_runs, bulk=bulk)
        log(f"  (d) open task under realistic bulk: {results['open_task_under_bulk']}")
        save()
    if "profile" not in skip:
        results["profile_realistic"] = profile(engine, realistic(args.images, 4), device)
        log(f"  (d) profile, realistic: {results['profile_realistic']}")
        save()
    decoder = weakref.ref(engine.decoder)
    del engine, space
    gc.collect()
    results["engine_freed"] = decoder() is None
    log(f"  engine freed before (b): {results['engine_freed']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # the engine's cache pool and graphs must be gone before (b), or it runs out of memory
        results["allocated_after_engine_gib"] = round(torch.cuda.memory_allocated() / 2**30, 1)
        log(f"  allocated after the engine is gone: {results['allocated_after_engine_gib']} GiB")

    plain_engine = TransformersEngine(
        model, processor, model_id=results["model"], revision="random", decoder="generate"
    )

    # (a), (b): plain generate()
    if "b" not in skip:
        for name in ("fixed40", "realistic"):
            part = subset(work[name], args.plain_pairs)
            run_plain(plain_engine, subset(work["fixed40"], 2).queries, 2)  # warm-up
            peak_reset(device)
            seconds = timed(lambda: run_plain(plain_engine, part.queries, args.plain_batch), device)
            row = {
                "variant": "b_plain_generate",
                "workload": name,
                "pairs": len(part.queries),
                "batch": args.plain_batch,
                "seconds": round(seconds, 2),
                "pairs_per_s": rate(len(part.queries), seconds),
                "peak_gib": peak_gib(device),
            }
            results["runs"].append(row)
            log(f"  (b) {row}")
            save()
    if "a" not in skip:
        for name in ("fixed40", "realistic"):
            part = subset(work[name], args.seed_pairs)
            run_plain(plain_engine, part.queries[:1], 1)  # warm-up
            seconds = timed(lambda: run_plain(plain_engine, part.queries, 1), device)
            row = {
                "variant": "a_seed",
                "workload": name,
                "pairs": len(part.queries),
                "seconds": round(seconds, 2),
                "pairs_per_s": rate(len(part.queries), seconds),
            }
            results["runs"].append(row)
            log(f"  (a) {row}")
            save()

    def pick(variant, workload):
        return next(
            (
                r["pairs_per_s"]
                for r in results["runs"]
                if r["variant"] == variant and r["workload"] == workload
            ),
            None,
        )

    summary = {
        "card": results["device"],
        "model": results["model"],
        "date": results["date"],
        "realistic_pairs_per_s": pick("d_engine", "realistic"),
        "realistic_apart_steps_pairs_per_s": pick("d_apart_steps", "realistic"),
        "realistic_cutlass_decode_pairs_per_s": pick("d_cutlass_decode", "realistic"),
        "realistic_unfused_rotary_pairs_per_s": pick("d_unfused_rotary", "realistic"),
        "realistic_unsplit_big_steps_pairs_per_s": pick("d_unsplit_big_steps", "realistic"),
        "realistic_try_mlp_pairs_per_s": pick("d_try_mlp", "realistic"),
        **{
            f"{row['workload']}{'_draft' if row['variant'] == 'd_draft' else ''}_pairs_per_s": row[
                "pairs_per_s"
            ]
            for row in results.get("draft_runs", [])
        },
        "realistic_flat_decode_pairs_per_s": pick("d_flat_decode", "realistic"),
        "realistic_features_in_step_pairs_per_s": pick("d_features_in_step", "realistic"),
        "realistic_unfused_norms_pairs_per_s": pick("d_unfused_norms", "realistic"),
        "realistic_prepare_high_priority_pairs_per_s": pick("d_prepare_high_priority", "realistic"),
        "realistic_suffix_dense_pairs_per_s": pick("d_suffix_dense", "realistic"),
        "realistic_rows_as_slots_pairs_per_s": pick("d_rows_as_slots", "realistic"),
        "realistic_slot_prefixes_pairs_per_s": pick("d_slot_prefixes", "realistic"),
        **{
            f"{name}_{variant}_pairs_per_s": pick(f"d_{variant}", name)
            for variant in (label.removeprefix("d_") for label, *_ in experiments.values())
            for name in ("realistic", "mean_length")
        },
        "cascade_attention": results.get("cascade_attention"),
        "split_key_attention": results.get("split_key_attention"),
        "fused_rotary": results.get("fused_rotary"),
        "realistic_small_pairs_per_s": pick("d_engine", "realistic_small"),
        "fixed40_pairs_per_s": pick("d_engine", "fixed40"),
        "mean_length_pairs_per_s": pick("d_engine", "mean_length"),
        "realistic_long_pairs_per_s": pick("d_engine", "realistic_long"),
        "mean_length_long_pairs_per_s": pick("d_engine", "mean_length_long"),
        "plain_generate_realistic_pairs_per_s": pick("b_plain_generate", "realistic"),
        "plain_generate_fixed40_pairs_per_s": pick("b_plain_generate", "fixed40"),
        "seed_realistic_pairs_per_s": pick("a_seed", "realistic"),
        "open_task_idle_p50_s": results.get("open_task_idle", {}).get("p50_s"),
        "open_task_under_bulk_p50_s": results.get("open_task_under_bulk", {}).get("p50_s"),
        "open_task_under_bulk_p95_s": results.get("open_task_under_bulk", {}).get("p95_s"),
        "truncated_answers": sum(
            r.get("truncated", 0) for r in results["runs"] if r["variant"] == "d_engine"
        ),
        "engine_equals_generate": results["engine_equals_generate"],
    }
    results["summary"] = summary
    save()
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
