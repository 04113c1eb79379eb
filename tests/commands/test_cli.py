"""The annotate and predict commands.

- annotate's project loop (molmo_backend/commands/annotate.py) against an in-memory stand-in for
  label-studio-sdk's client and a torch-free engine: skipping, chunked writes, failed images,
  write errors without duplicates, interrupts by real signals. The real Label Studio runs in
  tests/e2e/test_e2e_annotate.py.
- the command line: --help of every command, usage errors, and ``predict`` as a real process on
  the demo model with forced answers, its overlay PNG read back pixel by pixel.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from molmo_backend.commands import cli
from molmo_backend.commands.annotate import AnnotateError, annotate_project, parse_task_ids
from molmo_backend.commands.interrupts import Interrupts
from molmo_backend.commands.overlay import PALETTE, RING
from molmo_backend.commands.predict import keypoint_config
from molmo_backend.engine.base import Answer, Engine
from molmo_backend.errors import Unavailable
from molmo_backend.labelstudio.api import LabelStudioProject, TaskFilter
from molmo_backend.labelstudio.config import LabelConfigError
from molmo_backend.labelstudio.model import make_model_version
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE
from molmo_backend.settings import Settings, SettingsError
from tests.support import fake_label_studio
from tests.support.fake_label_studio import StatusError
from tests.support.processes import ROOT, forced_cli_command

CONFIG = keypoint_config(["cat", "dog"])
ANSWERS = {"cat": '<points coords="1 1 250 500">cat</points>', "dog": "There are none."}
VERSION = make_model_version("test/Molmo-fake", "r1", DEFAULT_PROMPT_TEMPLATE, Settings().caption_prompt)


def png_uri(width: int = 40, height: int = 30) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class LabelEngine(Engine):
    """Answers by the label in the prompt; ``on_batch(n)`` runs before batch n (1-based)."""

    model_id, revision, family, max_batch = "test/Molmo-fake", "r1", "molmo2", 4

    def __init__(self, on_batch=None):
        self.on_batch = on_batch or (lambda n: None)
        self.batches = 0

    def generate(self, queries):
        self.batches += 1
        self.on_batch(self.batches)
        return [
            Answer(text=next((a for label, a in ANSWERS.items() if label in q.prompt), ""), score=0.5)
            for q in queries
        ]


class FakeLabelStudio(fake_label_studio.FakeLabelStudio):
    """The stand-in client over a dict of tasks, with this module's config unless told."""

    def __init__(self, tasks: dict[int, dict], config: str = CONFIG):
        super().__init__(tasks, config)


def settings() -> Settings:
    return Settings.from_env({}, demo="0")


def run(ls: FakeLabelStudio, engine: LabelEngine | None = None, **kwargs):
    engine = engine or LabelEngine()
    kwargs.setdefault("progress", "off")
    return annotate_project(
        settings(), 7, engine_factory=lambda s: engine, project=LabelStudioProject(7, client=ls), **kwargs
    )


def tasks(n: int) -> dict[int, dict]:
    return {i: {"image": png_uri(40 + i, 30)} for i in range(1, n + 1)}


def assert_one_each(ls: FakeLabelStudio, ids) -> None:
    for i in ids:
        preds = ls.predictions(i)
        assert len(preds) == 1, (i, preds)
        [pred] = preds
        assert pred["model_version"] == VERSION
        [region] = pred["result"]
        assert region["value"]["keypointlabels"] == ["cat"]
        assert (region["value"]["x"], region["value"]["y"]) == (25.0, 50.0)
        assert region["original_width"] == 40 + i


# -- annotate: the project loop --------------------------------------------------------------------


def test_tasks_with_this_model_version_are_skipped_and_the_rest_written_per_chunk():
    ls = FakeLabelStudio(tasks(7))
    ls.store[2]["predictions"].append({"model_version": VERSION, "result": []})
    ls.store[3]["predictions"].append({"model_version": "someone-else", "result": []})
    report = run(ls, chunk_size=3, in_flight=1)
    assert (report.listed, report.skipped, report.todo, report.written) == (7, 1, 6, 6)
    assert report.model_version == VERSION and report.complete and report.with_points == 6
    assert ls.writes == [[1, 3, 4], [5, 6, 7]]
    assert_one_each(ls, [1, 4, 5, 6, 7])
    assert len(ls.predictions(3)) == 2  # another version's prediction is left alone

    again = run(ls, chunk_size=3)
    assert (again.skipped, again.todo, again.written) == (7, 0, 0)
    assert len(ls.writes) == 2


def test_task_ids_filter_and_unusable_images():
    ls = FakeLabelStudio({**tasks(4), 5: {"image": "data:image/png;base64,AAAA"}, 6: {"other": "x"}})
    report = run(ls, task_filter=TaskFilter(task_ids=(2, 5, 6, 99)), chunk_size=10)
    assert (report.listed, report.todo) == (3, 3)
    # 5: its image cannot be decoded: nothing written, tried again next time
    assert report.failed == [5] and ls.predictions(5) == [] and not report.complete
    # 6: the task has no image at all: an empty prediction, as the server gives
    assert [p["result"] for p in ls.predictions(6)] == [[]]
    assert_one_each(ls, [2])
    assert ls.predictions(1) == []
    assert run(ls, task_filter=TaskFilter(task_ids=(5,))).failed == [5]

    # with a view, LS ignores the query: the ids are applied to what the view lists
    with_view = run(ls, task_filter=TaskFilter(view=9, task_ids=(3, 4)))
    assert 9 in ls.views and (with_view.listed, with_view.written) == (2, 2)
    assert ls.predictions(1) == []


def test_a_write_that_errs_after_storing_is_checked_not_repeated():
    ls = FakeLabelStudio(tasks(4))
    ls.fail_writes = [StatusError(502)]  # LS stored the first chunk but answered 502
    report = run(ls, chunk_size=2, in_flight=1)
    assert report.written == 4 and report.complete
    assert ls.writes == [[1, 2], [3, 4]]
    assert_one_each(ls, [1, 2, 3, 4])


def test_a_refused_write_stops_the_run_with_labels_studios_reason():
    ls = FakeLabelStudio(tasks(2))
    ls.fail_writes = [StatusError(400, {"detail": "bad result"})]
    with pytest.raises(AnnotateError, match="HTTP 400.*bad result"):
        run(ls, chunk_size=1, in_flight=1)


def test_first_signal_finishes_the_chunks_in_flight_then_stops_and_a_rerun_resumes():
    ls = FakeLabelStudio(tasks(6))
    engine = LabelEngine(on_batch=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))
    report = run(ls, engine, chunk_size=2, in_flight=1)
    assert report.interrupted == signal.SIGTERM and report.abandoned == 0
    assert ls.writes == [[1, 2]] and report.written == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back

    resumed = run(ls, chunk_size=2)
    assert (resumed.skipped, resumed.written, resumed.interrupted) == (2, 4, None)
    assert_one_each(ls, range(1, 7))


class SeenInterrupts(Interrupts):
    """The real handler, telling the test when it has handled the first signal (two signals
    sent back to back may arrive as one, so the second waits for this, not for a clock)."""

    def __init__(self):
        super().__init__()
        self.first_handled = threading.Event()

    def _handle(self, signum, frame):
        try:
            super()._handle(signum, frame)
        finally:
            self.first_handled.set()


def test_second_signal_abandons_the_chunks_in_flight_without_writing_them():
    ls = FakeLabelStudio(tasks(6))
    release = threading.Event()
    interrupts = SeenInterrupts()

    def on_batch(n):
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupts.first_handled.wait(10), "the first signal was never handled"
            os.kill(os.getpid(), signal.SIGINT)
            release.wait(5)  # still busy when the main thread gives up on it

    engine = LabelEngine(on_batch=on_batch)
    try:
        report = run(ls, engine, chunk_size=2, in_flight=2, interrupts=interrupts)
    finally:
        release.set()
    assert report.interrupted == signal.SIGINT
    assert report.abandoned == 4 and report.written == 0 and ls.writes == []


def test_config_and_argument_errors_come_before_the_model_loads():
    def no_engine(settings):
        raise AssertionError("the model must not load")

    bad = FakeLabelStudio(tasks(1), config='<View><Image name="i" value="$i"/></View>')
    with pytest.raises(LabelConfigError):
        annotate_project(settings(), 7, engine_factory=no_engine, project=LabelStudioProject(7, client=bad))
    ok = LabelStudioProject(7, client=FakeLabelStudio(tasks(1)))
    with pytest.raises(AnnotateError, match="chunk-size"):
        annotate_project(settings(), 7, engine_factory=no_engine, project=ok, chunk_size=501)
    with pytest.raises(AnnotateError, match="cannot be combined"):
        annotate_project(
            settings(),
            7,
            engine_factory=no_engine,
            project=ok,
            task_filter=TaskFilter(view=3, query={"filters": {}}),
        )


def test_label_studio_errors_say_what_to_fix():
    class Refusing(FakeLabelStudio):
        class _Projects(FakeLabelStudio._Projects):
            def get(self, id):
                raise StatusError(401, {"detail": "Invalid token."})

    with pytest.raises(AnnotateError, match="refused the API key.*Invalid token.*personal access token"):
        LabelStudioProject(7, client=Refusing(tasks(1))).label_config()
    with pytest.raises(AnnotateError, match="LABEL_STUDIO_URL"):
        LabelStudioProject(7, url=None, api_key="x")
    with pytest.raises(AnnotateError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioProject(7, url="http://127.0.0.1:9", api_key=None)


def test_task_id_lists_and_ranges():
    assert parse_task_ids(["1,2", "5-7", " 2 "]) == (1, 2, 5, 6, 7)
    assert parse_task_ids([]) == ()
    for bad in ["x", "3-1", "0", "1-"]:
        with pytest.raises(AnnotateError):
            parse_task_ids([bad])


def test_task_filter_becomes_label_studios_query():
    assert TaskFilter().list_params() == {}
    assert TaskFilter(view=4, task_ids=(1,)).list_params() == {"view": 4}
    query = json.loads(TaskFilter(task_ids=(3, 1), query={"filters": {"items": []}}).list_params()["query"])
    assert query == {"filters": {"items": []}, "selectedItems": {"all": False, "included": [3, 1]}}


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["annotate"], ["predict"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(command + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: molmo-backend")
    for word in {
        "annotate": ["--project", "--tasks", "--view", "--chunk-size", "resume", "LABEL_STUDIO_API_KEY"],
        "predict": ["IMAGE", "--label", "--out", "x_percent"],
        "serve": ["--port"],
    }.get(command[0] if command else "", ["serve", "annotate", "predict"]):
        assert word in out, word


def test_annotate_without_label_studio_settings_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr("molmo_backend.logs.configure_logging", lambda *a, **k: None)
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["annotate", "--project", "3"]) == 2
    assert "LABEL_STUDIO_URL" in capsys.readouterr().err
    assert (
        cli.main(
            ["annotate", "--project", "3", "--url", "http://127.0.0.1:9", "--api-key", "k", "--tasks", "1-x"]
        )
        == 2
    )
    assert "bad task id" in capsys.readouterr().err


def test_predict_prints_points_and_writes_an_overlay_with_dots_at_them(tmp_path, demo_model_dir):
    """The real command (a process, the demo model, forced answers): JSON points in pixels and
    percent, and an overlay PNG whose pixels at those points have the label's colour."""
    background = (30, 60, 90)
    Image.new("RGB", (400, 200), background).save(tmp_path / "wide.png")
    Image.new("RGB", (120, 300), background).save(tmp_path / "tall.jpg", quality=100)
    answers = tmp_path / "answers.json"
    answers.write_text(
        json.dumps(
            {
                "cat": '<points coords="1 1 250 500 2 750 100">cat</points>',
                "dog": '<points coords="1 1 500 900">dog</points>',
                "bird": "There are none.",
            }
        )
    )
    env = {**os.environ, "MOLMO_CACHE_DIR": str(demo_model_dir.parent), "MOLMO_MAX_NEW_TOKENS": "48"}
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        forced_cli_command(
            answers,
            "predict",
            str(tmp_path / "wide.png"),
            str(tmp_path / "tall.jpg"),
            *("--label", "cat", "--label", "dog", "--label", "bird"),
            *("--out", str(out_dir)),
        ),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model_version"].startswith("molmo2-demo@") and result["labels"] == ["cat", "dog", "bird"]
    colors = {"cat": PALETTE[0], "dog": PALETTE[1]}
    for image, (w, h) in zip(result["images"], [(400, 200), (120, 300)]):
        assert (image["width"], image["height"]) == (w, h)
        labels = image["labels"]
        assert [(p["x_percent"], p["y_percent"]) for p in labels["cat"]] == [(25.0, 50.0), (75.0, 10.0)]
        assert [(p["x_percent"], p["y_percent"]) for p in labels["dog"]] == [(50.0, 90.0)]
        assert labels["bird"] == []
        for p in labels["cat"] + labels["dog"]:
            assert (p["x"], p["y"]) == (p["x_percent"] * w / 100, p["y_percent"] * h / 100)
            assert 0 < p["score"] <= 1
        overlay = Image.open(image["overlay"])
        assert Path(image["overlay"]).parent == out_dir and overlay.size == (w, h)
        assert overlay.mode == "RGB"
        for label, points in (("cat", labels["cat"]), ("dog", labels["dog"])):
            for p in points:
                assert overlay.getpixel((int(p["x"]), int(p["y"]))) == colors[label]
        assert RING in {
            overlay.getpixel((int(labels["dog"][0]["x"]) - dx, int(labels["dog"][0]["y"])))
            for dx in range(3, 12)
        }
        far = (2, h // 2 + 20) if w > h else (w - 3, 5)
        original = Image.open(tmp_path / ("wide.png" if w > h else "tall.jpg")).convert("RGB")
        assert overlay.getpixel(far) == original.getpixel(far)
    assert "wrote " in proc.stderr and "random" in proc.stderr


def test_predict_refuses_unreadable_files_before_loading_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("molmo_backend.logs.configure_logging", lambda *a, **k: None)
    (tmp_path / "text.png").write_text("not an image")

    def no_engine(settings):
        raise AssertionError("the model must not load")

    code = cli.main(
        ["predict", str(tmp_path / "text.png"), str(tmp_path / "missing.png"), "--label", "cat"],
        engine_factory=no_engine,
    )
    err = capsys.readouterr().err
    assert code == 2 and "text.png" in err and "missing.png" in err and "No such file" in err


def test_the_backends_errors_exit_with_their_code_and_say_what_kind(tmp_path, capsys, monkeypatch):
    """main answers every MolmoError the same way: one line, its kind's exit code, no traceback."""
    monkeypatch.setattr("molmo_backend.logs.configure_logging", lambda *a, **k: None)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    image = str(tmp_path / "a.png")

    def unavailable(settings):
        raise Unavailable("the engine server is not there")

    assert cli.main(["predict", image, "--label", "cat"], engine_factory=unavailable) == 1
    assert capsys.readouterr().err.endswith("molmo-backend: the engine server is not there\n")
    monkeypatch.setattr("molmo_backend.commands.predict.keypoint_config", lambda labels: "<View/>")
    assert cli.main(["predict", image, "--label", "cat"], engine_factory=unavailable) == 2
    assert (
        "molmo-backend: the project's label config cannot be used: The label config"
        in capsys.readouterr().err
    )
    monkeypatch.setenv("MOLMO_DEMO", "sometimes")
    assert cli.main(["predict", image, "--label", "cat"], engine_factory=unavailable) == 2
    assert "molmo-backend: configuration error: MOLMO_DEMO must be" in capsys.readouterr().err
    assert (SettingsError.exit_code, LabelConfigError.exit_code, AnnotateError.exit_code) == (2, 2, 2)
    assert issubclass(SettingsError, ValueError) and issubclass(LabelConfigError, ValueError)
    assert issubclass(AnnotateError, RuntimeError)
