"""``molmo-backend`` (annotate, predict) on the demo model with answers forced per label.

    python tests/support/forced_cli.py --answers answers.json [--delay 1.0] -- annotate --project 3

answers.json maps a label (found in the prompt) to the answer text Molmo should give, as for
tests/support/forced_server.py. ``--delay`` sleeps that many seconds before every prefill (each admission of rows),
so a test can interrupt a run in the middle. Everything after ``--`` is the real command line;
MOLMO_DEMO is forced to random (the untrained tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from molmo_backend.commands.cli import main as cli_main  # noqa: E402


def forced_engine_factory(answers: dict[str, str], delay: float = 0.0):
    """An engine factory: the demo TransformersEngine with ForceAnswers (and a delay per prefill)."""

    def factory(settings):
        from molmo_backend.app.model_choice import choose_model
        from molmo_backend.engine.molmo2 import TransformersEngine
        from tests.support.forcing import ForceAnswers, by_label

        choice = choose_model(settings)  # MOLMO_DEMO=random: the random demo model, named as served
        engine = TransformersEngine.from_settings(
            settings, path=choice.path, model_id=choice.model_id, demo=choice.demo
        )
        if answers:
            engine.logits_processors.append(ForceAnswers(engine.processor.tokenizer, by_label(answers)))
        if delay > 0:
            prefill = engine.prefill

            def slow_prefill(rows):
                time.sleep(delay)
                return prefill(rows)

            engine.prefill = slow_prefill
        return engine

    return factory


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", type=Path, help="JSON file: label -> forced answer text")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per prefill")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the molmo-backend command line")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    answers = json.loads(args.answers.read_text()) if args.answers else {}
    os.environ["MOLMO_DEMO"] = "random"
    return cli_main(argv, engine_factory=forced_engine_factory(answers, args.delay))


if __name__ == "__main__":
    raise SystemExit(main())
