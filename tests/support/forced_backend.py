"""The backend, or its CLI, on the demo model with answers forced through the real ``generate()``.

    python tests/support/forced_backend.py serve --port 9191 [--answers answers.json] [--net-guard]
    python tests/support/forced_backend.py cli [--answers answers.json] [--delay 1.0] -- annotate --project 3

``serve`` runs our server (real gunicorn, real HTTP) as ``molmo-backend serve`` does; ``cli`` runs
the ``molmo-backend`` command line after ``--`` (annotate, predict). Other settings come from the
environment as usual; MOLMO_DEMO is forced to random (the untrained tiny model). The engine is
built as the product builds it (``choose_model``, then ``TransformersEngine.from_settings``), then
given, as asked:

**Forced answers** (``--answers FILE``, tests/support/forcing.py). The JSON file maps a text found
in the prompt (a label, a prompt fragment; the longest match wins) to the answer Molmo should give:
either the answer text, e.g. ``{"cat": "<points coords=\\"1 1 250 500\\">cat</points>", "dog":
"There are none."}`` (every token certain), or ``{"text": "...", "probs": {"<char index>": p}}``:
the token spelling that character of the text is emitted with probability p (confidence tests). A
prompt that matches no key gets the random model's own answer.

**Fault rules** (``MOLMO_TEST_FAULTS``; tests only, never in the product package): a JSON list of
rules; a prefill (the rows the scheduler admits together) or, for a plain engine, a ``generate``
batch that matches a rule fails or sleeps as the rule says, before the model runs. A rule matches
on any of

- ``"image_size": [w, h]``: a query's image is exactly w x h pixels (a "poison" task);
- ``"prompt": "text"``: a query's prompt contains the text;
- ``"batch_over": n``: the prefill or batch holds more than n queries (out of memory that depends
  on batch size, as on a real GPU: the scheduler's split-and-retry must then deliver every answer);

and does ``"error": "oom"`` (``torch.cuda.OutOfMemoryError``), ``"error": "runtime"``
(``RuntimeError``), or ``"sleep": seconds`` (a slow prefill: every admission of matching rows
waits that long). Every injected fault is logged as ``injected fault``, so tests can count them in
the server's log.

**A delay** (``cli --delay SECONDS``): a sleep before every prefill (each admission of rows), so a
test can interrupt a run in the middle.

**A network guard** (``serve --net-guard``): tests/support/net_guard.NetGuard is installed before
molmo_backend (and requests, urllib3, gunicorn) is imported, so the whole server, gunicorn master
and workers, resolves names from a test table and cannot connect to anything but loopback:

    MOLMO_TEST_NET_NAMES='{"images.test": ["127.0.0.3"], "metadata.test": ["169.254.169.254"]}' \\
    MOLMO_TEST_NET_LOG=/tmp/net.jsonl python tests/support/forced_backend.py serve --net-guard ...

``MOLMO_TEST_NET_NAMES``: name -> addresses (or a list of answers, one per lookup: see net_guard).
``MOLMO_TEST_NET_LOG``: where every lookup and connect is recorded, one JSON object a line, for the
test to read.

This module imports nothing of molmo_backend at its top (the guard must come first); tests that
run the CLI in their own process take :func:`forced_engine_factory` from it.
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

log = logging.getLogger("tests.faults")


def load_answers(path: Path | None) -> dict:
    """The answers file: key -> answer text, or -> (text, {char index: probability})."""
    answers = {}
    for key, spec in (json.loads(path.read_text()) if path else {}).items():
        if isinstance(spec, dict):
            spec = (spec["text"], {int(k): float(v) for k, v in spec.get("probs", {}).items()})
        answers[key] = spec
    return answers


def _matches(rule: dict, queries) -> bool:
    if "batch_over" in rule and len(queries) > int(rule["batch_over"]):
        return True
    if "image_size" in rule and any(list(q.image.size) == list(rule["image_size"]) for q in queries):
        return True
    if "prompt" in rule and any(rule["prompt"] in q.prompt for q in queries):
        return True
    return False


def inject_faults(engine, rules: list[dict]):
    """Make matching work fail or sleep before the model runs: each admission of a step engine
    (the rows admitted together, in a packed step or a prefill) or each ``generate`` batch of a
    plain engine."""
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

    if engine.stepwise:  # every admission goes through step(), the fallback's prefill() too
        real_step = engine.step

        def step(admit, decode):
            if admit:
                check([row.query for row in admit])
            return real_step(admit, decode)

        engine.step = step
    else:
        real_generate = engine.generate

        def generate(queries):
            check(queries)
            return real_generate(queries)

        engine.generate = generate
    return engine


def forced_engine_factory(answers: dict | None = None, faults: list[dict] | None = None, delay: float = 0.0):
    """An engine factory (settings -> engine) for ``serve`` and ``cli``: the demo TransformersEngine
    with ``answers`` forced (as :func:`load_answers` reads them: a value with probabilities makes it
    ForceScoredAnswers, else ForceAnswers), ``faults`` injected, ``delay`` seconds per prefill."""
    answers = dict(answers or {})

    def factory(settings):
        from molmo_backend.app.model_choice import choose_model
        from molmo_backend.engine.molmo2 import TransformersEngine
        from tests.support.forcing import ForceAnswers, ForceScoredAnswers, by_substring

        choice = choose_model(settings)  # MOLMO_DEMO=random: the random demo model, named as served
        engine = TransformersEngine.from_settings(
            settings, path=choice.path, model_id=choice.model_id, demo=choice.demo
        )
        if answers:
            scored = any(not isinstance(spec, str) for spec in answers.values())
            forcing = ForceScoredAnswers if scored else ForceAnswers
            engine.logits_processors.append(forcing(engine.processor.tokenizer, by_substring(answers)))
        if faults:
            inject_faults(engine, faults)
        if delay > 0:  # every admission goes through step(), the fallback's prefill() too
            real_step = engine.step

            def slow_step(admit, decode):
                if admit:
                    time.sleep(delay)
                return real_step(admit, decode)

            engine.step = slow_step
        return engine

    return factory


def install_net_guard() -> None:
    from tests.support.net_guard import NetGuard

    log_path = os.environ.get("MOLMO_TEST_NET_LOG")
    names = json.loads(os.environ.get("MOLMO_TEST_NET_NAMES") or "{}")
    NetGuard(names, Path(log_path) if log_path else None).install()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="the server (gunicorn), as molmo-backend serve")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--net-guard", action="store_true", help="only loopback, names from a table")
    cli_parser = commands.add_parser("cli", help="the molmo-backend command line after --")
    cli_parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per prefill")
    cli_parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the molmo-backend command line")
    for sub in (serve_parser, cli_parser):
        sub.add_argument("--answers", type=Path, help="JSON file: prompt text -> forced answer")
    args = parser.parse_args(argv)
    if args.command == "serve" and args.net_guard:
        install_net_guard()  # before molmo_backend and its HTTP libraries are imported
    faults = json.loads(os.environ.get("MOLMO_TEST_FAULTS") or "[]")
    factory = forced_engine_factory(load_answers(args.answers), faults, getattr(args, "delay", 0.0))
    if args.command == "serve":
        from molmo_backend.app.serve import serve
        from molmo_backend.settings import Settings

        return serve(Settings.from_env(host=args.host, port=args.port, demo="random"), engine_factory=factory)
    from molmo_backend.commands.cli import main as cli_main

    os.environ["MOLMO_DEMO"] = "random"
    return cli_main(args.argv[1:] if args.argv[:1] == ["--"] else args.argv, engine_factory=factory)


if __name__ == "__main__":
    raise SystemExit(main())
