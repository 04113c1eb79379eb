"""A "Retrieve predictions" over thousands of tasks in a real Label Studio 1.23.2, against the real
server on the demo model: how many retrieves (or how long the write-back) until every task holds
exactly one prediction.

    python bench/big_retrieve.py --tasks 5000 --mode repeat --json out.json
    python bench/big_retrieve.py --tasks 5000 --mode write-back

``repeat``: MOLMO_WRITE_BACK=0; the user retrieves again until every task holds a prediction.
``write-back``: LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY set; one retrieve, then the backend writes
the deferred tasks itself as they finish (and what it had to give up on is retrieved again). Tasks are image URLs served from a local directory
(one 64x48 PNG per task, all different), the config has two keypoint labels; the demo model
answers with its own (random) text. Label Studio runs with legacy tokens on (tests/support/labelstudio.py
installs it on first use); everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.labelstudio import LabelStudio  # noqa: E402
from tests.support.processes import BackendServer, serve_directory  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </KeyPointLabels>
</View>"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def counts(ls: LabelStudio, pid: int, version: str) -> dict:
    """Tasks holding 0, 1, 2+ predictions, and predictions of another version."""
    out = {"none": 0, "one": 0, "more": 0, "foreign": 0}
    page = 1
    while True:
        r = ls.api(
            "GET",
            "/api/tasks",
            expect=(200, 404),
            timeout=600,
            params={"project": pid, "page": page, "page_size": 1000, "fields": "all"},
        )
        if r.status_code == 404:
            return out
        tasks = r.json()["tasks"]
        for task in tasks:
            versions = [p.get("model_version") for p in task.get("predictions") or []]
            n = len(versions)
            out["none" if n == 0 else "one" if n == 1 else "more"] += 1
            out["foreign"] += sum(1 for v in versions if v != version)
        if len(tasks) < 1000:
            return out
        page += 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--mode", choices=["repeat", "write-back"], default="repeat")
    parser.add_argument("--deadline", type=float, default=90.0, help="MOLMO_PREDICT_DEADLINE")
    parser.add_argument("--max-retrieves", type=int, default=50)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="MOLMO_MAX_NEW_TOKENS: the "
        "random demo model talks until this cap, so it sets the engine's speed",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report: dict = {
        "tasks": args.tasks,
        "mode": args.mode,
        "deadline_s": args.deadline,
        "max_new_tokens": args.max_new_tokens,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "retrieves": [],
    }
    with tempfile.TemporaryDirectory(prefix="big-retrieve-") as tmp_name:
        tmp = Path(tmp_name)
        web = tmp / "web"
        web.mkdir()
        for i in range(args.tasks):
            Image.new("RGB", (64, 48), (i % 251, (i // 251) % 251, 90)).save(web / f"{i}.png")
        with LabelStudio(legacy_tokens=True, log=log) as ls, serve_directory(web) as web_url:
            pid = ls.create_project(CONFIG, title="big retrieve")["id"]
            t = time.monotonic()
            for start in range(0, args.tasks, 1000):
                ls.import_urls(
                    pid, [f"{web_url}/{i}.png" for i in range(start, min(start + 1000, args.tasks))]
                )
            report["import_s"] = round(time.monotonic() - t, 1)
            log(f"imported {args.tasks} tasks in {report['import_s']} s")
            env = {
                "MOLMO_PREDICT_DEADLINE": str(args.deadline),
                "MOLMO_MAX_NEW_TOKENS": str(args.max_new_tokens),
                "MOLMO_ALLOWED_HOSTS": web_url.split("//", 1)[1],
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.user_token,
                "MOLMO_WRITE_BACK": "auto" if args.mode == "write-back" else "0",
            }
            (tmp / "backend").mkdir()
            with BackendServer(tmp / "backend", env=env) as backend:
                version = ls.connect_ml(pid, backend.url)["model_version"]
                report["model_version"] = version
                started = time.monotonic()

                def retrieve(n: int) -> dict:
                    t = time.monotonic()
                    answer = ls.api(
                        "POST",
                        "/api/dm/actions",
                        timeout=1800,
                        params={"id": "retrieve_tasks_predictions", "project": pid},
                        json={"selectedItems": {"all": True, "excluded": []}},
                    ).json()
                    seconds = time.monotonic() - t
                    now = counts(ls, pid, version)
                    metrics = requests.get(f"{backend.url}/metrics?format=json", timeout=30).json()[
                        "retrieve"
                    ]
                    report["retrieves"].append(
                        {
                            "n": n,
                            "at_s": round(time.monotonic() - started, 1),
                            "seconds": round(seconds, 1),
                            "detail": answer.get("detail"),
                            **now,
                            "backend": metrics,
                        }
                    )
                    log(
                        f"retrieve {n}: {seconds:.1f} s, LS says {answer.get('detail')!r}; tasks "
                        f"with one prediction: {now['one']}, none: {now['none']}, more: {now['more']}"
                    )
                    return now

                now = retrieve(1)
                if args.mode == "write-back":
                    # the write-back stores the rest; what it had to give up on (Label Studio too
                    # busy or down) waits for another retrieve
                    while True:
                        m = requests.get(f"{backend.url}/metrics?format=json", timeout=30).json()["retrieve"]
                        now = counts(ls, pid, version)
                        log(
                            f"write-back: {now['one']} tasks hold a prediction; backend: in flight "
                            f"{m['in_flight']}, kept {m['kept']}, written {m['written_back']}, "
                            f"failures {m['write_back_failures']}"
                        )
                        given_up = (
                            m["write_back_failures"] and m["in_flight"] == 0 and m["kept"] == now["none"]
                        )
                        if now["none"] == 0 or given_up:
                            break
                        time.sleep(10)
                    report["write_back_done_s"] = round(time.monotonic() - started, 1)
                for n in range(2, args.max_retrieves + 1):
                    if now["none"] == 0:
                        break
                    now = retrieve(n)
                report["total_s"] = round(time.monotonic() - started, 1)
                report["final"] = counts(ls, pid, version)
                report["backend"] = requests.get(f"{backend.url}/metrics?format=json", timeout=30).json()
    log(
        f"done: {json.dumps(report['final'])} in {report['total_s']} s after "
        f"{len(report['retrieves'])} retrieve(s)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = report["final"]["none"] == 0 and report["final"]["more"] == 0 and not report["final"]["foreign"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
