"""Shared fixtures, and the ``broker`` marker's rule.

Fixtures (helpers that are plain functions or classes stay in ``stream_fixtures``,
``model_fixtures``, ``deploy_fixtures`` and ``state_store_fixtures``, imported by name):

- ``one_torch_thread`` (module scope): torch on one thread while a module runs, restored after.
  A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
- ``broker`` (module scope): an ``EmbeddedBroker`` logging under a temporary directory.
- ``bootstrap`` (module scope): that broker's bootstrap servers.
- ``checkpoint`` (module scope): ``tiny_checkpoint`` (model version 3) in a temporary directory.

The ``broker`` marker (``make test-fast`` runs ``-m "not broker"``) is on every test that starts
a broker or any other subprocess. The rule is mechanical, in two parts:

1. A test that uses the ``broker`` or ``bootstrap`` fixture (this file's or a module's own) is
   marked automatically; a module whose tests all start one says
   ``pytestmark = pytest.mark.broker``; a single test, ``@pytest.mark.broker``.
2. An audit hook sees every subprocess this process starts (``EmbeddedBroker``,
   ``WorkerProcess``, ``subprocess.run``, ``os.system``...). A test that is not marked and starts
   one, in its setup, call or teardown, fails with the command it started: a new broker test
   cannot hide in the fast subset.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from stream_fixtures import tiny_checkpoint

from stream.broker import EmbeddedBroker

BROKER_FIXTURES = frozenset({"broker", "bootstrap"})
"""Fixtures whose users are marked ``broker`` by ``pytest_collection_modifyitems``."""

SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system",
                          "os.exec"})
"""Audit events (``sys.addaudithook``) of a process being started."""
INCIDENTAL = frozenset({"uname"})
"""Programs a library runs on its own (``platform.processor()``: ``uname -p``), not counted."""


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread while the module runs (the models are tiny; on a loaded 2-core
    machine, two threads spin against each other and run several times slower), restored
    afterwards so that other modules are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """An embedded broker shared by the module's tests, its log in a temporary directory."""
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def bootstrap(broker: EmbeddedBroker) -> str:
    """The module's broker's bootstrap servers (``host:port``)."""
    return broker.bootstrap_servers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (random weights, model version 3) with a FeatureSpec fitted on the
    synthetic events."""
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", model_version=3)


# ---------------------------------------------------------------------- the broker marker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``broker`` every test that uses a broker fixture."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now
_spawned = pytest.StashKey[list[str]]()
_reported = pytest.StashKey[int]()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in SPAWN_EVENTS or not _running:
        return
    program = args[0] if event == "subprocess.Popen" else None
    if isinstance(program, str | bytes) and Path(str(program)).name in INCIDENTAL:
        return
    item = _running[-1]
    if item.get_closest_marker("broker") is None:
        item.stash.setdefault(_spawned, []).append(f"{event} {args[:2]!r}"[:300])


sys.addaudithook(_audit)  # audit hooks cannot be removed: _audit does nothing between tests


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Fail the phase in which an unmarked test started a subprocess."""
    outcome = yield
    report = outcome.get_result()
    spawned = item.stash.get(_spawned, [])
    seen = item.stash.get(_reported, 0)
    if len(spawned) > seen:
        item.stash[_reported] = len(spawned)
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started a subprocess but is not marked broker (add "
            f"@pytest.mark.broker, a module-level pytestmark = pytest.mark.broker, or use the "
            f"broker fixture):\n  " + "\n  ".join(spawned[seen:]))
