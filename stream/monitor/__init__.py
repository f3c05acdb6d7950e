"""The fleet monitor (``unirec monitor``): a faust-streaming app over ``feedback`` and
``model-updates`` that windows every model version's quality and the surrogate distance across
all workers (``stream.monitor.app``), serves them (``stream.monitor.views``: ``/``,
``/fleet/drift``, ``/fleet/versions``, ``/metrics``) and alerts on thresholds.

``run_monitor(config)`` creates the topics if missing and runs the app in this process until
SIGTERM or SIGINT (faust's ``Worker``, which stops the app in order).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from stream.monitor.app import FleetMonitor, MonitorConfig, fresh_app_id
from stream.topics import ensure_topics

__all__ = ["FleetMonitor", "MonitorConfig", "fresh_app_id", "run_monitor"]

log = logging.getLogger(__name__)


def run_monitor(config: MonitorConfig) -> None:
    """Ensure the topics, then run the monitor until a stop signal. The Tables' changelogs get
    as many partitions as ``feedback`` has. Raises ``BrokerUnavailable``/``TopicError``."""
    import faust

    counts = ensure_topics(config.bootstrap, config.partitions, topics=config.topics)
    # absolute: faust's Worker changes into ``workdir``, where a relative data directory (the
    # demo's default, ``runs/demo/monitor``) would no longer be found
    config = replace(config, partitions=counts[config.topics.feedback],
                     data_dir=config.data_dir.resolve())
    config.data_dir.mkdir(parents=True, exist_ok=True)
    monitor = FleetMonitor(config)
    log.info("fleet monitor %s on http://%s:%d (feedback: %d partitions)", config.app_id,
             config.web_host, config.web_port, config.partitions)
    worker = faust.Worker(monitor.app, loglevel="INFO", quiet=True, override_logging=False,
                          workdir=str(config.data_dir))
    worker.execute_from_commandline()
