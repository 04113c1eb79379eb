"""/metrics in Prometheus' text format, scraped from the real server (gunicorn, demo model) and
parsed with prometheus-client's own parser; ``?format=json`` keeps the JSON view."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEYPOINT_CONFIG
from tests.support.processes import BackendServer

#: the families operators build dashboards on (docs/metrics.md)
EXPECTED = {
    "molmo_state": "gauge",
    "molmo_server_events": "counter",
    "molmo_request_seconds": "histogram",
    "molmo_queue_depth": "gauge",
    "molmo_rows_running": "gauge",
    "molmo_pairs_per_second": "gauge",
    "molmo_pair_latency_seconds": "histogram",
    "molmo_scheduler_truncated": "counter",
    "molmo_scheduler_queries": "counter",
    "molmo_fetch_failures": "counter",
    "molmo_retrieve_deadlines_hit": "counter",
    "molmo_retrieve_deferred": "counter",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, image_url):
    with BackendServer(
        tmp_path_factory.mktemp("metrics"), env={"MOLMO_ALLOWED_HOSTS": "127.0.0.1"}
    ) as backend:
        tasks = [
            {"id": 1, "data": {"image": f"{image_url}/red-640x480.png"}},
            {"id": 2, "data": {"image": f"{image_url}/missing.png"}},
            {"id": 3, "data": {"image": "ftp://example.invalid/x.png"}},
        ]
        body = {"tasks": tasks, "label_config": KEYPOINT_CONFIG}
        assert requests.post(f"{backend.url}/predict", json=body, timeout=120).status_code == 200
        yield backend


def scrape(url) -> dict:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def test_a_scrape_parses_and_holds_every_documented_family(server):
    families = scrape(server.url)
    for name, kind in EXPECTED.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)


def test_the_figures_follow_what_the_server_did(server):
    families = scrape(server.url)

    samples = [sample for family in families.values() for sample in family.samples]

    def value(name, **labels):
        found = [
            s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, (name, labels)
        return found[0].value

    assert value("molmo_state", state="ready") == 1.0 and value("molmo_state", state="loading") == 0.0
    assert value("molmo_scheduler_queries_total") == 2  # one task loaded, two labels
    assert value("molmo_fetch_failures_total", reason="http_status") == 1  # missing.png: 404
    assert value("molmo_fetch_failures_total", reason="bad_reference") == 1  # ftp://
    assert value("molmo_pair_latency_seconds_count", priority="bulk") == 2
    assert value("molmo_request_seconds_count", route="/predict", status="200") == 1
    assert value("molmo_queue_depth", priority="interactive") == 0 and value("molmo_rows_running") == 0
    assert value("molmo_server_events_total", event="predict_requests") == 1


def test_the_json_view_stays_for_scripts(server):
    body = requests.get(f"{server.url}/metrics?format=json", timeout=10).json()
    assert body["state"] == "ready" and body["scheduler"]["queries"] == 2
    assert body["fetch_failures"]["http_status"] == 1 and "retrieve" in body
