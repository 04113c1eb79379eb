"""A model of the realistic job's makespan, calibrated on a measured step trace: which changes
would bring realistic to 0.9x mean_length (issue #13), before spending GPU time on them.

    python bench/tail_model.py [--trace bench/trace-h100-prefixes-on.json.gz]

It replays the scheduler's admission rule (engine/admission.py's own ``bulk_should_join``: a
step admits images up to the prefill token budget when a fifth of the bulk rows are free, or
all that waits fits) over the workload's real answer lengths and prefix token counts (the
benchmark's processor), with each step's GPU time from least-squares fits to the trace of the
same workload (decode steps: ``a + b x rows``; packed steps: ``c + d x prefill tokens + e x
decoding rows``), plus the run's time outside steps (the vision tower between them, start and
end) as measured, per image. It first replays the measured run and prints how far the model is
from it, then the variants: more bulk rows, a cheaper fixed part of every decode step (the
small steps of the drain are mostly that: reading the weights), more than one token a step in
the drain's small steps, both of those together, and larger jobs. ``--seeds N`` also models
the job on N other draws of the realistic workload (seeds 0 to N-1: other image sizes and answer
lengths from the same distributions), to say whether the measured draw is a typical one. A
model, not a measurement: bench/RESULTS.md says which of its answers were then measured.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import (  # noqa: E402
    LABELS,
    LONG_SEED,
    REALISTIC_SEED,
    Workload,
    build_processor,
    mean_answer,
    mean_length_text,
    noise_image,
    realistic_plan,
    realistic_text,
)

from molmo_backend.engine.admission import PREFILL_TOKENS_PER_STEP, bulk_should_join  # noqa: E402
from molmo_backend.engine.base import PointQuery  # noqa: E402
from molmo_backend.engine.drafting import GUESSES, MOST_ROWS  # noqa: E402
from molmo_backend.engine.point_drafts import replay  # noqa: E402
from molmo_backend.engine.prefill import prepare_image  # noqa: E402
from molmo_backend.engine.queue import Priority  # noqa: E402

HERE = Path(__file__).resolve().parent
#: the run the model is calibrated on: its trace and its results (walls, rows, images)
TRACE = HERE / "trace-h100-prefixes-on.json.gz"
RESULTS = HERE / "results-h100-prefixes-on.json"
#: prompt suffix tokens a row adds to its image's prefix ("Point to the person." and the template)
SUFFIX_TOKENS = 12
#: decode steps of this many rows or fewer: the drain's, whose cost is mostly reading the weights
SMALL = 32


class Waiting:
    """What the engine's admission rule asks of its queue here: how many bulk rows wait."""

    def __init__(self, rows: int):
        self.rows = rows

    def waiting(self, priority: Priority) -> int:
        return self.rows if priority == Priority.BULK else 0


#: a running bulk row, as the admission rule sees one
BULK_ROW = SimpleNamespace(interactive=False)


def both_jobs(lengths: list[int]) -> dict[str, list[int]]:
    """The answers of realistic and of mean_length (the same images)."""
    return {"realistic": lengths, "mean_length": [mean_answer(lengths)] * len(lengths)}


def fit(steps, columns) -> numpy.ndarray:
    """Least-squares coefficients of ``gpu_ms`` on 1 and ``columns`` of ``steps``."""
    x = numpy.array([[1.0] + [step[c] for c in columns] for step in steps])
    y = numpy.array([step["gpu_ms"] for step in steps])
    return numpy.linalg.lstsq(x, y, rcond=None)[0]


def makespan(
    prefixes,
    lengths,
    rows,
    decode,
    packed,
    small_cheaper_ms=0.0,
    small_tokens=1.0,
    budget=PREFILL_TOKENS_PER_STEP,
    small_entries=1.0,
    small_rows=SMALL,
):
    """(GPU seconds of the steps, steps, seconds at the last admission): the scheduler's steps
    over images with ``prefixes`` tokens each, asked ``len(LABELS)`` labels with answers of
    ``lengths`` tokens, at most ``rows`` rows running; decode steps of at most ``small_rows``
    rows ``small_cheaper_ms`` cheaper than the fit, each row taking ``small_tokens`` tokens in
    them on average (more than one: drafted tokens checked in the step; a list: each pair's
    own) and costing as ``small_entries`` rows each (a drafted token checked as one more query
    row of its slot; None: as many as its tokens)."""
    labels = len(LABELS)
    tokens_of = small_tokens if isinstance(small_tokens, list) else [small_tokens] * len(lengths)
    waiting, running = list(range(len(prefixes))), []  # running: (tokens still to make, pair)
    ms = last_admission = 0.0
    steps = 0
    while waiting or running:
        free = rows - len(running)
        join = free >= labels and bulk_should_join(
            Waiting(labels * len(waiting)), [BULK_ROW] * len(running), free
        )
        if join:
            tokens, admitted, room = 0, [], budget
            while waiting and free >= labels:
                cost = prefixes[waiting[0]] + SUFFIX_TOKENS
                if admitted and cost > room:
                    break
                image = waiting.pop(0)
                admitted += [image * labels + j for j in range(labels)]
                tokens += prefixes[image] + labels * SUFFIX_TOKENS
                room -= cost
                free -= labels
            ms += packed[0] + packed[1] * tokens + packed[2] * len(running)
            running = [(left - 1, i) for left, i in running] + [(lengths[i] - 1, i) for i in admitted]
            last_admission = ms
        else:
            small = len(running) <= small_rows
            rate = [tokens_of[i] if small else 1.0 for _, i in running]
            entries = sum(rate) if small_entries is None else len(running) * (small_entries if small else 1)
            ms += decode[0] + decode[1] * entries - (small_cheaper_ms if small else 0)
            running = [(left - step, i) for (left, i), step in zip(running, rate)]
        running = [(left, i) for left, i in running if left > 0]
        steps += 1
    return ms / 1000, steps, last_admission / 1000


def tokens_a_step(tokenizer, text: str) -> float:
    """An answer's tokens per decode step with the point format's guesses checked in each step
    (engine/drafting.py), replayed on its text (point_drafts.replay)."""
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    return len(pieces) / replay(pieces, GUESSES)[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--variant", default="d_engine", help="the traced runs' variant")
    parser.add_argument(
        "--seeds", type=int, default=0, help="also model N other draws of the realistic workload"
    )
    args = parser.parse_args()
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as file:
        traces = json.load(file)
    results = json.loads(args.results.read_text())
    rows = results["bulk_rows"]
    images = results["workloads"]["realistic"]["images"]
    processor = build_processor("8b")
    prefix_of = {}  # tokens of an image's prefix, by size

    def prefixes(sizes):
        for size in sizes:
            if size not in prefix_of:
                prefix_of[size] = prepare_image(processor, noise_image(size, 0)).length
        return [prefix_of[size] for size in sizes]

    sizes, lengths = realistic_plan(images, REALISTIC_SEED)  # the measured run's workload
    model = {}
    print(f"calibrated on {args.trace.name}: {rows} rows, {images} images")
    for name, answers in both_jobs(lengths).items():
        steps = traces[f"{args.variant}/{name}"]
        run = next(r for r in results["runs"] if r["variant"] == args.variant and r["workload"] == name)
        decode = fit([s for s in steps if s["kind"] == "decode"], ["rows"])
        packed = fit([s for s in steps if s["kind"] == "packed"], ["tokens", "rows"])
        gpu = sum(s["gpu_ms"] for s in steps) / 1000
        outside = (run["seconds"] - gpu) / images  # per image: the vision tower, start and end
        model[name] = decode, packed, outside
        seconds, count, admitted = makespan(prefixes(sizes), answers, rows, decode, packed)
        print(
            f"  {name}: decode step {decode[0]:.2f} + {decode[1]:.4f} x rows ms; packed "
            f"{packed[0]:.1f} + {packed[1]:.4f} x tokens + {packed[2]:.3f} x rows ms; outside "
            f"steps {outside * images:.2f} s. Measured {run['seconds']} s, {len(steps)} steps; "
            f"model {seconds + outside * images:.2f} s, {count} steps, last admission at {admitted:.1f} s"
        )

    def walls(
        job_sizes, job_lengths, rows, cheaper_ms=0.0, small_cheaper_ms=0.0, small_tokens=1.0, entries=1.0
    ):
        """realistic's and mean_length's modelled walls, in seconds, for a job of these images
        and answers."""
        out = []
        for name, answers in both_jobs(job_lengths).items():
            decode, packed, outside = model[name]
            decode = (decode[0] - cheaper_ms, decode[1])
            steps = makespan(
                prefixes(job_sizes),
                answers,
                rows,
                decode,
                packed,
                small_cheaper_ms,
                small_tokens,
                small_entries=entries,
            )
            out.append(steps[0] + outside * len(job_sizes))
        return out

    def ratio(job_images, rows, cheaper_ms=0.0, small_cheaper_ms=0.0, small_tokens=1.0, entries=1.0) -> str:
        """realistic and mean_length modelled, and their ratio; a job of another size is the
        bench's realistic_long of that many images."""
        job = (sizes, lengths) if job_images == images else realistic_plan(job_images, LONG_SEED)
        realistic, mean = walls(*job, rows, cheaper_ms, small_cheaper_ms, small_tokens, entries)
        return f"realistic {realistic:6.2f} s, mean_length {mean:6.2f} s: {mean / realistic:.3f}x"

    print("variants (model):")
    for more in (rows, 384, 512, 768):
        print(f"  {more} rows: {ratio(images, more)}")
    for cheaper in (1.0, 2.0, 3.0, 4.0):
        print(f"  every decode step {cheaper} ms cheaper: {ratio(images, rows, cheaper)}")
    for cheaper in (2.0, 3.0, 4.0):
        print(f"  decode steps of <= {SMALL} rows {cheaper} ms cheaper: {ratio(images, rows, 0, cheaper)}")
    # a point is ~10 tokens (" 1 461 527"); its spaces and its id follow from the format, so a
    # drafter of those makes 10 tokens in 6 steps where the model confirms them (1.67 a step)
    for tokens in (1.33, 1.67):
        print(
            f"  decode steps of <= {SMALL} rows making {tokens} tokens a row: {ratio(images, rows, 0, 0, tokens)}"
        )
    # checked in the captured decode step itself: each drafted token one more query row of its
    # slot, at its own position (10 tokens in 6 steps: 1.67 rows a row, each costing a row's share)
    print(
        f"  decode steps of <= {SMALL} rows making 1.67 tokens a row, each checked as a query row "
        f"of the step: {ratio(images, rows, 0, 0, 1.67, 1.67)}"
    )
    for cheaper in (2.0, 3.0):
        print(
            f"  decode steps of <= {SMALL} rows {cheaper} ms cheaper and making 1.67 tokens a row: "
            f"{ratio(images, rows, 0, cheaper, 1.67)}; each token a query row: "
            f"{ratio(images, rows, 0, cheaper, 1.67, 1.67)}"
        )
    for job in (960, 1440, 2880):
        print(f"  {job} images: {ratio(job, rows)}")
    # the drafter as built (engine/drafting.py): each answer's own tokens a step, replayed on
    # its pointing text, in steps of up to MOST_ROWS rows; mean_length's answers drafted too
    tokenizer = processor.tokenizer
    queries = [PointQuery(None, "", image_key=(0, i), answer_tokens=n) for i, n in enumerate(lengths)]
    texts = realistic_text(Workload("realistic", queries), tokenizer)
    drafted, rates = [], {}
    for name, job in (("realistic", texts), ("mean_length", mean_length_text(texts, tokenizer))):
        decode, packed, outside = model[name]
        rates[name] = [tokens_a_step(tokenizer, q.answer_text) for q in job.queries]
        answers = both_jobs(lengths)[name]
        steps = makespan(
            prefixes(sizes),
            answers,
            rows,
            decode,
            packed,
            0.0,
            rates[name],
            small_entries=None,
            small_rows=MOST_ROWS,
        )
        drafted.append(steps[0] + outside * images)
    print(
        f"  the drafter as built (each answer's tokens a step replayed on its pointing text, in steps "
        f"of <= {MOST_ROWS} rows, both jobs): realistic {drafted[0]:6.2f} s, mean_length "
        f"{drafted[1]:6.2f} s: {drafted[1] / drafted[0]:.3f}x ({statistics.mean(rates['realistic']):.2f} "
        f"tokens a step on realistic's answers, {rates['mean_length'][0]:.2f} on mean_length's)"
    )
    if args.seeds:
        print(f"other draws of the realistic workload ({images} images, {rows} rows; model):")
        ratios = {}
        for seed in range(args.seeds):
            job_sizes, job_lengths = realistic_plan(images, seed)
            realistic, mean = walls(job_sizes, job_lengths, rows)
            ratios[seed] = mean / realistic
            longest = max(job_lengths)
            where = job_lengths.index(longest) / len(job_lengths)
            print(
                f"  seed {seed:3d}: realistic {realistic:6.2f} s, mean_length {mean:6.2f} s: "
                f"{ratios[seed]:.3f}x (longest answer {longest} tokens, {where:.0%} into the queue)"
            )
        values = list(ratios.values())
        print(
            f"  median {statistics.median(values):.3f}x, lowest {min(values):.3f}x, "
            f"highest {max(values):.3f}x"
        )
        if REALISTIC_SEED in ratios:
            higher = sum(r > ratios[REALISTIC_SEED] for r in values)
            print(f"  the measured draw (seed {REALISTIC_SEED}): {higher} of {len(values)} model higher")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
