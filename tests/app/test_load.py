"""A CI-sized run of bench/load_test.py: 4 clients for 20 s against the real server on 127.0.0.1
(bulk requests of 4-12 tasks; the full run and its figures: bench/LOAD.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_four_clients_for_twenty_seconds_lose_and_reorder_nothing(tmp_path, demo_model_dir):
    load = load_module()
    # smaller bulk requests than the full run, so that those still in flight at the deadline
    # end soon on a busy 2-CPU CI machine
    summary = load.run(
        clients=4,
        duration=20,
        threads=8,
        bulk_tasks=(4, 12),
        workdir=tmp_path,
        env={"MOLMO_CACHE_DIR": str(demo_model_dir.parent)},
    )
    print(load.markdown(summary))  # shown by pytest -rA or on failure
    tasks, requests, health = summary["tasks"], summary["requests"], summary["health"]
    assert requests["open"] >= 4 and requests["bulk"] >= 2, requests  # both kinds really ran
    assert tasks["ok"] > 0 and tasks["empty_as_expected"] > 0, tasks
    assert tasks["lost"] == 0 and tasks["reordered"] == 0 and tasks["wrong"] == 0, tasks
    assert tasks["ok"] + tasks["empty_as_expected"] == tasks["total"]
    assert summary["errors"] == [] and requests["failed"] == 0
    assert health["failures"] == 0 and health["count"] >= 50
    assert health["p99_s"] < 1.0, health
    assert summary["server"]["alive"] and summary["server"]["server_errors"] == 0
    assert summary["server"]["scheduler"]["pending"] == 0
    assert load.passed(summary)
