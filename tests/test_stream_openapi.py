"""A running ``unirec worker`` (embedded broker, tiny checkpoint, ``--api-token``) against its
committed OpenAPI document (``stream/openapi.json``), fuzzed by schemathesis: no request it
generates gets a 5xx, and every response's status code, content type, headers and body conform
to the document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from stream_fixtures import REPO, WorkerProcess, http_get, tiny_checkpoint, wait_for

from stream.broker import EmbeddedBroker
from stream.producer import replay_events, synthetic_events
from stream.topics import TopicNames, ensure_topics

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

TOKEN = "openapi-test-token"
PREFIX = "openapi-"
EXAMPLES = 25  # per operation: six operations stay well within a minute on two cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_path(REPO / "stream" / "openapi.json")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with a token, serving users that have events, ready (partitions assigned)."""
    tmp = tmp_path_factory.mktemp("openapi")
    with EmbeddedBroker(log_dir=tmp) as broker:
        bootstrap = broker.bootstrap_servers
        topics = TopicNames.with_prefix(PREFIX)
        ensure_topics(bootstrap, 2, topics=topics)
        replay_events(synthetic_events(200, seed=11), bootstrap, topics, negatives=2, seed=11)
        running = WorkerProcess(bootstrap, tiny_checkpoint(tmp / "model.pt"), tmp / "store",
                                tmp / "worker.log", prefix=PREFIX,
                                extra=("--no-train", "--api-token", TOKEN))
        try:
            wait_for(lambda: http_get(running.url + "/healthz")[0] == 200, 60, running,
                     "a ready worker")
            yield running
        finally:
            running.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_worker_api_conforms_to_its_openapi_document(case: schemathesis.Case,
                                                        worker: WorkerProcess) -> None:
    case.call_and_validate(base_url=worker.url, headers={"Authorization": f"Bearer {TOKEN}"},
                           checks=CHECKS, timeout=30)


def test_the_worker_needs_its_token_on_every_documented_path_but_healthz(
        worker: WorkerProcess) -> None:
    """``--api-token`` reaches the server: without it each documented GET path but /healthz
    is a JSON 401, and /healthz reports the loop's assigned partitions."""
    document = json.loads((Path(REPO) / "stream" / "openapi.json").read_text())
    for path, item in document["paths"].items():
        if "get" not in item:
            continue
        status, body = http_get(worker.url + path.replace("{user_id}", "u1"))
        if path == "/healthz":
            reply = json.loads(body)
            assert status == 200 and reply["status"] == "ok"
            assert reply["loop"]["assigned_partitions"][PREFIX + "interactions"] == [0, 1]
        else:
            assert status == 401 and "bearer token" in json.loads(body)["error"], path
