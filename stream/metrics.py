"""The worker's Prometheus metrics, in a registry of their own.

``WorkerMetrics`` owns a ``CollectorRegistry`` (not prometheus_client's global one, so several
workers, or tests, in one process do not clash) holding every metric (docs/system.md). The
worker calls its ``observe_*`` / ``set_*`` / ``count_*`` methods; ``render`` gives the text
exposition that ``GET /metrics`` serves with ``CONTENT_TYPE``.

Names follow Prometheus' conventions: snake_case, the ``unirec_`` prefix, base units as
suffixes (``_seconds``), ``_total`` on counters.
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from stream.applier import ApplyReport
from stream.dead_letters import DeadLetter

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # "text/plain; version=0.0.4; charset=utf-8"

# From half a millisecond to ten seconds, roughly doubling.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# GRU states live in [-1, 1]^d: their L2 norm is at most sqrt(d).
NORM_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BATCH_SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
STAGES = ("decode", "read", "compute", "write")
CANDIDATE_BUCKETS = ((16, "1-16"), (128, "17-128"), (512, "129-512"))


def candidate_bucket(n_candidates: int) -> str:
    """The ``candidates`` label of a request with ``n_candidates`` candidates."""
    for upper, name in CANDIDATE_BUCKETS:
        if n_candidates <= upper:
            return name
    return ">512"


def refusal_class(reason: str) -> str:
    """The ``reason`` label of a refused training step: the reason's words before any figure
    (``non-finite loss``, ``non-finite gradient``, ``exploding loss``)."""
    words = []
    for word in reason.split():
        if any(ch.isdigit() for ch in word):
            break
        words.append(word)
    return " ".join(words) or "other"


_REASON_CLASSES = (
    ("invalid ", "schema"),  # does not decode or validate
    ("record key ", "key"),  # its record key is not its user id
    ("record has no key", "key"),
    ("record value is ", "limit"),  # over a RecordLimits bound
    ("impression has ", "limit"),
    ("event time ", "time"),  # too far from the record's broker time
    ("cannot apply", "compute"),  # its computation fails (stream.isolation)
    ("cannot score", "compute"),
    ("cannot publish", "publish"),  # the producer refused its output
)


def reason_class(reason: str) -> str:
    """The ``reason`` label of a dead letter: ``schema``, ``key``, ``limit``, ``time``,
    ``compute``, ``publish`` (see ``_REASON_CLASSES``) or ``other``."""
    for prefix, name in _REASON_CLASSES:
        if reason.startswith(prefix):
            return name
    if " over the limit of " in reason or " is beyond +-" in reason:
        return "limit"  # an id or a number past its RecordLimits bound
    return "other"


class WorkerMetrics:
    """Every metric of one worker, in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._dropped: dict[str, int] = {}  # trainer drops counted so far, by model

        # Consuming and applying.
        self.events_consumed = Counter(
            "unirec_events_consumed", "Records consumed.", ["topic"], registry=r
        )
        self.events_applied = Counter(
            "unirec_events_applied", "Events applied to user states.", ["topic"], registry=r
        )
        self.events_rejected = Counter(
            "unirec_events_rejected", "Records rejected (sent to dead-letters).", ["topic"],
            registry=r,
        )
        self.events_skipped = Counter(
            "unirec_events_skipped",
            "Records at or below the stored offset (already applied), skipped.",
            ["topic"], registry=r,
        )
        self.dead_letters = Counter(
            "unirec_dead_letters", "Dead letters by reason class.", ["topic", "reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "unirec_consumer_lag_messages",
            "Messages between the partition's end offset and the next one to consume.",
            ["topic", "partition"], registry=r,
        )
        self.applied_offset = Gauge(
            "unirec_applied_offset", "The partition's last applied (stored) offset.",
            ["topic", "partition"], registry=r,
        )
        self.apply_batch_duration = Histogram(
            "unirec_apply_batch_duration_seconds", "Seconds to apply one consumed batch.",
            ["topic"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.apply_stage_duration = Histogram(
            "unirec_apply_stage_duration_seconds",
            "Seconds per stage (decode, read, compute, write) of applying one batch.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.apply_batch_records = Histogram(
            "unirec_apply_batch_records", "Records per applied batch.", ["topic"],
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )

        # State store.
        self.store_read_duration = Histogram(
            "unirec_state_store_read_duration_seconds",
            "Seconds of one state store multi-get.", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.store_write_duration = Histogram(
            "unirec_state_store_write_duration_seconds",
            "Seconds of one state store WriteBatch.", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.state_norm = Histogram(
            "unirec_state_l2_norm", "L2 norms of the user states written.",
            buckets=NORM_BUCKETS, registry=r,
        )
        self.users = Gauge("unirec_users", "Users with a stored state.", registry=r)
        self.released_early = Counter(
            "unirec_gate_released_early",
            "Records released before an impression of their partition with a later timestamp "
            "was seen (the event-time gate was full).", ["topic"], registry=r,
        )

        # Serving.
        self.scoring_duration = Histogram(
            "unirec_scoring_duration_seconds",
            "Seconds to score one impression, by candidate count bucket.",
            ["candidates"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "unirec_http_requests", "HTTP API requests.", ["endpoint", "code"], registry=r
        )

        # Online learning.
        self.model_version = Gauge(
            "unirec_model_version", "Version of the weights serving now.", registry=r
        )
        self.train_steps = Counter(
            "unirec_train_steps", "Online trainer optimizer steps.", registry=r
        )
        self.train_loss = Gauge(
            "unirec_train_loss", "Loss of the online trainer's last step.", registry=r
        )
        self.train_backlog = Gauge(
            "unirec_train_backlog",
            "Joined examples waiting for a training step, by model (live: the model being "
            "fine-tuned; student: the static student, which trains after it).", ["model"],
            registry=r,
        )
        self.train_dropped = Counter(
            "unirec_train_examples_dropped",
            "Joined examples dropped untrained (past the trainer's buffer, or in a refused "
            "step), by model (live, student).", ["model"], registry=r,
        )
        self.online_auc = Gauge(
            "unirec_online_auc", "Online AUC over labelled impressions.", ["model"],
            registry=r,
        )
        self.surrogate_distance = Gauge(
            "unirec_surrogate_distance",
            "Surrogate distance between the live model and the static twin.", ["window"],
            registry=r,
        )
        self.train_refused = Counter(
            "unirec_train_refused", "Online trainer updates refused (weights kept), by reason.",
            ["reason"], registry=r,
        )
        self.versions_skipped = Counter(
            "unirec_model_versions_skipped",
            "Announced model versions not loaded (unreadable or corrupt).", registry=r,
        )
        self.versions_refused = Counter(
            "unirec_model_versions_refused",
            "Readable model versions refused, never loaded, by reason (not_newer, model_kind, "
            "state_width, feature_spec, model_config).", ["reason"], registry=r,
        )
        self.trainer_refused = Counter(
            "unirec_trainer_refused",
            "Times this process refused to train or publish because another trainer holds the "
            "versions directory or announces on model-updates, by reason.", ["reason"],
            registry=r,
        )
        self.stale_states_rebuilt = Counter(
            "unirec_stale_states_rebuilt",
            "User states of an older model version rebuilt from history, by path "
            "(apply: rebuilt and stored; score: rebuilt in memory to score).",
            ["path"], registry=r,
        )
        self.online_logloss = Gauge(
            "unirec_online_logloss", "Online LogLoss over labelled impressions.", ["model"],
            registry=r,
        )
        self.score_abs_diff = Gauge(
            "unirec_score_abs_diff",
            "Mean |p_dynamic - p_static| over the window's predictions.", ["window"], registry=r,
        )
        self.score_psi = Gauge(
            "unirec_score_psi",
            "Population stability index between the live and static score distributions.",
            ["window"], registry=r,
        )
        self.score_js = Gauge(
            "unirec_score_js",
            "Jensen-Shannon divergence between the live and static score distributions.",
            ["window"], registry=r,
        )
        self.student_imitation_loss = Gauge(
            "unirec_student_imitation_loss",
            "Static student's imitation loss (symmetric KL to the live model): an upper "
            "bound on the surrogate distance's infimum over static predictors.", ["window"],
            registry=r,
        )
        self.drift_alert = Gauge(
            "unirec_drift_alert", "1 while the surrogate distance is above the alert threshold.",
            registry=r,
        )
        self.labels_joined = Counter(
            "unirec_labels_joined", "Labels joined with a scored impression.", registry=r
        )
        self.labels_unmatched = Counter(
            "unirec_labels_unmatched", "Labels that joined no scored impression.", registry=r
        )

    # ------------------------------------------------------------------- consuming/applying

    def observe_apply(self, topic: str, partition: int, report: ApplyReport) -> None:
        """Record one ``InteractionApplier.apply``: counts, dead letters, latencies, offset."""
        rejected = len(report.dead_letters)
        consumed = report.applied + report.skipped + rejected
        self.events_consumed.labels(topic).inc(consumed)
        self.events_applied.labels(topic).inc(report.applied)
        self.events_rejected.labels(topic).inc(rejected)
        self.events_skipped.labels(topic).inc(report.skipped)
        self.count_dead_letters(topic, report.dead_letters)
        self.apply_batch_duration.labels(topic).observe(report.latency_s)
        self.apply_batch_records.labels(topic).observe(consumed)
        stages = report.stages
        for stage, seconds in zip(
            STAGES, (stages.decode_s, stages.read_s, stages.compute_s, stages.write_s),
            strict=True,
        ):
            self.apply_stage_duration.labels(stage).observe(seconds)
        self.store_read_duration.observe(stages.read_s)
        self.store_write_duration.observe(stages.write_s)
        self.count_stale_rebuilt("apply", report.rebuilt)
        self.users.inc(report.new_users)
        self.observe_state_norms(report.state_norms)
        if report.last_offset >= 0:
            self.applied_offset.labels(topic, str(partition)).set(report.last_offset)

    def count_consumed(self, topic: str, n: int = 1) -> None:
        """Records consumed from a topic the applier does not handle (impressions, labels)."""
        self.events_consumed.labels(topic).inc(n)

    def count_dead_letters(self, topic: str, dead_letters: Iterable[DeadLetter]) -> None:
        """Count dead letters by reason class (``reason_class``)."""
        for dead in dead_letters:
            self.dead_letters.labels(topic, reason_class(dead.reason)).inc()

    def count_rejected(self, topic: str, reason: str, n: int = 1) -> None:
        """Records of ``topic`` rejected outside the applier (a bad impression or label)."""
        self.events_rejected.labels(topic).inc(n)
        self.dead_letters.labels(topic, reason_class(reason)).inc(n)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """The partition's consumer lag in messages (end offset minus next offset)."""
        self.consumer_lag.labels(topic, str(partition)).set(max(0, lag))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's gauges (another worker reports them now)."""
        for gauge in (self.consumer_lag, self.applied_offset):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    # ------------------------------------------------------------------- store and serving

    def observe_store_read(self, seconds: float) -> None:
        self.store_read_duration.observe(seconds)

    def observe_store_write(self, seconds: float) -> None:
        self.store_write_duration.observe(seconds)

    def observe_state_norms(self, norms: np.ndarray | Sequence[float]) -> None:
        """Observe each L2 norm in ``norms`` (e.g. ``np.linalg.norm(states, axis=1)``)."""
        for norm in np.asarray(norms, dtype=np.float64).ravel().tolist():
            self.state_norm.observe(norm)

    def set_users(self, n: int) -> None:
        self.users.set(n)

    def observe_scoring(self, n_candidates: int, seconds: float) -> None:
        """One impression of ``n_candidates`` candidates scored in ``seconds``."""
        self.scoring_duration.labels(candidate_bucket(n_candidates)).observe(seconds)

    def count_http_request(self, endpoint: str, code: int) -> None:
        self.http_requests.labels(endpoint, str(code)).inc()

    # -------------------------------------------------------------------- online learning

    def set_model_version(self, version: int) -> None:
        self.model_version.set(version)

    def observe_train_step(self, loss: float, steps: int = 1) -> None:
        """``steps`` optimizer steps taken, the last one's loss ``loss``."""
        self.train_steps.inc(steps)
        self.train_loss.set(loss)

    def observe_backlog(self, model: str, waiting: int, dropped: int) -> None:
        """A trainer of ``model`` (live, student) has ``waiting`` examples buffered and has
        dropped ``dropped`` in all (the counter rises by what is new)."""
        self.train_backlog.labels(model).set(waiting)
        self.train_dropped.labels(model).inc(max(dropped - self._dropped.get(model, 0), 0))
        self._dropped[model] = max(dropped, self._dropped.get(model, 0))

    def count_refused(self, reason: str) -> None:
        """One refused training step (``reason`` as the trainer gave it)."""
        self.train_refused.labels(refusal_class(reason)).inc()

    def count_version_refused(self, reason: str) -> None:
        """One model version refused for ``reason`` (never loaded)."""
        self.versions_refused.labels(reason).inc()

    def count_trainer_refused(self, reason: str) -> None:
        """This process refused to train or publish for ``reason`` (another trainer)."""
        self.trainer_refused.labels(reason).inc()

    def count_stale_rebuilt(self, path: str, n: int) -> None:
        """``n`` stale states rebuilt on ``path`` (``apply`` or ``score``)."""
        if n:
            self.stale_states_rebuilt.labels(path).inc(n)

    def set_drift(self, report: dict, imitation: dict[int, float | None]) -> None:
        """Export a ``DriftMonitor.report()``: per window D_T, mean |diff|, PSI and JS; online
        AUC and LogLoss of both models over the largest window; the alert; and the student's
        imitation loss per window (``imitation``). None figures are left unset."""
        windows = report["windows"]
        for window, figures in windows.items():
            for gauge, key in ((self.surrogate_distance, "distance"),
                               (self.score_abs_diff, "mean_abs_diff"),
                               (self.score_psi, "psi"), (self.score_js, "js")):
                if figures[key] is not None:
                    gauge.labels(str(window)).set(figures[key])
        largest = windows[max(windows)]
        self.set_online_auc(largest["auc_dynamic"], largest["auc_static"])
        for model in ("dynamic", "static"):
            if largest[f"logloss_{model}"] is not None:
                self.online_logloss.labels(model).set(largest[f"logloss_{model}"])
        self.drift_alert.set(1 if report["alert"] else 0)
        for window, loss in imitation.items():
            if loss is not None:
                self.student_imitation_loss.labels(str(window)).set(loss)

    def set_online_auc(self, dynamic: float | None, static: float | None = None) -> None:
        """The online AUC of the live model and of the static twin (None: not known yet)."""
        for model, value in (("dynamic", dynamic), ("static", static)):
            if value is not None:
                self.online_auc.labels(model).set(value)

    def set_surrogate_distance(self, window: str, distance: float) -> None:
        """The surrogate distance over ``window`` (a label such as ``"1000"`` or ``"1h"``)."""
        self.surrogate_distance.labels(window).set(distance)

    def observe_labels(self, joined: int, unmatched: int) -> None:
        """Labels newly joined and newly unmatched (increments, not totals)."""
        self.labels_joined.inc(joined)
        self.labels_unmatched.inc(unmatched)

    # -------------------------------------------------------------------------- exposition

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE


# ----------------------------------------------- reading a worker's /metrics (demo, benches)


def scrape(api: str, timeout_s: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{sample name: [(labels, value)]}`` of the worker's ``/metrics``; {} if unreachable."""
    try:
        with urllib.request.urlopen(f"{api}/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, ()) if labels.items() <= lab.items())


def histogram_quantile(q: float, samples: dict, name: str) -> float | None:
    """The ``q`` quantile of histogram ``name`` (all label sets merged), interpolated within
    its bucket as PromQL's ``histogram_quantile`` does; None without observations."""
    buckets: dict[float, float] = {}
    for labels, value in samples.get(f"{name}_bucket", ()):
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower
