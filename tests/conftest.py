"""Shared fixtures: the tiny random demo Molmo2 (built offline once per session), test images, and
``make_backend`` (a real MolmoBackend around a scripted engine, tests/support/scripted.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.support.processes import serve_directory

# Triton's kernels (molmo_backend/engine/flash_decode.py) run on the CPU in its interpreter; it
# is chosen when a kernel is defined, so before any test imports the engine
os.environ.setdefault("TRITON_INTERPRET", "1")

KEYPOINT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </KeyPointLabels>
</View>"""


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=2000,
        help="generated inputs per parser in tests/labelstudio/test_fuzz_parsers.py (default "
        "2000; docs/security.md records a run of 100000)",
    )


def pytest_terminal_summary(terminalreporter):
    from tests.support.fuzzing import REPORT

    for line in REPORT:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fuzz_examples(request) -> int:
    return request.config.getoption("--fuzz-examples")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The random (untrained) tiny Molmo2 that MOLMO_DEMO=random serves: servers started with
    MOLMO_CACHE_DIR=<its parent> reuse this build. Tests force its answers where they need points."""
    from molmo_backend.demo.models import ensure_random_model

    return ensure_random_model(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """A few test images of known sizes."""
    directory = tmp_path_factory.mktemp("images")
    Image.new("RGB", (640, 480), (200, 30, 30)).save(directory / "red-640x480.png")
    Image.new("RGB", (300, 500), (30, 200, 30)).save(directory / "green-300x500.jpg")
    Image.new("RGB", (1280, 960), (30, 30, 200)).save(directory / "blue-1280x960.png")
    return directory


@pytest.fixture(scope="session")
def image_url(image_dir):
    """Base URL of a local static server with the test images."""
    with serve_directory(image_dir) as url:
        yield url


@pytest.fixture
def make_backend():
    """``make_backend(answers, **settings) -> (backend, engine)``; schedulers closed afterwards."""
    from molmo_backend.images.loader import ImageLoader
    from molmo_backend.labelstudio.model import MolmoBackend
    from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE
    from molmo_backend.settings import Settings
    from tests.support.scripted import RecordingScheduler, ScriptedEngine

    made = []

    def make(answers, engine=None, **settings):
        engine = engine or ScriptedEngine(answers)
        scheduler = RecordingScheduler(engine)
        made.append(scheduler)
        config = Settings(**settings)
        backend = MolmoBackend(
            config, scheduler, ImageLoader(config), "scripted@r1", prompt_template=DEFAULT_PROMPT_TEMPLATE
        )
        return backend, engine

    yield make
    for scheduler in made:
        scheduler.close()
