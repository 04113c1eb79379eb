"""Serve the backend (real gunicorn, real HTTP) on the demo model with answers *and token
probabilities* forced per prompt (tests/support/forcing.py).

    python tests/support/scored_server.py --port 9191 --answers answers.json

answers.json maps a text found in the prompt to either the answer text (every token certain) or
``{"text": "...", "probs": {"<char index>": p, ...}}``. Other settings come from the environment
as for ``molmo-backend serve``; MOLMO_DEMO is forced to random (the untrained tiny model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from molmo_backend.app.serve import serve  # noqa: E402
from molmo_backend.settings import Settings  # noqa: E402


def load_specs(path: Path) -> dict:
    specs = {}
    for key, spec in json.loads(path.read_text()).items():
        if isinstance(spec, dict):
            spec = (spec["text"], {int(k): float(v) for k, v in spec.get("probs", {}).items()})
        specs[key] = spec
    return specs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, required=True)
    args = parser.parse_args()
    specs = load_specs(args.answers)

    def engine_factory(settings: Settings):
        from molmo_backend.app.model_choice import choose_model
        from molmo_backend.engine.molmo2 import TransformersEngine
        from tests.support.forcing import ForceScoredAnswers, by_substring

        choice = choose_model(settings)  # MOLMO_DEMO=random: the random demo model, named as served
        engine = TransformersEngine.from_settings(
            settings, path=choice.path, model_id=choice.model_id, demo=choice.demo
        )
        engine.logits_processors.append(ForceScoredAnswers(engine.processor.tokenizer, by_substring(specs)))
        return engine

    settings = Settings.from_env(host=args.host, port=args.port, demo="random")
    return serve(settings, engine_factory=engine_factory)


if __name__ == "__main__":
    raise SystemExit(main())
