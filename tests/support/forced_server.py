"""Serve the backend (real gunicorn, real HTTP) on the demo model with answers forced per label.

    python tests/support/forced_server.py --port 9191 --answers answers.json

answers.json maps a label (found in the prompt) to the answer text Molmo should give, e.g.
{"cat": "<points coords=\\"1 1 250 500\\">cat</points>", "dog": "There are none."}.
Labels not in the file get the random model's own answer. Other settings come from the
environment as for ``molmo-backend serve``; MOLMO_DEMO is forced to random (the untrained tiny model).

Fault injection (tests only, never in the product package): ``MOLMO_TEST_FAULTS`` holds a JSON
list of rules; a prefill (the rows the scheduler admits together) or, for a plain engine, a
``generate`` batch that matches a rule fails or sleeps as the rule says, before the model runs.
A rule matches on any of

- ``"image_size": [w, h]``: a query's image is exactly w x h pixels (a "poison" task);
- ``"prompt": "text"``: a query's prompt contains the text;
- ``"batch_over": n``: the prefill or batch holds more than n queries (out of memory that depends
  on batch size, as on a real GPU: the scheduler's split-and-retry must then deliver every answer);

and does ``"error": "oom"`` (``torch.cuda.OutOfMemoryError``), ``"error": "runtime"``
(``RuntimeError``), or ``"sleep": seconds`` (a slow prefill: every admission of matching rows
waits that long). Every injected fault is logged as
``injected fault``, so tests can count them in the server's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from molmo_backend.app.serve import serve  # noqa: E402
from molmo_backend.settings import Settings  # noqa: E402

log = logging.getLogger("tests.faults")


def _matches(rule: dict, queries) -> bool:
    if "batch_over" in rule and len(queries) > int(rule["batch_over"]):
        return True
    if "image_size" in rule and any(list(q.image.size) == list(rule["image_size"]) for q in queries):
        return True
    if "prompt" in rule and any(rule["prompt"] in q.prompt for q in queries):
        return True
    return False


def inject_faults(engine, rules: list[dict]):
    """Make matching work fail or sleep before the model runs: each prefill of a step engine
    (the rows admitted together) or each ``generate`` batch of a plain engine."""
    import torch

    def check(queries):
        for rule in rules:
            if not _matches(rule, queries):
                continue
            log.warning("injected fault", extra={"rule": rule, "batch_size": len(queries)})
            if "sleep" in rule:
                time.sleep(float(rule["sleep"]))
            if rule.get("error") == "oom":
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (injected by MOLMO_TEST_FAULTS)"
                )
            if rule.get("error") == "runtime":
                raise RuntimeError("injected failure (MOLMO_TEST_FAULTS)")

    if engine.stepwise:
        real_prefill = engine.prefill

        def prefill(rows):
            check([row.query for row in rows])
            return real_prefill(rows)

        engine.prefill = prefill
    else:
        real_generate = engine.generate

        def generate(queries):
            check(queries)
            return real_generate(queries)

        engine.generate = generate
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, help="JSON file: label -> forced answer text")
    args = parser.parse_args()
    answers = json.loads(args.answers.read_text()) if args.answers else {}
    faults = json.loads(os.environ.get("MOLMO_TEST_FAULTS") or "[]")

    def engine_factory(settings: Settings):
        from molmo_backend.app.model_choice import choose_model
        from molmo_backend.engine.molmo2 import TransformersEngine
        from tests.support.forcing import ForceAnswers, by_label

        choice = choose_model(settings)  # MOLMO_DEMO=random: the random demo model, named as served
        engine = TransformersEngine.from_settings(
            settings, path=choice.path, model_id=choice.model_id, demo=choice.demo
        )
        if answers:
            engine.logits_processors.append(ForceAnswers(engine.processor.tokenizer, by_label(answers)))
        if faults:
            inject_faults(engine, faults)
        return engine

    settings = Settings.from_env(host=args.host, port=args.port, demo="random")
    return serve(settings, engine_factory=engine_factory)


if __name__ == "__main__":
    raise SystemExit(main())
