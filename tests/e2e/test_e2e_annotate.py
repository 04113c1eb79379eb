"""``molmo-backend annotate`` against a real Label Studio 1.23.2 (tests/support/labelstudio.py).

The demo model with forced answers (tests/support/forced_backend.py cli) writes known points, so every
stored prediction can be checked exactly. Select with ``pytest -m e2e``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from molmo_backend.commands.annotate import annotate_project
from molmo_backend.labelstudio.api import LabelStudioProject, TaskFilter
from molmo_backend.settings import Settings
from tests.support.forced_backend import forced_engine_factory
from tests.support.labelstudio import E2E_TIMINGS
from tests.support.processes import ROOT, BackendServer, forced_cli_command, serve_directory

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" prompt="black dogs" background="blue"/>
  </KeyPointLabels>
</View>"""
ANSWERS = {
    "cat": '<points coords="1 1 250 500 2 750 500">cat</points>',
    "black dogs": '<points coords="1 1 100 200">black dogs</points>',
}
EXPECTED = sorted([("cat", 25.0, 50.0), ("cat", 75.0, 50.0), ("dog", 10.0, 20.0)])


def _points(pred: dict) -> list[tuple[str, float, float]]:
    return sorted(
        (r["value"]["keypointlabels"][0], round(r["value"]["x"], 3), round(r["value"]["y"], 3))
        for r in pred["result"]
    )


def _ours(ls, task_id: int, version: str) -> list[dict]:
    preds = ls.predictions(task_id)
    assert all(p["model_version"] == version for p in preds), preds
    return preds


def _check_all(ls, sizes: dict[int, tuple[int, int]], version: str) -> None:
    """Every task: exactly one prediction, of ``version``, with the forced points, sized right."""
    for task_id, size in sizes.items():
        preds = _ours(ls, task_id, version)
        assert len(preds) == 1, f"task {task_id}: {len(preds)} predictions"
        assert _points(preds[0]) == EXPECTED, f"task {task_id}: {_points(preds[0])}"
        for region in preds[0]["result"]:
            assert (region["original_width"], region["original_height"]) == size
            assert region["from_name"] == "kp" and region["to_name"] == "image"


def _annotate_cmd(project: int, answers_file: Path, delay: float, *extra: str) -> list[str]:
    return forced_cli_command(
        answers_file,
        "annotate",
        "--project",
        str(project),
        "--json",
        "--progress",
        "log",
        *extra,
        delay=delay,
    )


def _report(stdout: str) -> dict:
    [line] = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(line)


def test_annotate_is_interrupted_resumes_and_dedupes_with_the_server(
    ls_pat, png_factory, tmp_path, demo_model_dir
):
    """PAT mode (LS 1.23's default). 12 uploaded tasks in chunks of 2, the engine slowed down.
    SIGINT once the first chunk is stored: the run writes the chunks in flight and exits 130 with
    whole chunks stored. The same command again writes exactly the rest. Then our server, connected
    to the project, reports the same model_version, and "Retrieve predictions" adds nothing."""
    ls = ls_pat
    t0 = time.monotonic()
    pid = ls.create_project(CONFIG, title="annotate resume")["id"]
    sizes_list = [(64 + 8 * i, 48 + 4 * i) for i in range(12)]
    files = [png_factory(f"t{i}.png", w, h) for i, (w, h) in enumerate(sizes_list)]
    ids = ls.import_files(pid, files)
    sizes = dict(zip(ids, sizes_list))
    answers_file = tmp_path / "answers.json"
    answers_file.write_text(json.dumps(ANSWERS))
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.pat(),
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        "PYTHONUNBUFFERED": "1",
        "MOLMO_MAX_NEW_TOKENS": "48",
    }

    # 1. interrupted after the first stored chunk
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as err:
        proc = subprocess.Popen(
            _annotate_cmd(pid, answers_file, 1.0, "--chunk-size", "2"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not any(ls.predictions(i) for i in ids):
            assert proc.poll() is None, log1.read_text()
            assert time.monotonic() < deadline, "no prediction stored within 90 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr1 = log1.read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr1
    first = _report(out.decode())
    version = first["model_version"]
    assert version.startswith("molmo2-demo@")
    assert first["interrupted"] == signal.SIGINT and first["todo"] == 12 and first["skipped"] == 0
    assert first["abandoned"] == 0 and first["failed"] == 0
    assert 2 <= first["written"] < 12 and first["written"] % 2 == 0, first
    assert "run the same command again to resume" in stderr1
    stored = {i: _ours(ls, i, version) for i in ids}
    assert all(len(p) <= 1 for p in stored.values())
    assert sum(len(p) for p in stored.values()) == first["written"]
    for preds in stored.values():
        if preds:
            assert _points(preds[0]) == EXPECTED

    # 2. the same command resumes: exactly the rest
    done = subprocess.run(
        _annotate_cmd(pid, answers_file, 0.0, "--chunk-size", "2"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    second = _report(done.stdout.decode())
    assert second["model_version"] == version
    assert second["skipped"] == first["written"]
    assert second["written"] == 12 - first["written"] and second["interrupted"] is None
    _check_all(ls, sizes, version)
    E2E_TIMINGS["annotate_resume_cli_s"] = time.monotonic() - t0

    # 3. the server reports the same version: LS's own dedupe skips every CLI-made prediction
    with BackendServer(
        tmp_path,
        answers=ANSWERS,
        env={
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.pat(),
            "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        },
    ) as backend:
        ml = ls.connect_ml(pid, backend.url)
        assert ml["model_version"] == version
        ls.retrieve_predictions(pid)
        _check_all(ls, sizes, version)
    E2E_TIMINGS["annotate_resume_total_s"] = time.monotonic() - t0


def test_annotate_filters_failures_and_reruns_with_a_legacy_token(
    ls_legacy, png_factory, tmp_path, demo_model_dir
):
    """Legacy-token mode, in-process (annotate_project, the SDK client with a legacy token):
    --tasks picks tasks; a view picks its tab's tasks; an image that cannot be loaded gets no
    prediction (left for the next run); a task predicted elsewhere meanwhile is not written
    twice; a last run has nothing to do."""
    ls = ls_legacy
    t0 = time.monotonic()
    web = tmp_path / "web"
    web.mkdir()
    Image.new("RGB", (90, 60), (10, 120, 200)).save(web / "web.png")
    with serve_directory(web) as web_url:
        pid = ls.create_project(CONFIG, title="annotate filters")["id"]
        uploads = [png_factory(f"u{i}.png", 50 + i, 40 + i) for i in range(5)]
        up_ids = ls.import_files(pid, uploads)
        [web_id, missing_id] = ls.import_urls(pid, [f"{web_url}/web.png", f"{web_url}/gone.png"])
        sizes = {**{i: (50 + k, 40 + k) for k, i in enumerate(up_ids)}, web_id: (90, 60)}
        settings = Settings.from_env(
            {},
            label_studio_url=ls.url,
            label_studio_api_key=ls.user_token,
            demo="random",
            cache_dir=demo_model_dir.parent,
            allowed_hosts=(web_url.split("//", 1)[1].split(":")[0],),
            max_new_tokens=48,
        )
        factory = forced_engine_factory(ANSWERS)
        project = LabelStudioProject(pid, ls.url, ls.user_token)

        def run(**kwargs):
            return annotate_project(
                settings, pid, engine_factory=factory, project=project, progress="off", chunk_size=3, **kwargs
            )

        # --tasks: two of them
        r1 = run(task_filter=TaskFilter(task_ids=(up_ids[0], up_ids[3])))
        assert (r1.listed, r1.skipped, r1.written, r1.failed) == (2, 0, 2, [])
        assert [len(ls.predictions(i)) for i in up_ids] == [1, 0, 0, 1, 0]
        version = r1.model_version

        # a Data Manager tab with one task (id filter): --view
        view = ls.api(
            "POST",
            "/api/dm/views",
            json={
                "project": pid,
                "data": {
                    "filters": {
                        "conjunction": "and",
                        "items": [
                            {
                                "filter": "filter:tasks:id",
                                "operator": "equal",
                                "type": "Number",
                                "value": up_ids[1],
                            }
                        ],
                    }
                },
            },
        ).json()
        r2 = run(task_filter=TaskFilter(view=view["id"]))
        assert (r2.listed, r2.written) == (1, 1)
        assert len(ls.predictions(up_ids[1])) == 1

        # someone else predicts a task with our version while it waits: not written twice
        ls.api(
            "POST",
            "/api/predictions",
            json={"task": up_ids[2], "result": [], "score": 0.0, "model_version": version},
        )
        original = project.tasks

        def stale_listing(*args, **kwargs):  # the listing was made before that prediction
            for info in original(*args, **kwargs):
                yield info if info.id != up_ids[2] else type(info)(info.id, info.data, ())

        project.tasks = stale_listing
        try:
            r3 = run()
        finally:
            project.tasks = original
        assert r3.listed == 7 and r3.skipped == 3 and r3.todo == 4
        assert r3.skipped_late == 1 and r3.written == 2  # u4 and web.png
        assert r3.failed == [missing_id] and not r3.complete
        assert ls.predictions(missing_id) == []
        assert len(ls.predictions(up_ids[2])) == 1
        _check_all(ls, {i: s for i, s in sizes.items() if i != up_ids[2]}, version)

        # last run: only the broken task is left, and it fails again; nothing else is written
        r4 = run()
        assert (r4.skipped, r4.todo, r4.written, r4.failed) == (6, 1, 0, [missing_id])
        assert ls.predictions(missing_id) == []
    E2E_TIMINGS["annotate_filters_s"] = time.monotonic() - t0
