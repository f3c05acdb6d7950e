"""The worker's HTTP API: a query API over the local state, scoring, metrics, drift.

    GET  /healthz           {"status": "ok", "model_version": ...}
    GET  /metrics           Prometheus text exposition
    GET  /users/{id}/state  the user's snapshot: state vector, model version, update count,
                            last event time, recent history (oldest first)
    POST /score             an ``Impression`` -> the ``scores`` payload (as the stream scores)
    GET  /drift             the drift provider's report, or {"configured": false, ...}

Errors are JSON ``{"error": "..."}`` with a status code: 400 (bad JSON or schema, naming the
field), 404 (unknown path or user), 405 (wrong method), 413 (body too large), 500 (a corrupt
stored value, named; never a traceback), 503 (scoring not available).

The handlers are plain functions of an ``ApiServices`` and a request, returning an
``HttpResponse`` (status, headers, body), so they run without a server. ``ApiServer`` (a
thread of its own: the worker's) and ``serve`` (the foreground) run them on aiohttp.

The handlers run on the server's thread, beside the worker's consumer loop: store reads are
RocksDB reads (thread-safe, each sees a consistent record), and ``POST /score`` runs the
scorer's model in inference mode, which the loop's scoring does not modify.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from eventlog.schema import Impression, SchemaError, decode, to_builtins
from state_store import StateStore, StateStoreError, UserRecord
from stream.applier import decode_history
from stream.metrics import WorkerMetrics
from stream.serving import ImpressionScorer

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_BODY_BYTES = 1 << 20
NO_TWIN = {"configured": False, "reason": "no static twin configured"}

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


@dataclass
class ApiServices:
    """What the API reads from.

    store: the state store, or a callable returning it (the worker owns the writable store; a
        CLI may open one read-only; a read-only store is refreshed before every read).
    scorer: scores ``POST /score`` (None: 503).
    metrics: rendered by ``GET /metrics``; requests are counted in it.
    drift: returns the drift report as a dict, or None when no static twin is configured.
    model_version: the serving version, or a callable returning it (default: the scorer's).
    max_body_bytes: larger request bodies get 413.
    """

    store: StateStore | Callable[[], StateStore]
    scorer: ImpressionScorer | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    drift: Callable[[], Mapping[str, Any] | None] | None = None
    model_version: int | Callable[[], int | None] | None = None
    max_body_bytes: int = MAX_BODY_BYTES

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
    return json_response(200, {"status": "ok", "model_version": services.current_model_version()})


def metrics(services: ApiServices) -> HttpResponse:
    metrics = services.metrics
    return HttpResponse(200, {"Content-Type": metrics.content_type}, metrics.render())


def user_state(services: ApiServices, user_id: str) -> HttpResponse:
    if not user_id:
        return error(404, "empty user id")
    try:
        return json_response(200, read_user_state(services.state_store(), user_id))
    except UnknownUserError as exc:
        return error(404, str(exc))
    except (StateStoreError, SchemaError) as exc:
        log.error("GET /users/%s/state: %s", user_id, exc)
        return error(500, f"stored record of user {user_id!r} does not decode: {exc}")


def score(services: ApiServices, body: bytes) -> HttpResponse:
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


def too_large(services: ApiServices) -> HttpResponse:
    return error(413, f"request body larger than {services.max_body_bytes} bytes")


# -------------------------------------------------------------------------------- routing


class Route(NamedTuple):
    name: str  # the endpoint label in metrics
    pattern: re.Pattern[str]
    method: str
    handler: Callable[..., HttpResponse]  # (services, *path groups[, body])


ROUTES = (
    Route("healthz", re.compile(r"/healthz"), "GET", healthz),
    Route("metrics", re.compile(r"/metrics"), "GET", metrics),
    Route("user_state", re.compile(r"/users/([^/]*)/state"), "GET", user_state),
    Route("score", re.compile(r"/score"), "POST", score),
    Route("drift", re.compile(r"/drift"), "GET", drift),
)


def handle(services: ApiServices, method: str, path: str, body: bytes = b"") -> HttpResponse:
    """Dispatch one request (``path`` without the query string, percent-encoded) to its
    handler. Never raises: an unexpected error is logged and answered with a JSON 500."""
    method = method.upper()
    route, groups = _match(path)
    if route is None:
        response = error(404, f"no such path: {path}")
    elif method not in (route.method, "HEAD" if route.method == "GET" else route.method):
        response = error(405, f"method {method} not allowed on {path}; use {route.method}",
                         {"Allow": route.method})
    else:
        response = _call(services, route, groups, body)
    services.metrics.count_http_request(route.name if route else "unknown", response.status)
    return response


def _match(path: str) -> tuple[Route | None, tuple[str, ...]]:
    for route in ROUTES:
        m = route.pattern.fullmatch(path)
        if m:
            return route, tuple(urllib.parse.unquote(g) for g in m.groups())
    return None, ()


def _call(services: ApiServices, route: Route, groups: tuple[str, ...], body: bytes
          ) -> HttpResponse:
    try:
        if route.method == "POST":
            return route.handler(services, *groups, body)
        return route.handler(services, *groups)
    except Exception as exc:
        log.exception("%s %s failed", route.method, route.name)
        return error(500, f"internal error in {route.name}: {type(exc).__name__}: {exc}")


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None if it is larger than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = await request.content.read(limit + 1)
    return None if len(body) > limit else body


async def handle_aiohttp(services: ApiServices, request: web.Request) -> web.Response:
    """``handle`` for an aiohttp request."""
    body = b""
    if request.method == "POST":
        read = await _read_body(request, services.max_body_bytes)
        if read is None:
            route = _match(request.raw_path.split("?")[0])[0]
            services.metrics.count_http_request(route.name if route else "unknown", 413)
            return _to_aiohttp(too_large(services))
        body = read
    return _to_aiohttp(handle(services, request.method, request.raw_path.split("?")[0], body))


def _to_aiohttp(response: HttpResponse) -> web.Response:
    return web.Response(status=response.status, headers=response.headers, body=response.body)


# -------------------------------------------------------------------- standalone server


def build_app(services: ApiServices) -> web.Application:
    """A standalone aiohttp application serving the API (every path and method, so unknown
    paths and wrong methods get JSON errors)."""

    async def catch_all(request: web.Request) -> web.Response:
        return await handle_aiohttp(services, request)

    app = web.Application(client_max_size=services.max_body_bytes + 1)
    app.router.add_route("*", "/{tail:.*}", catch_all)
    return app


class ApiServer:
    """The standalone server in a background thread (its own event loop).

    ``port=0`` binds a free port; ``port`` and ``url`` give the bound one. Use as a context
    manager, or ``start`` / ``stop``.
    """

    def __init__(self, services: ApiServices, host: str = "127.0.0.1", port: int = 0) -> None:
        self.services = services
        self.host = host
        self.port = port
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
            raise failure[0]
        log.info("HTTP API on %s", self.url)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.services), access_log=None)
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


def fetch_state(base_url: str, user_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """``GET {base_url}/users/{user_id}/state``: the user's snapshot.

    Raises ``UnknownUserError`` on 404 and ``ApiRequestError`` on any other failure (with the
    server's error message).
    """
    url = f"{base_url.rstrip('/')}/users/{urllib.parse.quote(user_id, safe='')}/state"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        message = _error_message(exc)
        if exc.code == 404:
            raise UnknownUserError(message) from None
        raise ApiRequestError(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiRequestError(f"cannot reach the API at {base_url}: {reason}") from None
    except ValueError as exc:
        raise ApiRequestError(f"{url}: the reply is not JSON: {exc}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or f"HTTP {exc.code}"


def state_snapshot(
    user_id: str, api_url: str | None = None, store_dir: str | Path | None = None
) -> dict[str, Any]:
    """``unirec state USER_ID``: the user's snapshot from a running worker's API (``api_url``)
    or read-only from a state store directory (``store_dir``; safe while a worker writes it).

    Raises ``ValueError`` unless exactly one source is given, ``UnknownUserError`` for a user
    never seen, ``ApiRequestError`` when the API fails, ``StateStoreError`` when the store
    cannot be opened or holds a corrupt value.
    """
    if (api_url is None) == (store_dir is None):
        raise ValueError("give exactly one of api_url (a running worker) or store_dir")
    if api_url is not None:
        return fetch_state(api_url, user_id)
    with StateStore.open(store_dir, read_only=True) as store:
        try:
            return read_user_state(store, user_id)
        except SchemaError as exc:
            raise StateStoreError(f"history of user {user_id!r} does not decode: {exc}") from None
