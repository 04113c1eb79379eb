"""forced_server.py with tests/support/net_guard.NetGuard installed before anything else, so
that the real server (gunicorn master and worker) resolves names from a test table and cannot
connect to anything but loopback.

    MOLMO_TEST_NET_NAMES='{"images.test": ["127.0.0.3"], "metadata.test": ["169.254.169.254"]}' \
    MOLMO_TEST_NET_LOG=/tmp/net.jsonl python tests/support/guarded_server.py --port 9191 --answers a.json

``MOLMO_TEST_NET_NAMES``: name -> addresses (or a list of answers, one per lookup: see
net_guard). ``MOLMO_TEST_NET_LOG``: where every lookup and connect is recorded, one JSON object a
line, for the test to read. Arguments and other variables as for forced_server.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.net_guard import NetGuard  # noqa: E402

if __name__ == "__main__":
    log_path = os.environ.get("MOLMO_TEST_NET_LOG")
    NetGuard(
        json.loads(os.environ.get("MOLMO_TEST_NET_NAMES") or "{}"), Path(log_path) if log_path else None
    ).install()
    from tests.support import forced_server

    raise SystemExit(forced_server.main())
