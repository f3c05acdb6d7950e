"""Quiet by default: ``unirec`` prints no library INFO log (kafka-python's, aiohttp's) and none
of our own INFO unless asked with ``-v``/``-vv``; ``worker`` and ``trainer`` keep our INFO."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from stream_fixtures import REPO

from stream.broker import EmbeddedBroker

pytestmark = pytest.mark.broker

INFO_LINE = re.compile(r" (INFO|DEBUG) (\S+): ")


def produce(bootstrap: str, *verbosity: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *verbosity, "produce", "--bootstrap-servers",
         bootstrap, "--synthetic", "20", "--partitions", "1", "--topic-prefix", "quiet-"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def info_loggers(stderr: str) -> set[str]:
    return {m[2] for m in INFO_LINE.finditer(stderr)}


def test_produce_prints_no_info_lines_without_v_and_library_ones_with_vv(
        broker: EmbeddedBroker) -> None:
    quiet = produce(broker.bootstrap_servers)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert info_loggers(quiet.stderr) == set(), quiet.stderr[-2000:]
    loud = produce(broker.bootstrap_servers, "-vv")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert any(name.startswith("kafka") for name in info_loggers(loud.stderr)), (
        loud.stderr[-2000:])



def test_kafka_pythons_slow_task_warning_shows_only_at_vvv_and_its_other_warnings_always() -> None:
    """A step of kafka-python's I/O loop delayed by a training thread holding the GIL is no
    fault to report; any other warning of the same logger is."""
    script = (
        "import logging, sys\n"
        "from app.cli import configure_logging\n"
        "configure_logging(int(sys.argv[1]), 'demo')\n"
        "selector = logging.getLogger('kafka.net.selector')\n"
        "selector.warning('Task %r ran for %.3fs (>%.3fs threshold). It is blocking the event "
        "loop -- likely a tight sync loop inside a coroutine.', 'task', 0.25, 0.1)\n"
        "selector.warning('During exception %s, caught additional error %s', 'a', 'b')\n")

    def stderr(verbose: int) -> str:
        done = subprocess.run([sys.executable, "-c", script, str(verbose)], cwd=REPO,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        return done.stderr

    for verbose in (0, 1, 2):
        shown = stderr(verbose)
        assert "blocking the event loop" not in shown and "caught additional error" in shown
    assert "blocking the event loop" in stderr(3)
