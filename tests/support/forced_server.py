"""Serve the backend (real gunicorn, real HTTP) on the demo model with answers forced per label.

    python tests/support/forced_server.py --port 9191 --answers answers.json

answers.json maps a label (found in the prompt) to the answer text Molmo should give, e.g.
{"cat": "<points coords=\\"1 1 250 500\\">cat</points>", "dog": "There are none."}.
Labels not in the file get the random model's own answer. Other settings come from the
environment as for ``molmo-backend serve``; MOLMO_DEMO is forced to 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from molmo_backend.serving import serve  # noqa: E402
from molmo_backend.settings import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, help="JSON file: label -> forced answer text")
    args = parser.parse_args()
    answers = json.loads(args.answers.read_text()) if args.answers else {}

    def engine_factory(settings: Settings):
        from molmo_backend.engine.transformers_engine import TransformersEngine
        from tests.support.forcing import ForceAnswers, by_label

        engine = TransformersEngine.from_settings(settings)
        if answers:
            engine.logits_processors.append(ForceAnswers(engine.processor.tokenizer, by_label(answers)))
        return engine

    settings = Settings.from_env(host=args.host, port=args.port, demo="1")
    return serve(settings, engine_factory=engine_factory)


if __name__ == "__main__":
    raise SystemExit(main())
