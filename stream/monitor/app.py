"""The fleet monitor's faust app: agents, windowed Tables, web views, timer, Prometheus export.

``FleetMonitor(config)`` builds one ``faust.App`` (``config.app_id``) with:

- agent ``feedback`` on the ``feedback`` topic (raw bytes): takes events in batches
  (``take_events``), decodes each as ``stream.feedback.Feedback``; a record that does not decode
  or is out of range (``Feedback.violation``) becomes a dead letter on ``dead-letters`` (as in
  the worker: bounded, with the reason) and the batch goes on. The valid ones are grouped by
  scope (``"all"`` and ``"v<version>"``) and by the set of windows their event time ``ts``
  falls in, summed into one ``FeedbackStats`` per group and merged into the windowed Tables:
  ``tumbling`` (``tumbling_s``) and ``hopping`` (``hopping_s`` every ``hop_step_s``), both
  expiring after ``expires_s`` and relative to the records' event time. One Table write per
  (scope, window) per batch keeps the changelog small;
- agent ``model-updates``: records when each version was announced (the ``versions`` Table,
  with the first and last event time of each version's feedback, kept by the feedback agent);
- a timer (``export_every_s``) that computes the report, checks the alerts and refreshes the
  Prometheus snapshot;
- web views (``stream.monitor.views``): ``GET /`` (the page), ``/fleet/drift``,
  ``/fleet/versions``, ``/metrics``, bound to ``web_host`` (127.0.0.1 by default).

Tables: values are ``FeedbackStats`` (codec ``unirec-feedback-stats``), keys are scopes, not
users, so they are written with ``use_partitioner=True`` (one changelog partition per key).
One monitor serves one fleet: a second instance in the same group would hold only its
partitions' share of every window.

Recovery (docs/system.md, "Parts chosen"): on the embedded broker a Table's changelog recovery
under-reads the end offset, so the embedded monitor does NOT rely on recovery: ``unirec demo``
and the tests give each start a fresh ``app_id`` (``fresh_app_id``): no changelog to recover,
a new consumer group that reads ``feedback`` from its start, so every window still within
``expires_s`` is rebuilt from the records themselves. On Apache Kafka a stable ``app_id``
recovers the Tables from their changelogs as faust designs.

Alerts: on the fleet's current hopping window (the last ``hopping_s`` seconds up to the latest
event), once it holds ``alert_min_count`` records: ``surrogate_distance`` when the distance is
above ``distance_threshold``, ``auc_gap`` when the static twin's AUC exceeds the live model's
by more than ``auc_gap_threshold``. Each upward crossing logs one warning and counts;
``unirec_fleet_alert{reason}`` is 1 while it lasts.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import faust
import msgspec
from faust.serializers import codecs

from model.feedback_stats import FeedbackStats
from stream.dead_letters import DeadLetter
from stream.feedback import Feedback, decoder
from stream.topics import TopicNames

log = logging.getLogger(__name__)

STATS_CODEC = "unirec-feedback-stats"
FLEET = "all"  # the scope of every version together


@dataclass(frozen=True)
class MonitorConfig:
    """What one monitor runs with (``unirec monitor``'s flags)."""

    bootstrap: str
    topics: TopicNames = field(default_factory=TopicNames)
    app_id: str = "unirec-monitor"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    data_dir: Path = Path("runs/monitor")
    partitions: int = 4  # of ``feedback``; the Tables' changelogs get as many
    tumbling_s: float = 60.0
    hopping_s: float = 600.0
    hop_step_s: float = 60.0
    expires_s: float = 3600.0
    distance_threshold: float | None = 0.1
    auc_gap_threshold: float | None = 0.05
    alert_min_count: int = 100
    batch: int = 5000  # feedback records per take
    batch_within_s: float = 0.5
    export_every_s: float = 1.0
    short_timeouts: bool = False  # the embedded broker's group timings (docs/system.md)


def fresh_app_id(prefix: str = "unirec-monitor") -> str:
    """An app id no earlier start used: no changelog recovery, ``feedback`` read from its start
    (the embedded broker's way, see the module docstring)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class _StatsCodec(codecs.Codec):
    """``FeedbackStats`` <-> its compact JSON, for the Tables' changelogs."""

    def _dumps(self, obj: Any) -> bytes:
        return obj.to_json()

    def _loads(self, s: bytes) -> Any:
        return FeedbackStats.from_json(s)


codecs.register(STATS_CODEC, _StatsCodec())


class EventTime(NamedTuple):
    """What the windowed Tables read a time from (``relative_to(_event_time)``): the event time
    of the records a merge carries."""

    ts: float


def _event_time(at: EventTime) -> float:
    return at.ts


def _merge(current: FeedbackStats, more: FeedbackStats) -> FeedbackStats:
    return current.merged(more)


class _Announced(msgspec.Struct):
    """The fields of a ``model-updates`` announcement (``stream.model_updates.ModelUpdate``)
    that the monitor reads; the others are ignored."""

    version: int
    ts: float = 0.0
    trainer: str = ""


class FleetMonitor:
    """The faust app of the fleet monitor and the figures it keeps (module docstring)."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = c = config
        timeouts: dict[str, Any] = {}
        if c.short_timeouts:
            timeouts = {"broker_rebalance_timeout": 3.0, "broker_session_timeout": 6.0,
                        "broker_heartbeat_interval": 1.0}
        self.app = app = faust.App(
            c.app_id, broker=f"kafka://{c.bootstrap}", store="memory://",
            datadir=str(c.data_dir), web_bind=c.web_host, web_host=c.web_host,
            web_port=c.web_port, web_stats_enabled=False, web_router_enabled=False,
            web_tables_enabled=False, topic_partitions=c.partitions,
            consumer_auto_offset_reset="earliest", table_cleanup_interval=30.0, **timeouts,
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.feedback_topic = app.topic(c.topics.feedback, **raw)
        self.updates_topic = app.topic(c.topics.model_updates, **raw)
        self.dead_topic = app.topic(c.topics.dead_letters, **raw)
        table = {"default": FeedbackStats,
                 "partitions": c.partitions, "use_partitioner": True}
        self.tumbling_table = app.Table("fleet-tumbling", **table)
        self.hopping_table = app.Table("fleet-hopping", **table)
        for t in (self.tumbling_table, self.hopping_table):
            t.value_serializer = STATS_CODEC  # the changelog's codec (read when it is made)
        self.tumbling = self.tumbling_table.tumbling(
            c.tumbling_s, expires=c.expires_s).relative_to(_event_time)
        self.hopping = self.hopping_table.hopping(
            c.hopping_s, c.hop_step_s, expires=c.expires_s).relative_to(_event_time)
        self.versions = app.Table("fleet-versions", default=dict, partitions=c.partitions,
                                  use_partitioner=True)
        self.consumed = 0
        self.rejected: Counter[str] = Counter()
        self.latest_ts: float | None = None
        self.alert = {"surrogate_distance": False, "auc_gap": False}
        self.alerts: Counter[str] = Counter()
        self.snapshot: dict[str, Any] = {}
        app.agent(self.feedback_topic, name="feedback")(self._on_feedback)
        app.agent(self.updates_topic, name="model-updates")(self._on_updates)
        app.timer(c.export_every_s)(self._on_timer)
        from stream.monitor.views import add_views  # the views read this object

        add_views(self)

    # ------------------------------------------------------------------------ agents

    async def _on_feedback(self, stream: faust.StreamT) -> None:
        c = self.config
        async for events in stream.take_events(c.batch, within=c.batch_within_s):
            dead = self.aggregate([e.message for e in events])
            for letter in dead:
                await self.dead_topic.send(key=letter.key, value=letter.encode())

    async def _on_updates(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            m = event.message
            try:
                announced = msgspec.json.decode(m.value, type=_Announced)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("model-updates[%d]@%d: not an announcement (%s); ignored",
                            m.partition, m.offset, str(exc)[:200])
                continue
            key = str(announced.version)
            entry = dict(self.versions[key])
            entry.update(version=announced.version, announced_at=announced.ts,
                         trainer=announced.trainer[:64])
            self.versions[key] = entry
            log.info("model version %d went live at %.3f", announced.version, announced.ts)

    def aggregate(self, messages: list[Any]) -> list[DeadLetter]:
        """Merge a batch of consumed ``feedback`` messages into the Tables; returns the dead
        letters of those that cannot be aggregated (never raises for a bad record)."""
        topic = self.config.topics.feedback
        dead: list[DeadLetter] = []
        groups: dict[tuple[str, tuple, tuple], list[Feedback]] = defaultdict(list)
        tumbling_window = self.tumbling_table.window
        hopping_window = self.hopping_table.window
        for m in messages:
            value = m.value if isinstance(m.value, bytes) else b""
            try:
                record = decoder.decode(value)
                reason = record.violation()
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                reason = f"not a feedback record: {exc}"
            if reason is not None:
                self.rejected[reason.split(":")[0][:60]] += 1
                dead.append(DeadLetter.of(topic, m.partition, m.offset, m.key, value, reason))
                continue
            windows = (tuple(tumbling_window.ranges(record.ts)),
                       tuple(hopping_window.ranges(record.ts)))
            groups[(FLEET, *windows)].append(record)
            groups[(f"v{record.model_version}", *windows)].append(record)
        self.consumed += len(messages)
        for (scope, _, _), records in groups.items():
            stats = FeedbackStats().add([r.p_dynamic for r in records],
                                        [r.p_static for r in records],
                                        [r.label for r in records])
            at = EventTime(records[0].ts)
            self.tumbling[scope].apply(_merge, stats, event=at)
            self.hopping[scope].apply(_merge, stats, event=at)
            first, last = min(r.ts for r in records), max(r.ts for r in records)
            if scope == FLEET:
                self.latest_ts = last if self.latest_ts is None else max(self.latest_ts, last)
            else:
                self._seen_version(records[0].model_version, len(records), first, last)
        return dead

    def _seen_version(self, version: int, n: int, first: float, last: float) -> None:
        key = str(version)
        entry = dict(self.versions[key])
        entry["version"] = version
        entry["feedback"] = int(entry.get("feedback", 0)) + n
        entry["first_ts"] = min(first, entry.get("first_ts", first))
        entry["last_ts"] = max(last, entry.get("last_ts", last))
        self.versions[key] = entry

    # ------------------------------------------------------------------------ reading

    def windows(self, which: str) -> dict[str, list[dict[str, Any]]]:
        """``{scope: [{"start", "end", **FeedbackStats.report()} oldest first]}`` of the
        ``"tumbling"`` or ``"hopping"`` Table, windows within ``expires_s`` of the latest
        event."""
        table = self.tumbling_table if which == "tumbling" else self.hopping_table
        size = self.config.tumbling_s if which == "tumbling" else self.config.hopping_s
        horizon = (self.latest_ts or time.time()) - self.config.expires_s
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for key, stats in list(table.data.items()):
            scope, (start, _end) = key
            if start + size <= horizon:
                continue
            out[scope].append({"start": float(start), "end": float(start) + size,
                               **_finite(stats.report())})
        return {scope: sorted(rows, key=lambda r: r["start"]) for scope, rows in out.items()}

    def current(self) -> dict[str, dict[str, Any]]:
        """Each scope's current hopping window: the one with the earliest start among those
        holding the latest event (the last ``hopping_s`` seconds up to it)."""
        if self.latest_ts is None:
            return {}
        latest = self.latest_ts
        out = {}
        for scope, rows in self.windows("hopping").items():
            holding = [r for r in rows if r["start"] <= latest < r["end"]]
            if holding:
                out[scope] = holding[0]
        return out

    def report(self) -> dict[str, Any]:
        """``GET /fleet/drift``'s body (see the README)."""
        c = self.config
        return {
            "now": time.time(), "latest_event_ts": self.latest_ts,
            "records_consumed": self.consumed, "records_rejected": sum(self.rejected.values()),
            "windows": {"tumbling_s": c.tumbling_s, "hopping_s": c.hopping_s,
                        "hop_step_s": c.hop_step_s, "expires_s": c.expires_s},
            "thresholds": {"surrogate_distance": c.distance_threshold,
                           "auc_gap": c.auc_gap_threshold, "min_count": c.alert_min_count},
            "alert": dict(self.alert), "alerts_total": dict(self.alerts),
            "current": self.current(),
            "tumbling": self.windows("tumbling"),
            "hopping": self.windows("hopping"),
        }

    def version_list(self) -> list[dict[str, Any]]:
        """``GET /fleet/versions``'s body: every version seen, lowest first."""
        return sorted((dict(v) for v in self.versions.values()),
                      key=lambda v: v.get("version", 0))

    # ------------------------------------------------------------------------ timer

    async def _on_timer(self) -> None:
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Compute the report, check the alerts, keep it as the Prometheus snapshot."""
        report = self.report()
        self._check_alerts(report["current"].get(FLEET))
        report["alert"], report["alerts_total"] = dict(self.alert), dict(self.alerts)
        self.snapshot = {"report": report, "versions": self.version_list()}
        return report

    def _check_alerts(self, window: dict[str, Any] | None) -> None:
        c = self.config
        if window is None or window["n"] < c.alert_min_count:
            return
        gap = (None if window["auc_static"] is None or window["auc_dynamic"] is None
               else window["auc_static"] - window["auc_dynamic"])
        checks = {"surrogate_distance": (window["distance"], c.distance_threshold),
                  "auc_gap": (gap, c.auc_gap_threshold)}
        for reason, (value, threshold) in checks.items():
            if value is None or threshold is None:
                continue
            above = value > threshold
            if above and not self.alert[reason]:
                self.alerts[reason] += 1
                log.warning("fleet alert: %s = %.4g crossed the threshold %.4g (window "
                            "%.0f-%.0f, %d records)", reason, value, threshold,
                            window["start"], window["end"], window["n"])
            self.alert[reason] = above


def _finite(report: dict[str, Any]) -> dict[str, Any]:
    """The report with non-finite floats as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in report.items()}
