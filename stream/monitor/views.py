"""The fleet monitor's web views (faust ``app.page``) and its Prometheus export.

- ``GET /``: the page (``page.html``, inline SVG charts, no external resource);
- ``GET /fleet/drift``: ``FleetMonitor.report()`` as JSON (the timer's latest, or fresh);
- ``GET /fleet/versions``: every model version seen: announced time, first/last event time of
  its feedback, record count;
- ``GET /metrics``: Prometheus text of ``FleetCollector`` (``unirec_fleet_*``).

faust mounts a placeholder index at ``/`` (its production index blueprint); ``add_views``
takes it off the app's blueprint list so that ``/`` serves the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from faust import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from stream.monitor.app import FleetMonitor

_INDEX = "faust.web.apps.production_index:blueprint"
MODELS = (("dynamic", "auc_dynamic", "logloss_dynamic"), ("static", "auc_static",
                                                          "logloss_static"))


def page_html() -> str:
    """The monitor's HTML page."""
    return resources.files("stream.monitor").joinpath("page.html").read_text()


def add_views(monitor: FleetMonitor) -> None:
    """Register the views on ``monitor.app`` (before it starts)."""
    app = monitor.app
    blueprints = app.web.blueprints
    blueprints._enabled = [(p, bp) for p, bp in blueprints._enabled if bp != _INDEX]
    registry = CollectorRegistry()
    registry.register(FleetCollector(monitor))
    html = page_html()

    @app.page("/")
    async def index(view: web.View, request: web.Request) -> web.Response:
        return view.html(html)

    @app.page("/fleet/drift")
    async def drift(view: web.View, request: web.Request) -> web.Response:
        return view.json(monitor.refresh())

    @app.page("/fleet/versions")
    async def versions(view: web.View, request: web.Request) -> web.Response:
        return view.json(monitor.version_list())

    @app.page("/metrics")
    async def metrics(view: web.View, request: web.Request) -> web.Response:
        return view.bytes(generate_latest(registry),
                          content_type="text/plain; version=0.0.4")


def _label(scope: str) -> str:
    """The ``model_version`` label of a scope: ``"all"`` or the version number."""
    return scope[1:] if scope.startswith("v") else scope


class FleetCollector:
    """Prometheus collector over the monitor's latest snapshot (``FleetMonitor.refresh``):
    only the current windows' scopes are exported, so label values stay bounded."""

    def __init__(self, monitor: FleetMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        report = m.snapshot.get("report") or m.refresh()
        yield CounterMetricFamily("unirec_fleet_feedback_records",
                                  "feedback records consumed by the monitor", value=m.consumed)
        rejected = CounterMetricFamily("unirec_fleet_feedback_rejected",
                                       "feedback records sent to dead-letters, by reason",
                                       labels=["reason"])
        for reason, n in sorted(m.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        latest = GaugeMetricFamily("unirec_fleet_latest_event_timestamp_seconds",
                                   "event time of the newest feedback record")
        if m.latest_ts is not None:
            latest.add_metric([], m.latest_ts)
        yield latest
        names = {
            "records": ("unirec_fleet_window_records", "feedback records in the window"),
            "auc": ("unirec_fleet_online_auc", "online AUC of the window's feedback"),
            "logloss": ("unirec_fleet_logloss", "LogLoss of the window's feedback"),
            "distance": ("unirec_fleet_surrogate_distance",
                         "mean symmetric binary KL of live vs static probabilities"),
            "abs": ("unirec_fleet_mean_abs_diff", "mean |p_dyn - p_stat|"),
            "psi": ("unirec_fleet_score_psi", "PSI of the live vs static score histograms"),
            "js": ("unirec_fleet_score_js", "JS divergence of the two score histograms"),
        }
        per_model = ("auc", "logloss")
        families = {k: GaugeMetricFamily(
            name, help_, labels=["model_version", "window"] + (["model"] if k in per_model
                                                                else []))
            for k, (name, help_) in names.items()}
        rows = self._current_rows(report)
        for scope, window, row in rows:
            labels = [_label(scope), window]
            families["records"].add_metric(labels, row["n"])
            for model, auc_key, ll_key in MODELS:
                if row[auc_key] is not None:
                    families["auc"].add_metric([*labels, model], row[auc_key])
                if row[ll_key] is not None:
                    families["logloss"].add_metric([*labels, model], row[ll_key])
            for key, field in (("distance", "distance"), ("abs", "mean_abs_diff"),
                               ("psi", "psi"), ("js", "js")):
                if row[field] is not None:
                    families[key].add_metric(labels, row[field])
        yield from families.values()
        alert = GaugeMetricFamily("unirec_fleet_alert", "1 while the fleet alert is raised",
                                  labels=["reason"])
        alerts = CounterMetricFamily("unirec_fleet_alerts", "upward threshold crossings",
                                     labels=["reason"])
        for reason, on in sorted(m.alert.items()):
            alert.add_metric([reason], float(on))
            alerts.add_metric([reason], m.alerts.get(reason, 0))
        yield alert
        yield alerts
        live = GaugeMetricFamily("unirec_fleet_model_version_live_timestamp_seconds",
                                 "when each model version was announced on model-updates",
                                 labels=["model_version"])
        for v in m.snapshot.get("versions", []):
            if v.get("announced_at") is not None:
                live.add_metric([str(v["version"])], v["announced_at"])
        yield live

    @staticmethod
    def _current_rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """(scope, window label, figures) of the current hopping and tumbling windows."""
        rows: list[tuple[str, str, dict[str, Any]]] = []
        latest = report.get("latest_event_ts")
        if latest is None:
            return rows
        hop = f"{report['windows']['hopping_s']:g}s"
        tum = f"{report['windows']['tumbling_s']:g}s"
        for scope, row in report["current"].items():
            rows.append((scope, hop, row))
        for scope, windows in report["tumbling"].items():
            holding = [w for w in windows if w["start"] <= latest < w["end"]]
            if holding:
                rows.append((scope, tum, holding[0]))
        return rows
