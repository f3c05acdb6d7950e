"""The fleet monitor's page in a real browser: headless Chromium (Debian's ``chromium``).

A monitor on the embedded broker gets 50 minutes of feedback from three model versions (two
switches announced on ``model-updates``); Chromium, started by the test, loads ``/``, runs its
script and must find every chart holding data; then it saves a screenshot (``tmp_path``, and
``$UNIREC_MONITOR_SCREENSHOT`` when set). Skipped, with the reason, where no Chromium is
installed (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from monitor_fixtures import MonitorProcess, feedback_records
from stream_fixtures import wait_for

from stream.broker import EmbeddedBroker
from stream.topics import TopicNames, ensure_topics

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = [pytest.mark.browser, pytest.mark.broker,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get "
                                 "install chromium)")]
CHARTS = ("auc", "distance", "rate")


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitorProcess]:
    """A monitor holding 50 minutes of feedback of v1, v2 and v3."""
    home = tmp_path_factory.mktemp("browser")
    with EmbeddedBroker(log_dir=home) as broker:
        bootstrap, topics = broker.bootstrap_servers, TopicNames()
        ensure_topics(bootstrap, 2, topics=topics)
        running = MonitorProcess(bootstrap, home / "data", home / "monitor.log", partitions=2)
        try:
            now = time.time()
            producer = KafkaProducer(bootstrap_servers=bootstrap)
            for version, start in ((1, now - 3000), (2, now - 2000), (3, now - 1000)):
                producer.send(topics.model_updates, key=str(version).encode(), value=json.dumps(
                    {"version": version, "path": f"v{version}.pt", "steps": 0, "ts": start}
                ).encode())
                for r in feedback_records(2000 - 300 * version, version, start,
                                          1000 / (2000 - 300 * version), seed=version):
                    producer.send(topics.feedback, key=r.user_id.encode(), value=r.encode())
            producer.flush()
            producer.close()
            wait_for(lambda: len(running.get("/fleet/versions") or []) == 3
                     and all("announced_at" in v for v in running.get("/fleet/versions")),
                     60, None, "three versions")
            yield running
        finally:
            running.stop()


def _chromium(*args: str, timeout_s: float = 60.0) -> str:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=timeout_s, check=False)
    return out.stdout


def test_the_page_draws_every_chart_with_data_and_is_screenshotted(
    monitor: MonitorProcess, tmp_path: Path
) -> None:
    """After its script ran, the page's AUC, surrogate distance and records/s charts each
    hold points, the AUC chart one line pair per version (v1, v2, v3 in its legend), the
    version switches are marked, and the status line shows the fleet's figures."""
    dom = ""
    for _ in range(5):
        dom = _chromium("--dump-dom", monitor.url + "/")
        if 'data-ready="1"' in dom:
            break
        time.sleep(2)
    assert 'data-ready="1"' in dom, dom[-2000:]
    for chart in CHARTS:
        points = re.search(rf'id="{chart}"[^>]*data-points="(\d+)"', dom)
        assert points and int(points.group(1)) > 0, f"chart {chart} holds no data"
    assert all(f">v{v}<" in dom for v in (1, 2, 3))  # legend entries and switch markers
    assert "AUC live" in dom and "surrogate distance" in dom
    shot = tmp_path / "monitor.png"
    _chromium(f"--screenshot={shot}", "--window-size=1160,900", monitor.url + "/")
    assert shot.is_file() and shot.stat().st_size > 10_000
    target = os.environ.get("UNIREC_MONITOR_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
