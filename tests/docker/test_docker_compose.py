"""docker-compose.yml for real: the built images, the stack up, driven through Label Studio.

Run by .ci/docker.sh (the Docker stage of scripts/test's full run), which installs and starts the
engine and builds the images first; elsewhere these tests skip and say so. What a user does after
`docker compose up`, in both token modes: create a keypoint project, upload files and import image
URLs, connect the model by its service URL ``http://molmo-backend:9090``, "Retrieve predictions",
open a new task, retrieve again; the backend's HEALTHCHECK status as ``docker inspect`` reports it;
then ``down -v``. The stack is tests/support/docker_stack.py's CPU-only copy of docker-compose.yml (no GPU
reservation, ports on loopback, an ``images`` web server for the URL tasks). The backend serves its
demo model there (``MOLMO_DEMO=auto``, no GPU): the checks are the protocol's (one prediction per
task of the backend's model_version, regions of that task's image, every image fetched), not where
the points fall.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.docker_stack import ComposeStack, seconds_to_healthy, wait_http, write_ci_compose
from tests.support.labelstudio import LabelStudio
from tests.support.processes import free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("MOLMO_DOCKER_STAGE") != "1",
        reason="Docker stage: .ci/docker.sh starts the engine, builds the images "
        "and runs these (scripts/test runs it in a full run, as root)",
    ),
]

PROFILE = "molmo2"  # the stack's backend: the demo model is a Molmo2
DOCKER_TIMINGS: dict[str, float] = {}

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" prompt="black dogs" background="blue"/>
  </KeyPointLabels>
</View>"""
LABELS = {"cat", "dog"}


@pytest.fixture(scope="module", autouse=True)
def _report_docker_time(request):
    """Prints where the stage's test time went (stack start, backend healthy, each flow)."""
    started = time.monotonic()
    yield
    DOCKER_TIMINGS["docker_tests_total_s"] = time.monotonic() - started
    line = "docker timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in DOCKER_TIMINGS.items())
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print("\n" + line)


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300, check=True).stdout


@pytest.mark.parametrize("profile, transformers_major", [("molmo2", "5"), ("molmo1", "4")])
def test_profile_image_holds_its_pinned_stack(profile, transformers_major):
    """Each profile's image (built by the stage) runs the CLI and carries its transformers major;
    both were built from the same torch layer (one copy of torch's 5.5 GB on disk)."""
    image = f"molmo-backend:{profile}"
    code = (
        "import transformers, torch, molmo_backend, os; "
        "print(transformers.__version__, torch.__version__, open('/app/PROFILE').read().strip(), "
        "os.environ['MOLMO_PROFILE'], os.getuid())"
    )
    out = _docker("run", "--rm", "--entrypoint", "python", image, "-c", code).split()
    assert out[0].split(".")[0] == transformers_major, out
    assert out[2] == out[3] == profile and out[4] != "0", out
    help_text = _docker("run", "--rm", image, "serve", "--help")
    assert "MOLMO_MODEL" in help_text
    # Triton builds its kernels' launchers (C, with Python's headers) at first use on a GPU: the
    # split-key decode attention (MOLMO_TRITON_KERNELS) needs a compiler in the image
    build = (
        "import shutil, subprocess, sysconfig; "
        "subprocess.run([shutil.which('gcc'), '-fsyntax-only', '-x', 'c', '-', "
        "'-I' + sysconfig.get_paths()['include']], input=b'#include <Python.h>\\n', check=True); "
        "print('built')"
    )
    assert _docker("run", "--rm", "--entrypoint", "python", image, "-c", build).strip() == "built"

    def torch_layer(img: str) -> str:
        rows = _docker("history", "--no-trunc", "--format", "{{.ID}}\t{{.CreatedBy}}", img)
        [layer] = [r.split("\t")[0] for r in rows.splitlines() if "/tmp/torch.txt" in r]
        return layer

    assert torch_layer(image) == torch_layer("molmo-backend:molmo2")


def _write_png(path: Path, size: tuple[int, int], color) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _metrics(url: str) -> dict:
    r = requests.get(f"{url}/metrics", params={"format": "json"}, timeout=10)
    r.raise_for_status()
    return r.json()["scheduler"]


def _check_predictions(ls: LabelStudio, sizes: dict[int, tuple[int, int]], model_version: str):
    """Exactly one stored prediction per task, of this model_version; each region a keypoint of the
    config on that task's own image (its original size), in range."""
    for task_id, size in sizes.items():
        preds = ls.predictions(task_id)
        assert len(preds) == 1, f"task {task_id}: {len(preds)} predictions: {preds}"
        [pred] = preds
        assert pred["model_version"] == model_version
        for region in pred["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == (
                "kp",
                "image",
                "keypointlabels",
            )
            assert (region["original_width"], region["original_height"]) == size, task_id
            [label] = region["value"]["keypointlabels"]
            assert label in LABELS
            assert 0 <= region["value"]["x"] <= 100 and 0 <= region["value"]["y"] <= 100


@pytest.mark.parametrize("mode", ["legacy", "pat"])
def test_compose_stack_end_to_end(mode, tmp_path):
    """legacy: `docker compose up` as the file ships (legacy tokens on, no key: the backend uses the
    token that /setup hands it). pat: legacy tokens off before the first start, a personal access
    token created in Label Studio, then `LABEL_STUDIO_API_KEY=<PAT> docker compose up -d
    molmo-backend` (the file's header comment)."""
    t0 = time.monotonic()
    images_dir = tmp_path / "www"
    images_dir.mkdir(mode=0o755)
    images_dir.chmod(0o755)  # the images service reads it as the image's unprivileged user
    for name, size, color in [("web.png", (320, 200), (10, 120, 200)), ("odd.png", (123, 77), (90, 90, 10))]:
        _write_png(images_dir / name, size, color).chmod(0o644)
    compose_file = write_ci_compose(
        tmp_path / "docker-compose.ci.yml",
        images_dir=images_dir,
        ls_image=os.environ.get("MOLMO_DOCKER_LS_IMAGE"),
    )
    ls_port, backend_port = free_port(), free_port()
    env = {
        "LABEL_STUDIO_USERNAME": "ci@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
        "LABEL_STUDIO_USER_TOKEN": secrets.token_hex(20),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true" if mode == "legacy" else "false",
        "LABEL_STUDIO_PORT": str(ls_port),
        "MOLMO_PORT": str(backend_port),
        "MOLMO_PROFILE": PROFILE,
        "MOLMO_ALLOWED_HOSTS": "images",
    }
    stack = ComposeStack(compose_file, f"molmo-ci-{mode}", env)
    ls_url, backend_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{backend_port}"
    try:
        if mode == "legacy":
            backend_up = stack.up()
        else:
            stack.up("label-studio", "images")
        DOCKER_TIMINGS[f"{mode}_ls_healthy_s"] = wait_http(f"{ls_url}/health", timeout=300)
        ls = LabelStudio.attach(
            ls_url,
            username=env["LABEL_STUDIO_USERNAME"],
            password=env["LABEL_STUDIO_PASSWORD"],
            user_token=env["LABEL_STUDIO_USER_TOKEN"],
            legacy_tokens=mode == "legacy",
        )
        if mode == "pat":
            stack.env["LABEL_STUDIO_API_KEY"] = ls.pat()
            backend_up = stack.up("molmo-backend")
        wait_http(f"{backend_url}/health", timeout=300)
        DOCKER_TIMINGS[f"{mode}_up_to_backend_health_200_s"] = time.monotonic() - backend_up

        project = ls.create_project(CONFIG, title=f"docker {mode}")
        pid = project["id"]
        uploads = [
            _write_png(tmp_path / "red.png", (640, 480), (200, 30, 30)),
            _write_png(tmp_path / "tall.png", (300, 500), (30, 200, 30)),
        ]
        sizes = dict(zip(ls.import_files(pid, uploads), [(640, 480), (300, 500)]))
        urls = [f"http://images:8000/{n}" for n in ("web.png", "odd.png")]
        sizes.update(zip(ls.import_urls(pid, urls), [(320, 200), (123, 77)]))
        assert [t["data"]["image"].startswith("/data/upload/") for t in ls.tasks(pid)] == [
            True,
            True,
            False,
            False,
        ]

        # Settings > Model > Connect Model, by the service name on the compose network
        ml = ls.connect_ml(pid, "http://molmo-backend:9090")
        assert ml["state"] == "CO", ml
        model_version = ml["model_version"]
        assert model_version

        # Data Manager: select all > Retrieve predictions; every image fetched and asked about
        before = _metrics(backend_url)
        t_flow = time.monotonic()
        answer = ls.retrieve_predictions(pid)
        DOCKER_TIMINGS[f"{mode}_retrieve_s"] = time.monotonic() - t_flow
        assert answer.get("processed_items") == 4, answer
        _check_predictions(ls, sizes, model_version)
        after = _metrics(backend_url)
        assert after["queries"] - before["queries"] == len(sizes) * len(LABELS)
        assert after["failed_queries"] == before["failed_queries"]

        # a new upload, opened in the labeling UI: predicted on open
        [late] = ls.import_files(pid, [_write_png(tmp_path / "late.png", (200, 150), (0, 0, 200))])
        sizes[late] = (200, 150)
        t_open = time.monotonic()
        assert ls.open_task(late)["id"] == late
        DOCKER_TIMINGS[f"{mode}_open_task_s"] = time.monotonic() - t_open
        _check_predictions(ls, sizes, model_version)
        assert _metrics(backend_url)["queries"] - after["queries"] == len(LABELS)

        # Retrieve predictions again: every task holds this version already, nothing is added
        ls.retrieve_predictions(pid)
        _check_predictions(ls, sizes, model_version)
        DOCKER_TIMINGS[f"{mode}_flow_s"] = time.monotonic() - t_flow

        logs = stack.logs("molmo-backend")
        assert "image unavailable" not in logs and "image loading failed" not in logs, logs[-3000:]

        # the image's HEALTHCHECK, as Docker runs it (first probe one interval after the start)
        health = stack.wait_healthy("molmo-backend", timeout=180)
        assert health["Status"] == "healthy" and health["Log"][-1]["ExitCode"] == 0, health
        to_healthy = seconds_to_healthy(stack.state("molmo-backend"))
        if to_healthy is not None:
            DOCKER_TIMINGS[f"{mode}_start_to_docker_healthy_s"] = to_healthy
    except BaseException:
        print(f"--- compose logs ({mode}) ---\n{stack.logs(tail=80)}")
        raise
    finally:
        stack.down()
    assert stack.leftovers() == []
    DOCKER_TIMINGS[f"{mode}_test_s"] = time.monotonic() - t0
