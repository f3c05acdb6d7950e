"""The worker's HTTP API: a query API over the local state, scoring, metrics, drift.

    GET  /healthz           the consume loop's liveness and assigned partitions: 200 when
                            ready, 503 while not (loop not started or stalled, no partitions)
    GET  /metrics           Prometheus text exposition
    GET  /users/{id}/state  the user's snapshot: state vector, model version, update count,
                            last event time, recent history (oldest first); on a worker, also
                            the user's partition and the offset the store reflects, or 421
                            with the owner's URL when another worker owns the partition
    POST /score             an ``Impression`` -> the ``scores`` payload (as the stream scores)
    GET  /drift             the drift provider's report, or {"configured": false, ...}
    GET  /openapi.json      the OpenAPI 3 document of this API (``stream/openapi.json``)

Every error is JSON ``{"error": "..."}`` with a status code: 400 (bad JSON or schema, naming
the field; a user id the store cannot key: empty, containing NUL, longer than
``MAX_USER_ID_BYTES`` UTF-8 bytes, or not UTF-8), 401 (a token is configured and the request
lacks it), 404 (unknown path or user), 405 (wrong method), 408 (the body did not arrive in
time), 413 (a body over ``max_body_bytes``, or more than ``max_candidates`` candidates), 500
(a corrupt stored value, named; never a traceback), 503 (scoring not available or saturated;
``/healthz`` while not ready, with the reason).

Nothing from outside can take the server down (docs/system.md): a body is read whole (by
Content-Length or chunked) within ``max_body_bytes`` and ``body_timeout_s``, never in part; a
connection that sends no complete request head within ``idle_timeout_s`` of opening or of its
last response is closed (aiohttp's keep-alive timer, armed from the connection's start), and
one whose body was refused is closed ``LINGER_S`` after the answer;
``POST /score`` decodes and scores on a ``ScoringPool`` thread, never on the event loop, so
``/healthz`` and ``/metrics`` answer while it runs.

Thread safety of scoring off the loop: the pool's threads share the ``ImpressionScorer`` with
the worker's consume loop. ``ImpressionScorer`` reads its (scorer, version) pair once per call
and a swap replaces it, never changing weights in place; the model runs in eval mode under
``no_grad`` (no state is written); the featurizer's memo only ever maps a value to the same
row; store reads are RocksDB reads, each of one consistent record. Torch runs a request's ops on
the process's intra-op threads (``torch.set_num_threads``: the worker's ``--torch-threads``),
so a pool of ``threads`` adds at most ``threads`` times that many busy cores beside the loop.

The handlers are plain functions of an ``ApiServices`` and a request, returning an
``HttpResponse`` (status, headers, body), so they run without a server (``handle``).
``ApiServer`` (a thread of its own: the worker's) and ``serve`` (the foreground) run them on
aiohttp.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from eventlog.schema import Impression, SchemaError, decode, to_builtins
from model.user_state import decode_history
from state_store import StateStore, StateStoreError, UserRecord
from state_store.keys import encode_user_ids
from stream.admission import RecordLimits
from stream.health import LoopHealth
from stream.metrics import WorkerMetrics
from stream.ownership import Ownership
from stream.serving import ImpressionScorer

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_BODY_BYTES = 1 << 20
MAX_CANDIDATES = RecordLimits().max_candidates  # the stream's bounds, the same defaults
MAX_USER_ID_BYTES = RecordLimits().max_id_bytes
NO_TWIN = {"configured": False, "reason": "no static twin configured"}
LINGER_S = 2.0
"""After answering a request whose body was not read to its end (413, 408), the server
discards what the client still sends for at most this long, then closes the connection."""
OPENAPI = importlib.resources.files("stream").joinpath("openapi.json").read_bytes()
"""The OpenAPI 3 document of this API, as committed in ``stream/openapi.json``."""

_json = msgspec.json.Encoder()


class HttpResponse(NamedTuple):
    """What a handler returns: status code, headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None
                  ) -> HttpResponse:
    return HttpResponse(status, {"Content-Type": JSON, **(headers or {})}, _json.encode(payload))


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> HttpResponse:
    return json_response(status, {"error": message}, headers)


class ApiToken:
    """A bearer token every endpoint but ``/healthz`` requires. Its ``repr`` and ``str`` hide
    the value, so a logged configuration does not leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("an API token must be non-empty")
        self._value = value.encode()

    @classmethod
    def optional(cls, value: str | None) -> ApiToken | None:
        """The token of a non-empty ``value`` (a flag or ``UNIREC_API_TOKEN``), else None."""
        return cls(value) if value else None

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value is ``Bearer <this token>`` (the token
        compared in constant time)."""
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(errors="replace"), self._value)

    def __repr__(self) -> str:
        return "ApiToken(<hidden>)"

    __str__ = __repr__


@dataclass
class ApiServices:
    """What the API reads from.

    store: the state store, or a callable returning it (the worker owns the writable store; a
        CLI may open one read-only; a read-only store is refreshed before every read).
    scorer: scores ``POST /score`` (None: 503).
    metrics: rendered by ``GET /metrics``; requests are counted in it.
    drift: returns the drift report as a dict, or None when no static twin is configured.
    model_version: the serving version, or a callable returning it (default: the scorer's).
    health: the consume loop's liveness, reported by ``/healthz`` (None: no loop runs beside
        this API, and ``/healthz`` reports only that the server answers).
    token: when set, every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>``.
    max_body_bytes: larger request bodies get 413.
    max_candidates: a ``POST /score`` with more candidates gets 413 (the worker's
        ``max_candidates``: the most candidates one impression may have).
    ownership: a worker's partition ownership (``stream.ownership``): ``/users/{id}/state``
        answers only for its own partitions (with the offset it reflects), 421 Misdirected
        Request with the owner's URL for others, 503 while the partition is restored.
    """

    store: StateStore | Callable[[], StateStore]
    scorer: ImpressionScorer | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    drift: Callable[[], Mapping[str, Any] | None] | None = None
    model_version: int | Callable[[], int | None] | None = None
    health: LoopHealth | None = None
    token: ApiToken | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_candidates: int = MAX_CANDIDATES
    # issue #13: which partitions this worker owns, and who owns the others (None: answer
    # from the store whatever the partition, e.g. `unirec serve` over a store directory)
    ownership: Ownership | None = None

    def state_store(self) -> StateStore:
        store = self.store if isinstance(self.store, StateStore) else self.store()
        store.refresh()  # nothing to do for the writer; catches a read-only view up
        return store

    def current_model_version(self) -> int | None:
        if callable(self.model_version):
            return self.model_version()
        if self.model_version is not None:
            return self.model_version
        return None if self.scorer is None else self.scorer.model_version


# ------------------------------------------------------------------------------- handlers


class UnknownUserError(LookupError):
    """No event of the user was ever applied."""


def user_id_problem(user_id: str) -> str | None:
    """Why the state store cannot key ``user_id`` (empty, NUL, not UTF-8, longer than
    ``MAX_USER_ID_BYTES`` bytes), or None when it can."""
    try:
        encoded = encode_user_ids([user_id])[0]
    except UnicodeEncodeError:
        return f"user id {user_id!r} is not valid UTF-8"
    except ValueError as exc:
        return str(exc)
    if len(encoded) > MAX_USER_ID_BYTES:
        return (f"user id is {len(encoded)} UTF-8 bytes long; at most {MAX_USER_ID_BYTES} "
                "are allowed")
    return None


def user_state_payload(record: UserRecord) -> dict[str, Any]:
    """The ``GET /users/{id}/state`` body of a stored record (read with its history).

    Raises ``SchemaError`` if a history row does not decode.
    """
    history = decode_history(record.history or [])
    return {
        "user_id": record.user_id,
        "state": record.state.astype(float).tolist(),
        "model_version": record.model_version,
        "update_count": record.update_count,
        "last_event_ts": record.last_event_ts,
        "history": [to_builtins(e) for e in history],
    }


def read_user_state(store: StateStore, user_id: str) -> dict[str, Any]:
    """The user's snapshot from ``store``; ``UnknownUserError`` for a user never seen.

    Raises ``CorruptValueError`` / ``SchemaError`` on a stored value that does not decode.
    """
    record = store.get(user_id, history=True)
    if record.is_new:
        raise UnknownUserError(f"unknown user {user_id!r}: no event of it was applied")
    return user_state_payload(record)


def healthz(services: ApiServices) -> HttpResponse:
    """200 ``{"status": "ok", ...}`` when ready; 503 ``{"status": "not ready", "error":
    reason, ...}`` when the consume loop has not run, stalled or holds no partitions. The
    ``loop`` object gives its liveness and assignment (absent without a loop)."""
    body: dict[str, Any] = {"status": "ok", "model_version": services.current_model_version()}
    if services.health is None:
        return json_response(200, body)
    report = services.health.report()
    body["loop"] = report.to_json()
    if report.ready:
        return json_response(200, body)
    return json_response(503, {**body, "status": "not ready", "error": report.reason})


def metrics(services: ApiServices) -> HttpResponse:
    metrics = services.metrics
    return HttpResponse(200, {"Content-Type": metrics.content_type}, metrics.render())


def user_state(services: ApiServices, quoted_user_id: str) -> HttpResponse:
    """The snapshot of the user whose percent-encoded id is ``quoted_user_id``."""
    try:
        user_id = urllib.parse.unquote(quoted_user_id, errors="strict")
    except UnicodeDecodeError:
        return error(400, f"user id {quoted_user_id!r} is not percent-encoded UTF-8")
    problem = user_id_problem(user_id)
    if problem is not None:
        return error(400, problem)
    placed: dict[str, Any] = {}
    if services.ownership is not None:
        where = services.ownership.locate(user_id)
        if where.restoring:
            return error(503, f"partition {where.partition} of user {user_id!r} is being "
                              "restored on this worker", {"Retry-After": "1"})
        if not where.owned:
            if where.owner is None:
                return error(503, f"partition {where.partition} of user {user_id!r} has no "
                                  "known owner (rebalancing)", {"Retry-After": "1"})
            return json_response(421, {
                "error": f"partition {where.partition} of user {user_id!r} is owned by "
                         f"{where.owner}", "owner": where.owner, "partition": where.partition},
                {"Location": f"{where.owner}/users/{quoted_user_id}/state"})
        placed = {"partition": where.partition, "offset": where.offset}
    try:
        return json_response(200, {**read_user_state(services.state_store(), user_id),
                                   **placed})
    except UnknownUserError as exc:
        return error(404, str(exc))
    except (StateStoreError, SchemaError) as exc:
        log.error("GET /users/%s/state: %s", user_id, exc)
        return error(500, f"stored record of user {user_id!r} does not decode: {exc}")


def score(services: ApiServices, body: bytes) -> HttpResponse:
    """Decode an ``Impression`` from ``body`` and score it (blocking: the server runs this on
    its ``ScoringPool``)."""
    if services.scorer is None:
        return error(503, "scoring is not available on this server (no model loaded)")
    if len(body) > services.max_body_bytes:
        return too_large(services)
    if not body.strip():
        return error(400, "empty request body: expected an Impression as JSON")
    try:
        impression = decode(Impression, body)
    except SchemaError as exc:
        return error(400, str(exc))
    problem = user_id_problem(impression.user_id)
    if problem is not None:
        return error(400, f"$.user_id: {problem}")
    if len(impression.candidates) > services.max_candidates:
        return error(413, f"{len(impression.candidates)} candidates; at most "
                          f"{services.max_candidates} per request")
    start = time.perf_counter()
    try:
        scored = services.scorer.score(impression)
    except (StateStoreError, SchemaError) as exc:
        log.error("POST /score for user %s: %s", impression.user_id, exc)
        return error(500, f"stored record of user {impression.user_id!r} does not decode: {exc}")
    services.metrics.observe_scoring(len(impression.candidates), time.perf_counter() - start)
    services.metrics.observe_store_read(scored.read_s)
    return HttpResponse(200, {"Content-Type": JSON}, scored.scores.encode())


def drift(services: ApiServices) -> HttpResponse:
    report = None if services.drift is None else services.drift()
    if report is None:
        return json_response(200, NO_TWIN)
    return json_response(200, {"configured": True, **report})


def openapi(services: ApiServices) -> HttpResponse:
    return HttpResponse(200, {"Content-Type": JSON}, OPENAPI)


def too_large(services: ApiServices) -> HttpResponse:
    return error(413, f"request body larger than {services.max_body_bytes} bytes",
                 {"Connection": "close"})


# -------------------------------------------------------------------------------- routing


class Route(NamedTuple):
    name: str  # the endpoint label in metrics
    path: str  # the OpenAPI path template
    pattern: re.Pattern[str]  # matches the percent-encoded path; groups: encoded parameters
    method: str
    handler: Callable[..., HttpResponse]  # (services, *path groups[, body])
    public: bool = False  # served without the token


ROUTES = (
    Route("healthz", "/healthz", re.compile(r"/healthz"), "GET", healthz, public=True),
    Route("metrics", "/metrics", re.compile(r"/metrics"), "GET", metrics),
    Route("user_state", "/users/{user_id}/state", re.compile(r"/users/([^/]*)/state"), "GET",
          user_state),
    Route("score", "/score", re.compile(r"/score"), "POST", score),
    Route("drift", "/drift", re.compile(r"/drift"), "GET", drift),
    Route("openapi", "/openapi.json", re.compile(r"/openapi\.json"), "GET", openapi),
)
OFF_LOOP = frozenset({"score"})
"""Routes whose handlers block (decode and score): run on the ``ScoringPool``."""


def handle(services: ApiServices, method: str, path: str, body: bytes = b"",
           authorization: str | None = None) -> HttpResponse:
    """Dispatch one request (``path`` without the query string, percent-encoded;
    ``authorization``: its Authorization header) to its handler. Never raises: an unexpected
    error is logged and answered with a JSON 500."""
    route, groups = match(path)
    response = refusal(services, route, method, path, authorization)
    if response is None:
        response = _call(services, route, groups, body)
    services.metrics.count_http_request(route.name if route else "unknown", response.status)
    return response


def match(path: str) -> tuple[Route | None, tuple[str, ...]]:
    """The route of a percent-encoded path and its (still encoded) parameters."""
    for route in ROUTES:
        m = route.pattern.fullmatch(path)
        if m:
            return route, m.groups()
    return None, ()


def refusal(services: ApiServices, route: Route | None, method: str, path: str,
            authorization: str | None) -> HttpResponse | None:
    """The 401, 404 or 405 a request gets before its handler runs, or None to run it. Without
    the token only ``/healthz`` answers (an unknown path gets 401, not 404)."""
    public = route is not None and route.public
    if services.token is not None and not public and not services.token.accepts(authorization):
        return error(401, "missing or wrong bearer token: send Authorization: Bearer <token>",
                     {"WWW-Authenticate": 'Bearer realm="unirec"'})
    if route is None:
        return error(404, f"no such path: {path}")
    method = method.upper()
    if method not in (route.method, "HEAD" if route.method == "GET" else route.method):
        return error(405, f"method {method} not allowed on {path}; use {route.method}",
                     {"Allow": route.method})
    return None


def _call(services: ApiServices, route: Route, groups: tuple[str, ...], body: bytes
          ) -> HttpResponse:
    try:
        if route.method == "POST":
            return route.handler(services, *groups, body)
        return route.handler(services, *groups)
    except Exception as exc:
        log.exception("%s %s failed", route.method, route.name)
        return error(500, f"internal error in {route.name}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------ aiohttp server


class BodyTooLarge(Exception):
    """A request body over the cap."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body (by Content-Length or chunked); ``BodyTooLarge`` as soon as it
    is known to exceed ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class ScoringPool:
    """A bounded thread pool for blocking handlers: ``threads`` run at once, ``queued`` more
    wait; past that ``run`` refuses (the server answers 503 with Retry-After) rather than
    queue without bound.
    ``run`` is called on the server's event loop only (the count needs no lock)."""

    def __init__(self, threads: int = 1, queued: int = 16) -> None:
        if threads < 1 or queued < 0:
            raise ValueError(f"need threads >= 1 and queued >= 0, got {threads}, {queued}")
        self.capacity = threads + queued
        self.admitted = 0
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="unirec-http-score")

    async def run(self, call: Callable[[], HttpResponse]) -> HttpResponse | None:
        """``call()`` on a pool thread; None (without running it) when the pool is full."""
        if self.admitted >= self.capacity:
            return None
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self.admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


async def handle_aiohttp(services: ApiServices, pool: ScoringPool, request: web.Request,
                         body_timeout_s: float) -> web.Response:
    """``handle`` for an aiohttp request: refuse before reading a body, read it whole within
    ``max_body_bytes`` and ``body_timeout_s``, and run blocking routes on ``pool``."""
    path = request.raw_path.split("?")[0]
    authorization = request.headers.get("Authorization")
    route, _ = match(path)
    refused = refusal(services, route, request.method, path, authorization)
    if refused is not None or route is None:
        return _counted(services, route, refused or error(404, f"no such path: {path}"))
    body = b""
    if request.method == "POST":
        try:
            async with asyncio.timeout(body_timeout_s):
                body = await read_body(request, services.max_body_bytes)
        except BodyTooLarge:
            return _counted(services, route, too_large(services))
        except TimeoutError:
            return _counted(services, route, error(
                408, f"request body not received within {body_timeout_s} s",
                {"Connection": "close"}))

    method = request.method

    def call() -> HttpResponse:
        return handle(services, method, path, body, authorization)

    if route.name not in OFF_LOOP:
        return _to_aiohttp(call())
    response = await pool.run(call)
    if response is None:
        return _counted(services, route, error(
            503, f"scoring is saturated ({pool.capacity} requests in progress); retry later",
            {"Retry-After": "1"}))
    return _to_aiohttp(response)


def _counted(services: ApiServices, route: Route | None, response: HttpResponse
             ) -> web.Response:
    services.metrics.count_http_request(route.name if route else "unknown", response.status)
    return _to_aiohttp(response)


def _to_aiohttp(response: HttpResponse) -> web.Response:
    return web.Response(status=response.status, headers=response.headers, body=response.body)


def build_app(services: ApiServices, pool: ScoringPool, body_timeout_s: float = 30.0
              ) -> web.Application:
    """A standalone aiohttp application serving the API: one route per ``ROUTES`` path (any
    method) and a catch-all, all dispatched by ``handle_aiohttp`` on the raw path, so unknown
    paths and wrong methods get JSON errors."""

    async def dispatch(request: web.Request) -> web.Response:
        return await handle_aiohttp(services, pool, request, body_timeout_s)

    app = web.Application(client_max_size=services.max_body_bytes + 1)
    for route in ROUTES:
        app.router.add_route("*", route.path, dispatch, name=route.name)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


class ApiServer:
    """The standalone server in a background thread (its own event loop).

    ``port=0`` binds a free port; ``port`` and ``url`` give the bound one. Use as a context
    manager, or ``start`` / ``stop``.

    idle_timeout_s: a connection that has not sent a complete request head this long after it
        opened or after its last response is closed (half-open and idle keep-alive ones).
    body_timeout_s: a request body must arrive within this (else 408).
    score_threads, score_queued: the ``ScoringPool`` of ``POST /score``.
    """

    def __init__(self, services: ApiServices, host: str = "127.0.0.1", port: int = 0, *,
                 idle_timeout_s: float = 15.0, body_timeout_s: float = 30.0,
                 score_threads: int = 1, score_queued: int = 16) -> None:
        self.services = services
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.pool = ScoringPool(score_threads, score_queued)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="unirec-http-api", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self.pool.shutdown()
            raise failure[0]
        log.info("HTTP API on %s", self.url)
        return self

    async def _start(self) -> None:
        app = build_app(self.services, self.pool, self.body_timeout_s)
        self._runner = web.AppRunner(app, access_log=None,
                                     keepalive_timeout=self.idle_timeout_s,
                                     lingering_time=LINGER_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port when 0

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self.pool.shutdown()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(services: ApiServices, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the API in the foreground until interrupted (Ctrl-C)."""
    server = ApiServer(services, host, port).start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


# ----------------------------------------------------------------------- the state client


class ApiRequestError(RuntimeError):
    """The API could not be reached or answered with an error."""


MAX_REDIRECTS = 3


def fetch_state(base_url: str, user_id: str, timeout: float = 10.0,
                token: str | None = None, redirects: int = MAX_REDIRECTS) -> dict[str, Any]:
    """``GET {base_url}/users/{user_id}/state``: the user's snapshot (with ``token`` as the
    bearer token when given). A 421 (another worker owns the user's partition) is followed to
    the owner's URL it names, at most ``redirects`` times.

    Raises ``UnknownUserError`` on 404 and ``ApiRequestError`` on any other failure (with the
    server's error message).
    """
    url = f"{base_url.rstrip('/')}/users/{urllib.parse.quote(user_id, safe='')}/state"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 421:
            owner = _owner(exc)
            if owner is None or redirects <= 0:
                raise ApiRequestError(f"{url}: HTTP 421 and no owner to follow") from None
            return fetch_state(owner, user_id, timeout, token, redirects - 1)
        message = _error_message(exc)
        if exc.code == 404:
            raise UnknownUserError(message) from None
        raise ApiRequestError(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiRequestError(f"cannot reach the API at {base_url}: {reason}") from None
    except ValueError as exc:
        raise ApiRequestError(f"{url}: the reply is not JSON: {exc}") from None


def _owner(exc: urllib.error.HTTPError) -> str | None:
    """The owner URL of a 421 answer's JSON body."""
    try:
        owner = json.loads(exc.read())["owner"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return owner if isinstance(owner, str) and owner.startswith("http") else None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or f"HTTP {exc.code}"


def state_snapshot(
    user_id: str, api_url: str | None = None, store_dir: str | Path | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``unirec state USER_ID``: the user's snapshot from a running worker's API (``api_url``,
    with ``token`` as its bearer token when given) or read-only from a state store directory
    (``store_dir``; safe while a worker writes it).

    Raises ``ValueError`` unless exactly one source is given, ``UnknownUserError`` for a user
    never seen, ``ApiRequestError`` when the API fails, ``StateStoreError`` when the store
    cannot be opened or holds a corrupt value.
    """
    if (api_url is None) == (store_dir is None):
        raise ValueError("give exactly one of api_url (a running worker) or store_dir")
    if api_url is not None:
        return fetch_state(api_url, user_id, token=token)
    with StateStore.open(store_dir, read_only=True) as store:
        try:
            return read_user_state(store, user_id)
        except SchemaError as exc:
            raise StateStoreError(f"history of user {user_id!r} does not decode: {exc}") from None
