"""``molmo-backend`` command line: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .settings import SETTINGS_DOC, Settings, SettingsError

log = logging.getLogger("molmo_backend.cli")


def _settings_epilog() -> str:
    rows = "\n".join(f"  {var:<26} {doc}" for var, doc in SETTINGS_DOC.values())
    return f"environment variables (flags win over them):\n{rows}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molmo-backend",
        description="Label Studio ML backend: Molmo points at your keypoint labels.",
    )
    parser.add_argument("--version", action="version", version=f"molmo-backend {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve the ML backend for Label Studio (gunicorn, one model-holding worker)",
        description="Serve the Label Studio ML backend. Connect it in Label Studio under "
        "Project settings > Model > Connect model, with this server's URL.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to bind (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to bind (PORT, default 9090)")
    serve.add_argument("--threads", type=int, help="HTTP threads (THREADS, default 8)")
    serve.add_argument("--model", help="hub id or local folder (MOLMO_MODEL)")
    serve.add_argument("--demo", action="store_true",
                       help="serve the tiny random demo model (MOLMO_DEMO=1): for trying the protocol")
    serve.add_argument("--log-level", help="LOG_LEVEL (default INFO)")
    serve.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import serve

    settings = Settings.from_env(
        host=args.host, port=args.port, threads=args.threads, model=args.model,
        demo="1" if args.demo else None, log_level=args.log_level,
    )
    return serve(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"molmo-backend: configuration error: {exc}", file=sys.stderr)
        return 2
