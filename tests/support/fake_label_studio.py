"""An in-memory stand-in for what the backend uses of label-studio-sdk's ``LabelStudio`` client
(projects.get, projects.import_predictions, tasks.list), for annotate's and the write-back's
unit tests: no HTTP at all, the client object itself is replaced.

Not to be confused with tests/support/http_fixtures.FakeLabelStudio, a real HTTP server that
plays Label Studio's auth (tokens, the PAT exchange, protected files) for the backend's HTTP
client; the two share a name, not a job. The real Label Studio runs in the e2e tests
(tests/support/labelstudio.py)."""

from __future__ import annotations

import json


class StatusError(Exception):
    def __init__(self, status_code, body=None):
        super().__init__(f"HTTP {status_code}")
        self.status_code, self.body = status_code, body


class FakeLabelStudio:
    """What annotate uses of label-studio-sdk's ``LabelStudio`` client, over a dict of tasks."""

    def __init__(self, tasks: dict[int, dict], config: str):
        self.config = config
        self.store = {i: {"id": i, "data": data, "predictions": []} for i, data in tasks.items()}
        self.writes: list[list[int]] = []
        self.views: list = []  # the view= of each listing (this stand-in does not filter by it)
        self.fail_writes: list[Exception] = []  # raised after storing, one per write
        self.projects = self._Projects(self)
        self.tasks = self._Tasks(self)

    class _Projects:
        def __init__(self, ls):
            self.ls = ls

        def get(self, id):
            return {"id": id, "label_config": self.ls.config}

        def import_predictions(self, id, request, request_options=None):
            assert request_options == {"max_retries": 0}
            for row in request:
                self.ls.store[row["task"]]["predictions"].append(dict(row))
            self.ls.writes.append([row["task"] for row in request])
            if self.ls.fail_writes:
                raise self.ls.fail_writes.pop(0)
            return {"created": len(request)}

    class _Tasks:
        def __init__(self, ls):
            self.ls = ls

        def list(self, project, fields, page_size, query=None, view=None):
            assert fields == "all"
            self.ls.views.append(view)
            ids = sorted(self.ls.store)
            if query:
                selected = json.loads(query).get("selectedItems")
                if selected:
                    ids = [i for i in ids if i in selected["included"]]
            return iter([json.loads(json.dumps(self.ls.store[i])) for i in ids])

    def predictions(self, task_id: int) -> list[dict]:
        return self.store[task_id]["predictions"]
