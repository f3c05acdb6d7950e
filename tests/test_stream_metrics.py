"""Worker metrics: Prometheus names, and each observation shows up in the exposition."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.applier import ApplyReport, StageTimes
from stream.dead_letters import DeadLetter
from stream.metrics import CONTENT_TYPE, WorkerMetrics, candidate_bucket, reason_class

NAME = re.compile(r"unirec_[a-z][a-z0-9_]*")
UNITS = ("_seconds", "_messages", "_records", "_norm", "_offset")


def families(metrics: WorkerMetrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def samples(metrics: WorkerMetrics, name: str) -> dict[tuple, float]:
    """``name``'s samples as {(sample name, sorted label items): value}."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def report(applied: int = 3, skipped: int = 1, dead: int = 2, offset: int = 9) -> ApplyReport:
    letters = [
        DeadLetter.of("interactions", 0, 5, None, b"{}", "invalid Interaction: missing `ts`"),
        DeadLetter.of("interactions", 0, 6, b"x", b"{}", "record key 'x' differs from 'y'"),
    ][:dead]
    return ApplyReport(
        applied=applied, skipped=skipped, dead_letters=letters, users=2, new_users=1,
        state_norms=np.array([0.5, 1.5]), rebuilt=0,
        last_offset=offset, latency_s=0.03, stages=StageTimes(0.001, 0.002, 0.02, 0.007),
    )


def test_metric_names_follow_prometheus_conventions() -> None:
    metrics = WorkerMetrics()
    for collector_name, collector in metrics.registry._names_to_collectors.items():
        assert NAME.fullmatch(collector_name), collector_name
        kind = collector._type
        if kind == "counter":
            # Counters are exposed as NAME_total (NAME, and NAME_created, map to it too).
            assert collector._name + "_total" in metrics.registry._names_to_collectors
            assert not collector._name.endswith("_total")
        if kind == "histogram" and "duration" in collector._name:
            assert collector._name.endswith("_seconds"), collector._name
    exposed = families(metrics)
    expected = {
        "unirec_events_consumed": "counter",
        "unirec_events_applied": "counter",
        "unirec_events_rejected": "counter",
        "unirec_dead_letters": "counter",
        "unirec_consumer_lag_messages": "gauge",
        "unirec_apply_batch_duration_seconds": "histogram",
        "unirec_apply_stage_duration_seconds": "histogram",
        "unirec_state_store_read_duration_seconds": "histogram",
        "unirec_state_store_write_duration_seconds": "histogram",
        "unirec_scoring_duration_seconds": "histogram",
        "unirec_model_version": "gauge",
        "unirec_train_steps": "counter",
        "unirec_train_loss": "gauge",
        "unirec_online_auc": "gauge",
        "unirec_surrogate_distance": "gauge",
        "unirec_state_l2_norm": "histogram",
        "unirec_labels_joined": "counter",
        "unirec_labels_unmatched": "counter",
        "unirec_users": "gauge",
    }
    for name, kind in expected.items():
        assert exposed[name].type == kind, name


def test_two_workers_in_one_process_do_not_share_metrics() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.set_model_version(3)
    b.set_model_version(5)
    assert samples(a, "unirec_model_version") == {(): 3.0}
    assert samples(b, "unirec_model_version") == {(): 5.0}


def test_observe_apply_counts_events_dead_letters_and_times_each_stage() -> None:
    metrics = WorkerMetrics()
    metrics.observe_apply("interactions", 2, report())
    metrics.observe_apply("interactions", 2, report(applied=4, skipped=0, dead=0, offset=13))
    topic = (("topic", "interactions"),)
    assert samples(metrics, "unirec_events_consumed_total") == {topic: 6.0 + 4.0}
    assert samples(metrics, "unirec_events_applied_total") == {topic: 7.0}
    assert samples(metrics, "unirec_events_rejected_total") == {topic: 2.0}
    assert samples(metrics, "unirec_events_skipped_total") == {topic: 1.0}
    assert samples(metrics, "unirec_dead_letters_total") == {
        (("reason", "key"), ("topic", "interactions")): 1.0,
        (("reason", "schema"), ("topic", "interactions")): 1.0,
    }
    assert samples(metrics, "unirec_apply_batch_duration_seconds_count") == {topic: 2.0}
    assert samples(metrics, "unirec_apply_batch_duration_seconds_sum")[topic] == (
        pytest.approx(0.06)
    )
    stages = samples(metrics, "unirec_apply_stage_duration_seconds_count")
    assert stages == {(("stage", s),): 2.0 for s in ("decode", "read", "compute", "write")}
    # Each report wrote two states (norms 0.5 and 1.5), one of them a new user's.
    assert samples(metrics, "unirec_users") == {(): 2.0}
    assert samples(metrics, "unirec_state_l2_norm_count") == {(): 4.0}
    assert samples(metrics, "unirec_state_l2_norm_sum") == {(): pytest.approx(4.0)}
    compute = samples(metrics, "unirec_apply_stage_duration_seconds_sum")[(("stage", "compute"),)]
    assert compute == pytest.approx(0.04)
    assert samples(metrics, "unirec_state_store_read_duration_seconds_count") == {(): 2.0}
    assert samples(metrics, "unirec_state_store_write_duration_seconds_count") == {(): 2.0}
    partition = (("partition", "2"), ("topic", "interactions"))
    assert samples(metrics, "unirec_applied_offset") == {partition: 13.0}


def test_lag_is_a_gauge_per_partition_and_revoked_partitions_disappear() -> None:
    metrics = WorkerMetrics()
    metrics.set_lag("interactions", 0, 120)
    metrics.set_lag("interactions", 1, 7)
    metrics.set_lag("interactions", 0, 100)
    metrics.set_lag("labels", 0, 3)
    lag = samples(metrics, "unirec_consumer_lag_messages")
    assert lag == {
        (("partition", "0"), ("topic", "interactions")): 100.0,
        (("partition", "1"), ("topic", "interactions")): 7.0,
        (("partition", "0"), ("topic", "labels")): 3.0,
    }
    metrics.forget_partition("interactions", 1)
    metrics.forget_partition("interactions", 9)  # never seen: nothing to do
    assert (("partition", "1"), ("topic", "interactions")) not in samples(
        metrics, "unirec_consumer_lag_messages"
    )


def test_scoring_latency_is_bucketed_by_candidate_count() -> None:
    assert [candidate_bucket(n) for n in (1, 16, 17, 128, 129, 512, 513, 10_000)] == [
        "1-16", "1-16", "17-128", "17-128", "129-512", "129-512", ">512", ">512",
    ]
    metrics = WorkerMetrics()
    for n, seconds in ((5, 0.001), (10, 0.002), (100, 0.01), (1000, 0.2)):
        metrics.observe_scoring(n, seconds)
    counts = samples(metrics, "unirec_scoring_duration_seconds_count")
    assert counts == {
        (("candidates", "1-16"),): 2.0,
        (("candidates", "17-128"),): 1.0,
        (("candidates", ">512"),): 1.0,
    }
    buckets = samples(metrics, "unirec_scoring_duration_seconds_bucket")
    assert buckets[(("candidates", ">512"), ("le", "0.1"))] == 0.0
    assert buckets[(("candidates", ">512"), ("le", "0.25"))] == 1.0
    assert buckets[(("candidates", ">512"), ("le", "+Inf"))] == 1.0


def test_state_norms_fill_the_norm_histogram() -> None:
    metrics = WorkerMetrics()
    states = np.array([[0.0, 0.0], [0.3, 0.0], [3.0, 4.0]], dtype=np.float32)
    metrics.observe_state_norms(np.linalg.norm(states, axis=1))
    assert samples(metrics, "unirec_state_l2_norm_count") == {(): 3.0}
    assert samples(metrics, "unirec_state_l2_norm_sum") == {(): pytest.approx(5.3)}
    buckets = samples(metrics, "unirec_state_l2_norm_bucket")
    assert buckets[(("le", "0.25"),)] == 1.0
    assert buckets[(("le", "0.5"),)] == 2.0
    assert buckets[(("le", "4.0"),)] == 2.0
    assert buckets[(("le", "8.0"),)] == 3.0


def test_learning_and_label_metrics() -> None:
    metrics = WorkerMetrics()
    metrics.set_model_version(7)
    metrics.observe_train_step(0.5, steps=3)
    metrics.observe_train_step(0.25)
    metrics.set_online_auc(0.71, 0.64)
    metrics.set_online_auc(0.72)  # the twin's not known this time: kept
    metrics.set_surrogate_distance("1000", 0.1)
    metrics.set_surrogate_distance("10000", 0.05)
    metrics.observe_labels(joined=5, unmatched=1)
    metrics.observe_labels(joined=2, unmatched=0)
    metrics.set_users(42)
    metrics.count_consumed("labels", 8)
    metrics.count_rejected("labels", "invalid Label: label must be 0 or 1")
    metrics.observe_backlog("student", 40, 3)
    metrics.observe_backlog("student", 12, 10)  # the trainer's running total: +7
    metrics.observe_backlog("student", 0, 10)
    metrics.observe_backlog("live", 5, 0)
    assert samples(metrics, "unirec_train_backlog") == {
        (("model", "live"),): 5.0, (("model", "student"),): 0.0,
    }
    assert samples(metrics, "unirec_train_examples_dropped_total") == {
        (("model", "live"),): 0.0, (("model", "student"),): 10.0,
    }
    assert samples(metrics, "unirec_model_version") == {(): 7.0}
    assert samples(metrics, "unirec_train_steps_total") == {(): 4.0}
    assert samples(metrics, "unirec_train_loss") == {(): 0.25}
    assert samples(metrics, "unirec_online_auc") == {
        (("model", "dynamic"),): 0.72, (("model", "static"),): 0.64,
    }
    assert samples(metrics, "unirec_surrogate_distance") == {
        (("window", "1000"),): 0.1, (("window", "10000"),): 0.05,
    }
    assert samples(metrics, "unirec_labels_joined_total") == {(): 7.0}
    assert samples(metrics, "unirec_labels_unmatched_total") == {(): 1.0}
    assert samples(metrics, "unirec_users") == {(): 42.0}
    assert samples(metrics, "unirec_events_consumed_total") == {(("topic", "labels"),): 8.0}
    assert samples(metrics, "unirec_dead_letters_total") == {
        (("reason", "schema"), ("topic", "labels")): 1.0
    }


def test_reason_classes_and_content_type() -> None:
    assert reason_class("invalid Interaction: Expected `float`, got `str` - at `$.ts`") == (
        "schema"
    )
    assert reason_class("record key 'a' differs from the message's user_id 'b'") == "key"
    assert reason_class("something else") == "other"
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    assert WorkerMetrics().content_type == CONTENT_TYPE
