"""``molmo-backend`` command line: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from molmo_backend import __version__
from molmo_backend.errors import MolmoError
from molmo_backend.settings import SETTINGS_DOC, Settings, SettingsError

log = logging.getLogger("molmo_backend.commands.cli")


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
    serve.add_argument("--threads", type=int, help="HTTP threads (THREADS, default 32)")
    serve.add_argument("--model", help="hub id or local folder (MOLMO_MODEL)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve the tiny demo model (MOLMO_DEMO=1; trained on synthetic shapes, not Molmo): "
        "for trying the whole path",
    )
    serve.add_argument("--log-level", help="LOG_LEVEL (default INFO)")
    serve.set_defaults(func=cmd_serve)
    _add_annotate(commands)
    _add_predict(commands)
    return parser


ANNOTATE_EXAMPLES = """examples:
  export LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=<personal access token>
  molmo-backend annotate --project 3
  molmo-backend annotate --project 3 --tasks 1-500,900 --chunk-size 128
  molmo-backend annotate --project 3 --view 12          # the tasks of a Data Manager tab

Tasks that already hold a prediction of this model_version are skipped, so an interrupted run
resumes where it stopped when started again. Ctrl-C once: finish and write the chunks in flight,
then stop; twice: stop at once (those chunks are not written). Exit status: 0 all done, 1 some
images could not be loaded (run again to retry them), 2 a usage or configuration error,
130/143 interrupted by SIGINT/SIGTERM.
"""

PREDICT_EXAMPLES = """examples:
  molmo-backend predict photo.jpg --label cat --label "dog's nose" --out overlays/
  molmo-backend predict *.png --label person > points.json

Prints JSON to stdout: per image, per label, the points in pixels (x, y) and in percent of the
image (x_percent, y_percent, as Label Studio stores them) with a score; with --out, an overlay PNG
per image (<name>.molmo.png) with a dot and the label at every point.
"""


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder (MOLMO_MODEL)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the tiny demo model (MOLMO_DEMO=1; trained on synthetic shapes, "
        "not Molmo): for trying the command",
    )
    parser.add_argument("--prompt-template", help="prompt per label, with {label} (MOLMO_PROMPT_TEMPLATE)")
    parser.add_argument("--log-level", help="LOG_LEVEL (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines on stderr (LOG_FORMAT; default text for this command)",
    )


def _add_annotate(commands) -> None:
    annotate = commands.add_parser(
        "annotate",
        help="pre-annotate a whole Label Studio project (resumable, with progress)",
        description="Pre-annotate a Label Studio project's tasks from the command line: no "
        "request time limit, a progress bar, and resumable. Predictions are written through "
        "Label Studio's API with the same model_version as the server reports.",
        epilog=ANNOTATE_EXAMPLES + "\n" + _settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    annotate.add_argument(
        "--project", type=int, required=True, metavar="ID", help="the project's id (the number in its URL)"
    )
    annotate.add_argument("--url", help="Label Studio's URL (LABEL_STUDIO_URL)")
    annotate.add_argument(
        "--api-key",
        help="personal access token or legacy token "
        "(LABEL_STUDIO_API_KEY; prefer the variable: flags show in ps)",
    )
    annotate.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="IDS",
        help="only these task ids, e.g. 1,2,10-20 (repeatable)",
    )
    annotate.add_argument(
        "--view", type=int, metavar="VIEW_ID", help="only the tasks of this Data Manager tab (its filters)"
    )
    annotate.add_argument(
        "--query",
        metavar="JSON",
        help='a Data Manager query, e.g. \'{"filters": {"conjunction": "and", "items": [...]}}\'',
    )
    annotate.add_argument(
        "--chunk-size",
        type=int,
        default=64,
        metavar="N",
        help="tasks per chunk: predicted together, written together (default 64, "
        "at most 500); the GPU batches MOLMO_MAX_BATCH queries across chunks",
    )
    annotate.add_argument(
        "--page-size", type=int, default=500, metavar="N", help="tasks per listing request (default 500)"
    )
    annotate.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "off"],
        default="auto",
        help="a bar on a terminal, else a log line every 10 s (default auto)",
    )
    annotate.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    _model_flags(annotate)
    annotate.set_defaults(func=cmd_annotate)


def _add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="point at labels in image files: JSON points and overlay PNGs",
        description="Ask Molmo where the labels are in image files, without Label Studio: the "
        "same prompts, parsing and model_version as the server.",
        epilog=PREDICT_EXAMPLES + "\n" + _settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument(
        "--label",
        action="append",
        required=True,
        metavar="LABEL",
        help="a label to point at (repeat for several)",
    )
    predict.add_argument("--out", metavar="DIR", help="write an overlay PNG per image here")
    _model_flags(predict)
    predict.set_defaults(func=cmd_predict)


def cmd_serve(args: argparse.Namespace) -> int:
    from molmo_backend.app.serve import serve

    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        threads=args.threads,
        model=args.model,
        demo="1" if args.demo else None,
        log_level=args.log_level,
    )
    return serve(settings)


def _command_settings(args: argparse.Namespace, **overrides) -> Settings:
    """Settings for annotate/predict: the environment, then flags; text logs unless LOG_FORMAT
    says otherwise."""
    env = {"LOG_FORMAT": "text", **os.environ}
    settings = Settings.from_env(
        env,
        model=args.model,
        demo="1" if args.demo else None,
        log_level=args.log_level,
        log_format=args.log_format,
        prompt_template=args.prompt_template,
        **overrides,
    )
    from molmo_backend.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return settings


def cmd_annotate(args: argparse.Namespace) -> int:
    from molmo_backend.commands import annotate as ann
    from molmo_backend.commands.progress import format_duration
    from molmo_backend.labelstudio.api import TaskFilter

    settings = _command_settings(args, label_studio_url=args.url, label_studio_api_key=args.api_key)
    if args.query:
        try:
            query = json.loads(args.query)
        except ValueError as exc:
            raise ann.AnnotateError(f"--query is not valid JSON: {exc}") from None
    else:
        query = None
    task_filter = TaskFilter(task_ids=ann.parse_task_ids(args.tasks), view=args.view, query=query)
    if args.page_size < 1:
        raise ann.AnnotateError("--page-size must be >= 1")
    report = ann.annotate_project(
        settings,
        args.project,
        task_filter=task_filter,
        chunk_size=args.chunk_size,
        page_size=args.page_size,
        engine_factory=getattr(args, "engine_factory", None),
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(report.as_dict()), flush=True)
    rate = report.written / report.predict_seconds if report.predict_seconds > 0 else 0.0
    summary = (
        f"project {report.project}, model_version {report.model_version}: "
        f"{report.listed} tasks, {report.skipped} already done, {report.written} written "
        f"({report.with_points} with points) in {format_duration(report.seconds)}"
        f" ({rate:.2f} tasks/s)"
    )
    if report.skipped_late:
        summary += f", {report.skipped_late} predicted elsewhere meanwhile"
    print(summary, file=sys.stderr)
    if report.truncated:
        print(
            f"{report.truncated} answers reached MOLMO_MAX_NEW_TOKENS and were cut: their points past "
            f"the cap are missing (raise MOLMO_MAX_NEW_TOKENS and re-run on those tasks)",
            file=sys.stderr,
        )
    if report.interrupted is not None:
        left = report.todo - report.written - report.skipped_late - len(report.failed)
        print(
            f"interrupted: {left} tasks left (abandoned in flight: {report.abandoned}); run the "
            f"same command again to resume",
            file=sys.stderr,
        )
        return 128 + report.interrupted
    if report.failed:
        print(
            f"{len(report.failed)} tasks' images could not be loaded (see the log; ids "
            f"{report.failed[:20]}); they got no prediction: run again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from molmo_backend.commands.predict import predict_files

    settings = _command_settings(args)
    result = predict_files(
        settings,
        args.images,
        args.label,
        out_dir=args.out,
        engine_factory=getattr(args, "engine_factory", None),
    )
    if result["model_version"].startswith("molmo2-demo@"):
        log.warning(
            "this is the tiny random demo model: its points are random (MOLMO_MODEL and a GPU give real ones)"
        )
    elif result["model_version"].startswith("molmo2-demo-shapes@"):
        log.warning(
            "this is the tiny demo model, trained on synthetic shapes (not Molmo): it finds "
            "only coloured shapes such as 'red circle' (MOLMO_MODEL and a GPU give real answers)"
        )
    print(json.dumps(result, indent=2), flush=True)
    for image in result["images"]:
        if image["overlay"]:
            print(f"wrote {image['overlay']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """The command line; ``engine_factory`` replaces the default engine of annotate/predict
    (tests force answers through it)."""
    args = build_parser().parse_args(argv)
    args.engine_factory = engine_factory
    try:
        return args.func(args)
    except MolmoError as exc:  # something the user can act on: its message, no traceback
        print(f"molmo-backend: {_error_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("molmo-backend: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _error_line(exc: MolmoError) -> str:
    if isinstance(exc, SettingsError):
        return f"configuration error: {exc}"
    # imported here: label_studio_sdk (under labelstudio.config) takes about a second to import,
    # which --help and serve's start should not wait for
    from molmo_backend.labelstudio.config import LabelConfigError

    if isinstance(exc, LabelConfigError):
        return f"the project's label config cannot be used: {exc}"
    return str(exc)
