"""The HTTP API through a real server on a free 127.0.0.1 port (started and stopped here), and
``unirec state``'s snapshot logic."""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
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
)
from prometheus_client.parser import text_string_to_metric_families

from eventlog.schema import Impression, Interaction, encode, to_builtins
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.scorer import Scorer
from state_store import StateStore, StoreConfig
from state_store.keys import encode_user_ids, state_key
from stream.applier import InteractionApplier
from stream.health import LoopHealth
from stream.http_api import (
    MAX_BODY_BYTES,
    MAX_USER_ID_BYTES,
    ROUTES,
    ApiRequestError,
    ApiServer,
    ApiServices,
    ApiToken,
    ScoringPool,
    UnknownUserError,
    build_app,
    fetch_state,
    handle,
    state_snapshot,
)
from stream.metrics import WorkerMetrics
from stream.records import ConsumedRecord
from stream.serving import ImpressionScorer

CFG = ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, dropout=0.0)
STORE = StoreConfig(state_dim=16, history_len=6)
VERSION = 3
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    records = [ConsumedRecord(0, first + k, e.user_id.encode(), encode(e))
               for k, e in enumerate(events)]
    InteractionApplier(store, SCORER.model, VERSION).apply(
        "interactions", 0, "log", records, records[-1].offset
    )
    return events


def impression_body(user: str = "u1", n_cands: int = 5, **changes: Any) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    impression = Impression("r1", user, T0 + 1e5, make_candidates(3, n_cands), context(rng))
    return {**to_builtins(impression), **changes}


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
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


# ------------------------------------------------ nothing from outside takes the server down


def big_impression(n_cands: int, feature_bytes: int, user: str = "u1") -> bytes:
    """An Impression body of about ``n_cands * feature_bytes`` bytes (long item features)."""
    payload = impression_body(user, 1)
    payload["candidates"] = [
        {"item_id": f"i{k}", "item_features": {"blurb": f"{k}:" + "x" * feature_bytes}}
        for k in range(n_cands)
    ]
    return json.dumps(payload).encode()


def post_raw(server: ApiServer, body: bytes | list[bytes], path: str = "/score"
             ) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` with a Content-Length, or (a list of chunks) with chunked encoding."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if isinstance(body, list):
            conn.request("POST", path, body=iter(body), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, dict(reply.headers), reply.read()
    finally:
        conn.close()


def chunks(body: bytes, size: int = 4096) -> list[bytes]:
    return [body[k:k + size] for k in range(0, len(body), size)]


def test_bodies_under_the_cap_are_read_whole_by_length_and_chunked(server: ApiServer) -> None:
    """A 0.5-1 MB body is scored whether sent with a Content-Length or chunked (never read in
    part); one byte over the cap is a JSON 413 either way."""
    for n_cands in (330, 580):  # about 0.55 and 0.96 MB
        body = big_impression(n_cands, 1600)
        assert MAX_BODY_BYTES // 2 < len(body) <= MAX_BODY_BYTES
        for sent in (body, chunks(body)):
            status, _, data = post_raw(server, sent)
            assert status == 200, data[:300]
            assert len(json.loads(data)["items"]) == n_cands
    over = big_impression(1, MAX_BODY_BYTES)
    assert len(over) > MAX_BODY_BYTES
    for sent in (over, chunks(over, 65536)):
        status, headers, data = post_raw(server, sent)
        assert status == 413 and headers["Content-Type"] == "application/json"
        assert str(MAX_BODY_BYTES) in json.loads(data)["error"]


def test_more_candidates_than_the_cap_is_a_json_413(store: StateStore) -> None:
    """``max_candidates`` caps the candidates of one POST /score; at the cap it is scored."""
    services = ApiServices(store, ImpressionScorer(store, SCORER, VERSION), max_candidates=10)
    with ApiServer(services) as server:
        status, reply = request_json(server.url + "/score", "POST",
                                     json.dumps(impression_body(n_cands=11)).encode())
        assert status == 413 and "11 candidates" in reply["error"] and "10" in reply["error"]
        status, reply = request_json(server.url + "/score", "POST",
                                     json.dumps(impression_body(n_cands=10)).encode())
        assert status == 200 and len(reply["items"]) == 10


class GatedScorer(ImpressionScorer):
    """The real scorer, each call held until ``release`` is set (``entered`` says one is in)."""

    def __init__(self, store: StateStore) -> None:
        super().__init__(store, SCORER, VERSION)
        self.entered = threading.Event()
        self.release = threading.Event()

    def score_many(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().score_many(*args, **kwargs)


def test_scoring_runs_off_the_event_loop_on_a_bounded_pool(store: StateStore) -> None:
    """While a POST /score is in the scorer, /healthz and /metrics still answer; with the
    pool full (one scoring, none queued) another POST /score is a JSON 503 with Retry-After,
    and the held one completes once released."""
    scorer = GatedScorer(store)
    services = ApiServices(store, scorer)
    body = json.dumps(impression_body()).encode()
    with ApiServer(services, score_threads=1, score_queued=0) as server:
        first: list[tuple[int, Any]] = []
        thread = threading.Thread(
            target=lambda: first.append(request_json(server.url + "/score", "POST", body)))
        thread.start()
        try:
            assert scorer.entered.wait(10)
            assert request_json(server.url + "/healthz")[0] == 200
            assert request(server.url + "/metrics")[0] == 200
            status, headers, data = request(server.url + "/score", "POST", body)
            assert status == 503 and headers["Retry-After"] == "1"
            assert "saturated" in json.loads(data)["error"]
        finally:
            scorer.release.set()
            thread.join(30)
        assert first[0][0] == 200 and first[0][1]["request_id"] == "r1"
        assert request_json(server.url + "/score", "POST", body)[0] == 200


def test_a_scoring_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="threads"):
        ScoringPool(threads=0)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds it took;
    fails if it is still open after ``limit_s``."""
    sock.settimeout(limit_s)
    start, received = time.monotonic(), b""
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"connection still open after {limit_s} s") from None
        if not data:
            return received, time.monotonic() - start
        received += data


def test_half_open_and_idle_connections_are_closed_within_the_timeout(
        services: ApiServices) -> None:
    """A partial request line, a connection that never sends a byte, and an idle keep-alive
    connection after a response are each closed within ``idle_timeout_s`` (plus slack)."""
    with ApiServer(services, idle_timeout_s=1.0) as server:
        addr = (server.host, server.port)
        with socket.create_connection(addr) as partial:
            partial.sendall(b"GET /hea")
            received, took = read_until_closed(partial, 8.0)
            assert received == b"" and took < 8.0
        with socket.create_connection(addr) as silent:
            assert read_until_closed(silent, 8.0)[0] == b""
        with socket.create_connection(addr) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            received, _ = read_until_closed(kept, 8.0)
            assert received.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in received


def test_a_body_that_stops_arriving_is_a_json_408(services: ApiServices) -> None:
    """A request whose body stalls half-way is answered 408 after ``body_timeout_s``, and
    the connection closed."""
    with ApiServer(services, body_timeout_s=1.0) as server, \
            socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"request_id\"")
        received, _ = read_until_closed(sock, 10.0)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert "body not received" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "quoted",
    ["%00", "a%00b", "", "%FF", "x" * (MAX_USER_ID_BYTES + 1), "%C3%A9" * 129],
)
def test_user_ids_the_store_cannot_key_are_a_json_400(server: ApiServer, quoted: str) -> None:
    """GET /users/{id}/state with an id that is empty, holds NUL, is not UTF-8 or is over
    256 UTF-8 bytes is a 400 naming the problem (not a 500, not a 404)."""
    status, reply = request_json(f"{server.url}/users/{quoted}/state")
    assert status == 400
    assert reply["error"]


def test_a_user_id_of_256_bytes_is_keyable(server: ApiServer, store: StateStore) -> None:
    """The longest allowed id (256 UTF-8 bytes, multi-byte characters) is served."""
    user = "é" * (MAX_USER_ID_BYTES // 2)
    apply_events(store, [user])
    status, reply = request_json(
        f"{server.url}/users/{urllib.parse.quote(user, safe='')}/state")
    assert status == 200 and reply["user_id"] == user


@pytest.mark.parametrize("user", ["a\x00b", "", "x" * (MAX_USER_ID_BYTES + 1)])
def test_score_requests_for_unkeyable_user_ids_are_a_json_400(server: ApiServer, user: str
                                                               ) -> None:
    status, reply = request_json(server.url + "/score", "POST",
                                 json.dumps(impression_body(user_id=user)).encode())
    assert status == 400 and "user_id" in reply["error"]


class Clock:
    """A clock the test moves by hand (``LoopHealth``'s time source)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_healthz_is_503_until_the_loop_iterates_with_partitions_and_when_it_stalls(
        store: StateStore) -> None:
    """/healthz follows the consume loop: 503 before its first iteration, 503 while it holds
    no partitions, 200 with its partitions and liveness, 503 once it stalls past the
    threshold, 200 again when it iterates."""
    clock = Clock()
    health = LoopHealth(stall_after_s=30.0, clock=clock)
    with ApiServer(ApiServices(store, health=health, model_version=VERSION)) as server:
        url = server.url + "/healthz"
        status, body = request_json(url)
        assert status == 503 and body["status"] == "not ready"
        assert "not completed an iteration" in body["error"]
        health.beat([])
        status, body = request_json(url)
        assert status == 503 and "no partitions" in body["error"]
        health.beat([("interactions", 1), ("labels", 1), ("interactions", 0)])
        clock.now += 2.5
        status, body = request_json(url)
        assert status == 200
        assert body == {"status": "ok", "model_version": VERSION, "loop": {
            "since_last_iteration_s": 2.5, "stall_after_s": 30.0,
            "assigned_partitions": {"interactions": [0, 1], "labels": [1]}}}
        clock.now += 30.0
        status, body = request_json(url)
        assert status == 503 and "stalled" in body["error"]
        assert body["loop"]["since_last_iteration_s"] == 32.5
        health.beat([("interactions", 0)])
        assert request_json(url)[0] == 200


TOKEN = "s3cret-token"


def test_with_a_token_every_endpoint_but_healthz_needs_it(store: StateStore) -> None:
    """With a token: /healthz answers without one; every other path (unknown ones too)
    answers a JSON 401 with WWW-Authenticate to a missing or wrong token, and works with
    ``Authorization: Bearer <token>``; ``unirec state --api`` sends it."""
    apply_events(store, ["u1"])
    services = ApiServices(store, ImpressionScorer(store, SCORER, VERSION),
                           token=ApiToken(TOKEN))
    score_body = json.dumps(impression_body()).encode()
    with ApiServer(services) as server:
        assert request_json(server.url + "/healthz")[0] == 200
        calls = [("GET", "/metrics", None, 200), ("GET", "/users/u1/state", None, 200),
                 ("POST", "/score", score_body, 200), ("GET", "/drift", None, 200),
                 ("GET", "/openapi.json", None, 200), ("GET", "/nowhere", None, 404)]
        for method, path, body, allowed in calls:
            for header in (None, "Bearer wrong", f"Basic {TOKEN}", TOKEN):
                status, headers, data = request(server.url + path, method, body,
                                                {"Authorization": header} if header else None)
                assert status == 401, (path, header)
                assert headers["WWW-Authenticate"].startswith("Bearer")
                assert "bearer token" in json.loads(data)["error"]
            status, _, data = request(server.url + path, method, body,
                                      {"Authorization": f"Bearer {TOKEN}"})
            assert status == allowed, (path, data[:200])
        assert fetch_state(server.url, "u1", token=TOKEN)["user_id"] == "u1"
        with pytest.raises(ApiRequestError, match="401"):
            fetch_state(server.url, "u1")
    assert TOKEN not in repr(ApiToken(TOKEN)) and TOKEN not in str(ApiToken(TOKEN))


def test_the_served_openapi_document_is_the_committed_file(server: ApiServer) -> None:
    committed = json.loads((Path(__file__).parents[1] / "stream" / "openapi.json").read_text())
    status, served = request_json(server.url + "/openapi.json")
    assert status == 200 and served == committed
    assert committed["openapi"].startswith("3.")


def test_the_app_routes_and_methods_are_the_openapi_paths(services: ApiServices) -> None:
    """Every path the aiohttp app routes (but its JSON 404 catch-all) is in the document with
    exactly its method, and every documented path is routed."""
    document = json.loads((Path(__file__).parents[1] / "stream" / "openapi.json").read_text())
    app = build_app(services, ScoringPool())
    routed = {r.canonical for r in app.router.resources()} - {"/{tail}"}
    assert routed == set(document["paths"])
    assert {(r.path, r.method.lower()) for r in ROUTES} == {
        (path, method) for path, item in document["paths"].items() for method in item
    }
