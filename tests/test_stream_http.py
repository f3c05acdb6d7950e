"""The HTTP API through a real server on a free 127.0.0.1 port (started and stopped here), and
``unirec state``'s snapshot logic."""

from __future__ import annotations

import json
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from model_fixtures import (
    PROFILES,
    T0,
    context,
    event,
    fresh_model,
    make_candidates,
    one_torch_thread,
)
from prometheus_client.parser import text_string_to_metric_families

from eventlog.schema import Impression, Interaction, encode, to_builtins
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.scorer import Scorer
from state_store import StateStore, StoreConfig
from state_store.keys import encode_user_ids, state_key
from stream.applier import InteractionApplier
from stream.dead_letters import ConsumedRecord
from stream.http_api import (
    ApiRequestError,
    ApiServer,
    ApiServices,
    UnknownUserError,
    fetch_state,
    handle,
    state_snapshot,
)
from stream.metrics import WorkerMetrics
from stream.serving import ImpressionScorer

CFG = ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, dropout=0.0)
STORE = StoreConfig(state_dim=16, history_len=6)
VERSION = 3
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def make_model(seed: int) -> UniRecModel:
    """``model_fixtures.fresh_model`` (logits that move with the inputs) with this module's
    config."""
    return fresh_model(seed, **CFG.to_dict())


SCORER = Scorer(make_model(0), torch.device("cpu"))


@pytest.fixture
def store_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as directory:
        yield Path(directory) / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[StateStore]:
    with StateStore.open(store_dir, STORE) as opened:
        yield opened


def apply_events(store: StateStore, users: Sequence[str]) -> list[Interaction]:
    """Apply one event per entry of ``users`` after the stored offset; the events."""
    stored = store.offset("interactions", 0)
    first = 0 if stored is None else stored.next_offset
    rng = np.random.default_rng(first)
    events = [event(rng, u, T0 + 60.0 * (first + k), first + k) for k, u in enumerate(users)]
    records = [ConsumedRecord(first + k, e.user_id.encode(), encode(e))
               for k, e in enumerate(events)]
    InteractionApplier(store, SCORER.model, VERSION).apply(
        "interactions", 0, "log", records, records[-1].offset
    )
    return events


def impression_body(user: str = "u1", n_cands: int = 5, **changes: Any) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    impression = Impression("r1", user, T0 + 1e5, make_candidates(3, n_cands), context(rng))
    return {**to_builtins(impression), **changes}


def request(url: str, method: str = "GET", body: bytes | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def request_json(url: str, method: str = "GET", body: bytes | None = None
                 ) -> tuple[int, Any]:
    status, headers, data = request(url, method, body)
    assert headers["Content-Type"].startswith("application/json"), (status, data)
    return status, json.loads(data)


@pytest.fixture
def services(store: StateStore) -> ApiServices:
    scorer = ImpressionScorer(store, SCORER, VERSION, PROFILES)
    return ApiServices(store=store, scorer=scorer, metrics=WorkerMetrics())


@pytest.fixture
def server(services: ApiServices) -> Iterator[ApiServer]:
    with ApiServer(services, "127.0.0.1", 0) as running:
        assert running.port > 0
        yield running


def test_healthz_and_metrics(server: ApiServer, services: ApiServices) -> None:
    assert request_json(server.url + "/healthz") == (
        200, {"status": "ok", "model_version": VERSION}
    )
    services.metrics.set_lag("interactions", 1, 17)
    status, headers, body = request(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    exposed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert exposed[("unirec_consumer_lag_messages",
                    (("partition", "1"), ("topic", "interactions")))] == 17.0
    assert exposed[("unirec_http_requests_total", (("code", "200"), ("endpoint", "healthz")))] == 1


def test_user_state_is_the_stored_snapshot(server: ApiServer, store: StateStore) -> None:
    events = apply_events(store, ["u1", "u2", "u1", "u1"])
    status, body = request_json(server.url + "/users/u1/state")
    assert status == 200
    record = store.get("u1")
    assert body["user_id"] == "u1"
    np.testing.assert_array_equal(np.asarray(body["state"], np.float32), record.state)
    assert len(body["state"]) == CFG.d_model
    assert body["model_version"] == VERSION
    assert body["update_count"] == 3
    mine = [e for e in events if e.user_id == "u1"]
    assert body["last_event_ts"] == mine[-1].ts
    assert body["history"] == [to_builtins(e) for e in mine]  # oldest first
    # Served as the worker writes: a new event shows up at once.
    apply_events(store, ["u1"])
    assert request_json(server.url + "/users/u1/state")[1]["update_count"] == 4


def test_unknown_users_and_paths_are_404_and_wrong_methods_405(server: ApiServer) -> None:
    status, body = request_json(server.url + "/users/nobody/state")
    assert status == 404 and "nobody" in body["error"]
    status, body = request_json(server.url + "/users/a%2Fb/state")  # an encoded slash
    assert status == 404 and "'a/b'" in body["error"]
    status, body = request_json(server.url + "/nowhere")
    assert status == 404 and "/nowhere" in body["error"]
    for method, path, allowed in (
        ("POST", "/healthz", "GET"), ("GET", "/score", "POST"), ("DELETE", "/users/u1/state",
                                                                 "GET"),
    ):
        status, headers, data = request(server.url + path, method, b"" if method != "GET" else None)
        assert status == 405, (method, path)
        assert headers["Allow"] == allowed
        assert method in json.loads(data)["error"]


def test_a_corrupt_stored_record_is_a_500_naming_it(server: ApiServer, store: StateStore
                                                     ) -> None:
    apply_events(store, ["u1"])
    key = state_key(encode_user_ids(["broken"])[0])
    store._users[key] = b"\x01\x02garbage"  # bypass the codec, as disk corruption would
    status, _, data = request(server.url + "/users/broken/state")
    assert status == 500
    message = json.loads(data)["error"]
    assert "broken" in message and "corrupt value" in message
    assert "Traceback" not in message
    # Scoring for that user fails the same way; other users are unaffected.
    status, body = request_json(
        server.url + "/score", "POST", json.dumps(impression_body("broken")).encode()
    )
    assert status == 500 and "broken" in body["error"]
    assert request_json(server.url + "/users/u1/state")[0] == 200


def test_score_agrees_with_the_stream_scorer(server: ApiServer, services: ApiServices,
                                             store: StateStore) -> None:
    apply_events(store, ["u1", "u2", "u1"])
    payload = impression_body("u1", 7)
    status, headers, data = request(server.url + "/score", "POST", json.dumps(payload).encode())
    assert status == 200 and headers["Content-Type"] == "application/json"
    served = json.loads(data)
    direct = services.scorer.score(msgspec.convert(payload, Impression)).scores
    expected = json.loads(direct.encode())
    assert [i["item_id"] for i in served["items"]] == [i["item_id"] for i in expected["items"]]
    assert {k: served[k] for k in ("request_id", "user_id", "model_version")} == {
        "request_id": "r1", "user_id": "u1", "model_version": VERSION,
    }
    np.testing.assert_allclose(
        [i["score"] for i in served["items"]], [i["score"] for i in expected["items"]],
        atol=1e-6,
    )
    counts = [
        s for family in text_string_to_metric_families(services.metrics.render().decode())
        for s in family.samples if s.name == "unirec_scoring_duration_seconds_count"
    ]
    assert [(s.labels, s.value) for s in counts] == [({"candidates": "1-16"}, 1.0)]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "malformed"),
        (b"", "empty request body"),
        (json.dumps(impression_body(ts="yesterday")).encode(), "$.ts"),
        (json.dumps({k: v for k, v in impression_body().items() if k != "user_id"}).encode(),
         "user_id"),
        (json.dumps(impression_body(candidates=[])).encode(), "candidates"),
        (json.dumps(impression_body(extra=1)).encode(), "extra"),
    ],
)
def test_bad_score_requests_are_400_naming_the_field(server: ApiServer, body: bytes,
                                                     named: str) -> None:
    status, reply = request_json(server.url + "/score", "POST", body)
    assert status == 400
    assert named in reply["error"]


def test_a_too_large_body_is_413(store: StateStore) -> None:
    services = ApiServices(store, ImpressionScorer(store, SCORER, VERSION), max_body_bytes=512)
    with ApiServer(services) as server:
        body = json.dumps(impression_body(n_cands=40)).encode()
        assert len(body) > 512
        status, reply = request_json(server.url + "/score", "POST", body)
        assert status == 413 and "512" in reply["error"]
        small = json.dumps(impression_body(n_cands=1, context={})).encode()
        assert len(small) <= 512
        assert request_json(server.url + "/score", "POST", small)[0] == 200


def test_drift_with_and_without_a_static_twin(store: StateStore) -> None:
    without = ApiServices(store)
    assert handle(without, "GET", "/drift").json() == {
        "configured": False, "reason": "no static twin configured",
    }
    report = {"surrogate_distance": {"1000": 0.1}, "auc": {"dynamic": 0.7, "static": 0.6}}
    with ApiServer(ApiServices(store, drift=lambda: report)) as server:
        assert request_json(server.url + "/drift") == (200, {"configured": True, **report})
    # No scorer loaded: /score is unavailable, the rest works.
    response = handle(without, "POST", "/score", json.dumps(impression_body()).encode())
    assert response.status == 503
    assert handle(without, "GET", "/healthz").json() == {"status": "ok", "model_version": None}


def test_an_unexpected_error_is_a_json_500_without_traceback(store: StateStore) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("the twin fell over")

    response = handle(ApiServices(store, drift=broken), "GET", "/drift")
    assert response.status == 500
    assert response.json() == {"error": "internal error in drift: RuntimeError: the twin fell over"}


def test_state_snapshot_reads_a_store_a_writer_holds_open(store: StateStore, store_dir: Path
                                                          ) -> None:
    apply_events(store, ["u1", "u3"])
    snapshot = state_snapshot("u1", store_dir=store_dir)
    assert snapshot["update_count"] == 1 and snapshot["model_version"] == VERSION
    np.testing.assert_array_equal(np.asarray(snapshot["state"], np.float32),
                                  store.get("u1").state)
    apply_events(store, ["u1"])
    assert state_snapshot("u1", store_dir=store_dir)["update_count"] == 2
    with pytest.raises(UnknownUserError, match="nobody"):
        state_snapshot("nobody", store_dir=store_dir)
    with pytest.raises(ValueError, match="exactly one"):
        state_snapshot("u1")
    with pytest.raises(ValueError, match="exactly one"):
        state_snapshot("u1", api_url="http://127.0.0.1:1", store_dir=store_dir)
    # The writer still writes after the readers came and went.
    apply_events(store, ["u3"])
    assert store.get("u3").update_count == 2


def test_state_snapshot_from_the_api_equals_the_one_from_the_store(
    server: ApiServer, store: StateStore, store_dir: Path
) -> None:
    apply_events(store, ["u2", "u2"])
    from_api = state_snapshot("u2", api_url=server.url)
    assert from_api == state_snapshot("u2", store_dir=store_dir)
    assert from_api == fetch_state(server.url + "/", "u2")
    with pytest.raises(UnknownUserError, match="nobody"):
        fetch_state(server.url, "nobody")


def test_fetch_state_names_an_unreachable_api() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ApiRequestError, match=f"cannot reach the API at http://127.0.0.1:{port}"):
        fetch_state(f"http://127.0.0.1:{port}", "u1", timeout=2)
