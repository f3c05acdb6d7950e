"""Every metric the Grafana dashboard queries is one a live worker (or, for ``unirec_fleet_*``,
the live fleet monitor fed by that worker's ``feedback``) really exports.

One worker subprocess runs against the embedded broker over a small synthetic log (every
interaction, impression and label, plus one undecodable record, so that a dead letter is
counted); once it has applied everything and reported its consumer lag, its ``/metrics`` is
read once. Each ``unirec_*`` name in the dashboard's PromQL (``_total``, ``_bucket`` as
written) must then have at least one sample there: a family that is only declared (a labelled
metric whose labels were never set) does not count.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_fixtures import dashboard_exprs, metric_names
from kafka import KafkaProducer
from monitor_fixtures import MonitorProcess
from prometheus_client.parser import text_string_to_metric_families
from stream_fixtures import WorkerProcess, http_get, tiny_checkpoint, wait_for

from stream.broker import EmbeddedBroker
from stream.producer import replay_events, synthetic_events
from stream.topics import TopicNames, ensure_topics

N_EVENTS = 120
PARTITIONS = 2
PREFIX = "dash-"
START_TIMEOUT_S = 90.0
DASHBOARD_METRICS = sorted(set().union(*(metric_names(e) for _, e in dashboard_exprs())))


def sample_names(exposition: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(exposition)
            for sample in family.samples}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``/metrics`` of a worker that applied, scored and joined a small log."""
    tmp = tmp_path_factory.mktemp("dashboard")
    checkpoint = tiny_checkpoint(tmp / "model.pt")
    topics = TopicNames.with_prefix(PREFIX)
    with EmbeddedBroker(log_dir=tmp) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, PARTITIONS, topics=topics)
        replay_events(synthetic_events(N_EVENTS, seed=5), bootstrap, topics, negatives=3,
                      seed=5)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(topics.interactions, key=b"u1", value=b"\x00 not json {")
        producer.flush(10)
        producer.close()
        worker = WorkerProcess(bootstrap, checkpoint, tmp / "store", tmp / "worker.log",
                               prefix=PREFIX, partitions=PARTITIONS)
        text: list[str] = [""]

        def settled() -> bool:
            status, body = http_get(worker.url + "/metrics")
            text[0] = body.decode(errors="replace")
            return (status == 200
                    and f'unirec_events_applied_total{{topic="{topics.interactions}"}} '
                        f"{float(N_EVENTS)}" in text[0]
                    and "unirec_consumer_lag_messages{" in text[0]
                    and "unirec_dead_letters_total{" in text[0]
                    and "unirec_scoring_duration_seconds_count{" in text[0]
                    and "unirec_online_auc{" in text[0]
                    and "unirec_surrogate_distance{" in text[0])

        try:
            wait_for(settled, START_TIMEOUT_S, worker, "everything applied and reported")
        except AssertionError as exc:
            metrics = [ln for ln in text[0].splitlines() if ln.startswith("unirec_")]
            raise AssertionError(f"{exc}\n/metrics:\n" + "\n".join(metrics[-60:])) from None
        finally:
            worker.stop()
        # the fleet monitor, over the feedback the worker published
        monitor = MonitorProcess(bootstrap, tmp / "monitor", tmp / "monitor.log",
                                 prefix=PREFIX, partitions=PARTITIONS)
        fleet: list[str] = [""]

        def aggregated() -> bool:
            status, body = http_get(monitor.url + "/metrics")
            fleet[0] = body.decode(errors="replace")
            return (status == 200 and "unirec_fleet_online_auc{" in fleet[0]
                    and "unirec_fleet_surrogate_distance{" in fleet[0])

        try:
            wait_for(aggregated, START_TIMEOUT_S, None, "the monitor's fleet figures")
        finally:
            monitor.stop()
        yield text[0] + fleet[0]


def test_dashboard_queries_only_unirec_metrics() -> None:
    assert len(DASHBOARD_METRICS) >= 10
    for title, expr in dashboard_exprs():
        assert metric_names(expr), f"panel {title!r} queries no unirec_* metric: {expr}"


@pytest.mark.broker
@pytest.mark.parametrize("name", DASHBOARD_METRICS)
def test_dashboard_metric_is_exported_by_a_live_worker(exposition: str, name: str) -> None:
    assert name in sample_names(exposition), (
        f"{name} is queried by the dashboard but not exported; worker and monitor export: "
        + ", ".join(sorted(n for n in sample_names(exposition) if n.startswith("unirec_"))))

