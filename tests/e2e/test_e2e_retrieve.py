""" "Retrieve predictions" over more tasks than fit in the backend's deadline, against a real Label
Studio 1.23.2 and the real server (issue #14; issue #12 point 4 for hang-ups).

The engine is slowed with tests/support/forced_backend.py's MOLMO_TEST_FAULTS ``sleep`` rule (a
batch that matches sleeps that long before it runs) and MOLMO_MAX_BATCH=2, so a few seconds of
deadline hold only part of the tasks. What every test ends with: each task holds exactly one
prediction of this model_version, with the forced points: nothing lost, nothing duplicated.
Select with ``pytest -m e2e``.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from PIL import Image

from tests.support.labelstudio import E2E_TIMINGS, LabelStudio
from tests.support.processes import BackendServer, serve_directory
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat" background="red"/>
  </KeyPointLabels>
</View>"""
CONFIG_WITH_DOG = CONFIG.replace(
    '<Label value="cat" background="red"/>', '<Label value="cat" background="red"/><Label value="dog"/>'
)
ANSWERS = {
    "cat": '<points coords="1 1 250 500">cat</points>',
    "dog": '<points coords="1 1 500 900">dog</points>',
}
CAT, DOG = ("cat", 25.0, 50.0), ("dog", 50.0, 90.0)
DEADLINE_S = 3
#: every batch (it asks about "cat") sleeps this long: 2 tasks per batch, so N tasks take at
#: least N / 2 * SLEEP_S seconds, several times the deadline
SLEEP_S = 0.6
SLOW_ENV = {
    "MOLMO_PREDICT_DEADLINE": str(DEADLINE_S),
    "MOLMO_MAX_BATCH": "2",
    "MOLMO_MAX_NEW_TOKENS": "32",
    "MOLMO_TEST_FAULTS": json.dumps([{"prompt": "cat", "sleep": SLEEP_S}]),
}
WAIT_S = 180
MAX_RETRIEVES = 40


def backend_env(ls: LabelStudio, write_back: bool, demo_model_dir, **extra) -> dict:
    return {
        **SLOW_ENV,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.backend_api_key,
        "MOLMO_WRITE_BACK": "auto" if write_back else "0",
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        **extra,
    }


def metrics(backend) -> dict:
    return requests.get(f"{backend.url}/metrics?format=json", timeout=10).json()["retrieve"]


def settled(backend, expected: int) -> dict | None:
    """The retrieve metrics once answered and written-back tasks add up to ``expected``; None
    before. A count past ``expected`` is returned too, so the caller's assert reports it."""
    stats = metrics(backend)
    return stats if stats["answered_in_time"] + stats["written_back"] >= expected else None


def scheduler_queries(backend) -> int:
    return requests.get(f"{backend.url}/metrics?format=json", timeout=10).json()["scheduler"]["queries"]


def points(pred: dict) -> list[tuple]:
    return sorted(
        (r["value"]["keypointlabels"][0], round(r["value"]["x"], 3), round(r["value"]["y"], 3))
        for r in pred["result"]
    )


def stored(ls: LabelStudio, ids) -> dict[int, list[dict]]:
    return {i: ls.predictions(i) for i in ids}


def check_one_each(
    ls: LabelStudio, sizes: dict[int, tuple[int, int]], version: str, expected=lambda task_id: [CAT]
) -> None:
    """Every task: exactly one prediction, of ``version``, the forced points, sized right."""
    for task_id, size in sizes.items():
        preds = ls.predictions(task_id)
        assert len(preds) == 1, f"task {task_id}: {len(preds)} predictions"
        [pred] = preds
        assert pred["model_version"] == version
        assert points(pred) == sorted(expected(task_id)), f"task {task_id}: {points(pred)}"
        assert all((r["original_width"], r["original_height"]) == size for r in pred["result"])


def upload_project(ls: LabelStudio, png_factory, n: int, title: str, config: str = CONFIG):
    pid = ls.create_project(config, title=title)["id"]
    sizes_list = [(60 + 2 * i, 40 + i) for i in range(n)]
    files = [png_factory(f"r{i}.png", w, h) for i, (w, h) in enumerate(sizes_list)]
    return pid, dict(zip(ls.import_files(pid, files), sizes_list))


def until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def retrieve_until_all_stored(ls: LabelStudio, pid: int, ids) -> int:
    """Retrieve predictions again and again, as a user would, until every task holds one;
    returns how many retrieves it took."""
    for n in range(1, MAX_RETRIEVES + 1):
        ls.retrieve_predictions(pid)
        if all(stored(ls, ids).values()):
            return n
    pytest.fail(f"tasks still without a prediction after {MAX_RETRIEVES} retrieves")


@pytest.mark.parametrize("mode", ["legacy", "pat", "legacy-write-back", "pat-write-back"])
def test_a_retrieve_past_the_deadline_ends_with_one_prediction_per_task(
    mode, request, png_factory, tmp_path, demo_model_dir
):
    """30 uploaded tasks, 3 s of deadline, a slowed engine. The first retrieve stores only
    finished tasks, one prediction each. Then either repeated retrieves (the rest come from the
    backend's memory, or are waited for) or, with LABEL_STUDIO_URL + API key, the backend's own
    write-back finish the job: every task ends with exactly one prediction."""
    t0 = time.monotonic()
    ls = request.getfixturevalue("ls_pat" if mode.startswith("pat") else "ls_legacy")
    write_back = mode.endswith("write-back")
    pid, sizes = upload_project(ls, png_factory, 30, f"retrieve {mode}")
    with BackendServer(tmp_path, env=backend_env(ls, write_back, demo_model_dir), answers=ANSWERS) as backend:
        version = ls.connect_ml(pid, backend.url)["model_version"]
        started = time.monotonic()
        answer = ls.retrieve_predictions(pid)
        first_s = time.monotonic() - started
        # Label Studio counts the tasks it sent, not the predictions it stored
        assert answer["detail"] == "Retrieved 30 predictions"
        after_first = metrics(backend)
        assert after_first["deadlines_hit"] == 1 and 0 <= after_first["answered_in_time"] < 30
        assert after_first["deferred"] == 30 - after_first["answered_in_time"]
        assert all(len(p) <= 1 for p in stored(ls, sizes).values())
        if write_back:
            until(lambda: all(stored(ls, sizes).values()), "the write-back to store the rest")
            # the write-back counts a chunk after Label Studio has stored it: the last count may
            # land just after the test sees every task stored, so wait for it too
            final = until(lambda: settled(backend, 30), "the write-back to count what it stored")
            assert final["written_back"] + final["answered_in_time"] == 30
            assert final["write_back_failures"] == 0
            retrieves = 1
            ls.retrieve_predictions(pid)  # nothing left to send; nothing may be added
        else:
            retrieves = 1 + retrieve_until_all_stored(ls, pid, sizes)
            final = metrics(backend)
            assert final["answered_in_time"] == 30 and final["written_back"] == 0
        check_one_each(ls, sizes, version)
    E2E_TIMINGS[f"retrieve_{mode}_s"] = time.monotonic() - t0
    E2E_TIMINGS[f"retrieve_{mode}_first_retrieve_s"] = first_s
    E2E_TIMINGS[f"retrieve_{mode}_retrieves"] = retrieves


@pytest.fixture(scope="module")
def impatient_ls():
    """A Label Studio that gives a backend only 2 s per /predict (ML_TIMEOUT_PREDICT), so it
    hangs up on a backend whose deadline is longer."""
    with LabelStudio(legacy_tokens=True, extra_env={"ML_TIMEOUT_PREDICT": "2"}) as ls:
        yield ls


def test_label_studio_hanging_up_keeps_bulk_work_and_drops_an_opened_task(
    impatient_ls, png_factory, tmp_path, demo_model_dir
):
    """Label Studio gives up on a retrieve after 2 s (the backend's deadline is 60 s): it stores
    nothing; the backend sees the hang-up and its bulk work goes on, kept for the next retrieve.
    An opened task queued behind a slow batch, given up on too, is dropped from the queue and
    never computed. Retrieves then end with one prediction per task."""
    ls = impatient_ls
    slow = (91, 61)  # a batch holding this image sleeps 8 s: it holds the GPU worker that long
    env = backend_env(
        ls,
        False,
        demo_model_dir,
        MOLMO_PREDICT_DEADLINE="60",
        MOLMO_MAX_BATCH="1",
        MOLMO_TEST_FAULTS=json.dumps([{"image_size": list(slow), "sleep": 8}]),
    )
    pid = ls.create_project(CONFIG, title="hang-ups")["id"]
    sizes_list = [slow, (70, 50), (71, 50)]
    ids = ls.import_files(pid, [png_factory(f"h{i}.png", *s) for i, s in enumerate(sizes_list)])
    sizes = dict(zip(ids, sizes_list))
    [opened] = ls.import_files(pid, [png_factory("open.png", 72, 50)])
    with BackendServer(tmp_path, env=env, answers=ANSWERS) as backend:
        version = ls.connect_ml(pid, backend.url)["model_version"]
        faults = backend.log.count("injected fault")
        ls.retrieve_predictions(pid, task_ids=ids)  # Label Studio gives up after 2 s
        assert not any(stored(ls, ids).values())
        until(lambda: backend.log.count("injected fault") > faults, "the slow batch to start")
        ls.open_task(opened)  # queued behind it; Label Studio gives up on it after 2 s too
        assert ls.predictions(opened) == []
        m = until(lambda: (m := metrics(backend))["completed_later"] == 3 and m, "the bulk work")
        assert m["clients_gone"] == 2 and m["cancelled_gone"] == 1
        scheduler = requests.get(f"{backend.url}/metrics?format=json", timeout=10).json()["scheduler"]
        assert scheduler["cancelled"] == 1 and scheduler["queries"] == 3  # the opened one: never
        retrieve_until_all_stored(ls, pid, [*ids, opened])
        assert metrics(backend)["served_from_cache"] == 3
        check_one_each(ls, {**sizes, opened: (72, 50)}, version)


def test_a_changed_label_config_is_not_answered_with_results_of_the_old_one(
    ls_legacy, png_factory, tmp_path, demo_model_dir
):
    """Retrieve 16 tasks past the deadline; the deferred ones finish and are kept. The user adds
    a label to the config: the next retrieves predict those tasks for the new config (cat and
    dog), none of the kept cat-only results is served."""
    ls = ls_legacy
    pid, sizes = upload_project(ls, png_factory, 16, "config change")
    with BackendServer(tmp_path, env=backend_env(ls, False, demo_model_dir), answers=ANSWERS) as backend:
        version = ls.connect_ml(pid, backend.url)["model_version"]
        ls.retrieve_predictions(pid)
        first = {i for i, p in stored(ls, sizes).items() if p}
        assert len(first) < 16
        until(lambda: metrics(backend)["completed_later"] == 16 - len(first), "the deferred work")
        queries = scheduler_queries(backend)
        ls.api("PATCH", f"/api/projects/{pid}", json={"label_config": CONFIG_WITH_DOG})
        retrieve_until_all_stored(ls, pid, sizes)
        # every task still without a prediction was asked anew, about both labels
        assert scheduler_queries(backend) - queries == 2 * (16 - len(first))
        check_one_each(ls, sizes, version, expected=lambda i: [CAT] if i in first else [CAT, DOG])


def test_label_studio_down_during_the_write_back(ls_pat, tmp_path, demo_model_dir):
    """PAT mode, images by URL. The backend reaches Label Studio through a proxy that is down:
    the write-back of the deferred tasks is retried, then given up and logged; the predictions
    stay in memory, and once Label Studio is back the next retrieve answers them at once."""
    ls = ls_pat
    web = tmp_path / "web"
    web.mkdir()
    sizes_list = [(50 + i, 40) for i in range(20)]
    for i, size in enumerate(sizes_list):
        Image.new("RGB", size, (10, 120, 200)).save(web / f"w{i}.png")
    proxy = TcpProxy(int(ls.url.rsplit(":", 1)[1])).up()
    proxy.down()
    try:
        with serve_directory(web) as web_url:
            pid = ls.create_project(CONFIG, title="write-back down")["id"]
            ids = ls.import_urls(pid, [f"{web_url}/w{i}.png" for i in range(20)])
            sizes = dict(zip(ids, sizes_list))
            env = backend_env(
                ls,
                True,
                demo_model_dir,
                LABEL_STUDIO_URL=proxy.url,
                MOLMO_ALLOWED_HOSTS=web_url.split("//", 1)[1],
            )
            with BackendServer(tmp_path, env=env, answers=ANSWERS) as backend:
                version = ls.connect_ml(pid, backend.url)["model_version"]
                ls.retrieve_predictions(pid)
                m = metrics(backend)
                deferred = m["deferred"]
                assert deferred > 0
                until(
                    lambda: metrics(backend)["write_back_failures"] == deferred, "the write-back to give up"
                )
                assert "write-back to Label Studio failed" in backend.log
                assert metrics(backend)["kept"] == deferred
                assert sum(len(p) for p in stored(ls, ids).values()) == m["answered_in_time"]
                proxy.up()
                ls.retrieve_predictions(pid)
                assert metrics(backend)["served_from_cache"] == deferred
                check_one_each(ls, sizes, version)
    finally:
        proxy.down()


def test_a_restart_in_the_middle_keeps_what_was_written_and_predicts_the_rest(
    ls_pat, png_factory, tmp_path, demo_model_dir
):
    """Write-back on; the backend is stopped after the first retrieve while its deferred work is
    being written. A new backend (nothing in memory) and repeated retrieves: every task ends with
    one prediction; what was written before the restart is not written again."""
    ls = ls_pat
    pid, sizes = upload_project(ls, png_factory, 30, "restart")
    env = backend_env(ls, True, demo_model_dir)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    with BackendServer(tmp_path / "one", env=env, answers=ANSWERS) as backend:
        ml = ls.connect_ml(pid, backend.url)
        version = ml["model_version"]
        ls.retrieve_predictions(pid)
        until(lambda: metrics(backend)["written_back"] >= 2, "some deferred tasks to be written")
    before_restart = {i for i, p in stored(ls, sizes).items() if p}
    assert all(len(p) <= 1 for p in stored(ls, sizes).values())
    ls.api("DELETE", f"/api/ml/{ml['id']}", expect=(200, 204))
    with BackendServer(tmp_path / "two", env=env, answers=ANSWERS) as backend:
        assert ls.connect_ml(pid, backend.url)["model_version"] == version
        retrieve_until_all_stored(ls, pid, sizes)
        missing = 30 - len(before_restart)
        after = until(lambda: settled(backend, missing), "the backend to count what it stored")
        # only what was missing was computed and stored again
        assert after["answered_in_time"] + after["written_back"] == missing
    check_one_each(ls, sizes, version)
