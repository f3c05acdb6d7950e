"""``unirec worker``: the faust-streaming app that consumes the topics.

Three agents, each over micro-batches (``stream.take_events(n, within)``):

- ``interactions``: applied exactly once through ``InteractionApplier`` (``stream.agents``);
- ``impressions``: scored (one multi-get per batch), ``Scores`` published to ``scores``;
- ``labels``: joined with the scored impressions through the ``LabelBuffer``.

Exactly once (SYSTEM.md, "State and the exactly-once effect"): faust's own offset commits are
at-least-once and do not matter. Whenever faust seeks the consumer (to the group's committed
offsets, after every assignment), the worker seeks each assigned ``interactions`` partition
again, to one past the offset stored in the state store, after checking that the stored
offsets belong to the current log (``StateStore.resume_offset`` with the log identity and the
partition's end offset). If they do not, the worker stops with an error naming the partition,
unless ``reset_on_new_log`` is set: then the partition's stored offset is forgotten and the
new log is consumed from its start. Redelivered records are skipped by the applier anyway.
The check runs before the group is joined (for every partition the store holds; a refusal
is a ``WorkerError``, exit status 2 from the CLI) and again after every assignment (a refusal
then ends the process with status 3: e.g. an embedded broker restarted under a running
worker). A revoked partition is not applied until it is assigned and checked again. Residual
window: records fetched from a new log between the broker's restart and the revocation are
judged against the old log's offsets (at most one fetch; the rejoin follows within seconds).

Each agent runs its batches on a thread of its own, in order, so that torch (the scorer, the
GRU unroll) never blocks the event loop, the heartbeats or the other agents. A label may reach
the ``labels`` agent before its impression was scored: it is counted as unmatched.

``WorkerServices`` (``stream.agents``) is the hook for HTTP views and metrics: ``run_worker``
calls each function of ``hooks`` with the faust app and the services before starting.
The handlers count into ``services.metrics`` (a ``WorkerMetrics``); a timer sets the consumer
lag of each assigned ``interactions`` partition every ``lag_interval_s`` (the fetched high
water minus the store's next offset; no broker round trip), and a revoked partition's gauges
are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
import torch

from model.checkpoint import CheckpointError, load
from model.scorer import Scorer
from state_store import LogMismatchError, StateStore, StoreConfig
from stream.agents import (
    Record,
    WorkerServices,
    handle_impressions,
    handle_interactions,
    handle_labels,
)
from stream.applier import InteractionApplier
from stream.metrics import WorkerMetrics
from stream.producer import open_producer
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer
from stream.topics import TopicNames, end_offsets, ensure_topics, log_identity

log = logging.getLogger(__name__)

EXIT_LOG_CHANGED = 3


class WorkerError(RuntimeError):
    """A worker that cannot start or must stop: the message says why (one line)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker is configured with (printed once at start)."""

    bootstrap_servers: str
    store_dir: Path
    checkpoint: Path
    device: str = "cpu"
    partitions: int = 4
    batch_size: int = 256
    batch_within_s: float = 0.05
    web_port: int = 6066
    web_bind: str = "127.0.0.1"
    reset_on_new_log: bool = False
    torch_threads: int = 1
    group_id: str = "unirec-worker"
    topic_prefix: str = ""
    feedback_window_s: float = 3600.0
    feedback_max: int = 100_000
    label_capacity: int = 100_000
    timeout_s: float = 10.0
    # Group timings that work with the embedded Tansu broker (SYSTEM.md, "Parts chosen").
    rebalance_timeout_s: float = 3.0
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    lag_interval_s: float = 1.0  # seconds between consumer lag updates
    extra: dict[str, Any] = field(default_factory=dict)  # more faust.App settings

    @property
    def topics(self) -> TopicNames:
        return TopicNames.with_prefix(self.topic_prefix)


def model_version_of(meta: dict[str, Any]) -> int:
    """The model version recorded in a checkpoint's metadata, or 1."""
    for key in ("model_version", "version"):
        value = meta.get(key)
        if isinstance(value, int) and value >= 0:
            return value
    return 1


def build_services(config: WorkerConfig, metrics: WorkerMetrics | None = None
                   ) -> WorkerServices:
    """Load the model, open the store and the producer; ``WorkerError`` if one cannot be.

    ``metrics`` (default: a new ``WorkerMetrics``) is what the handlers count into: pass the
    one the HTTP API renders."""
    device = torch.device(config.device)
    try:
        model, meta = load(config.checkpoint, device)
    except CheckpointError as exc:
        raise WorkerError(f"{exc} (train a model first, e.g. `unirec train`)") from exc
    version = model_version_of(meta)
    store_config = StoreConfig(state_dim=model.cfg.d_model, history_len=model.cfg.history_len)
    try:
        store = StateStore.open(config.store_dir, store_config)
    except Exception as exc:
        raise WorkerError(f"cannot open the state store at {config.store_dir}: {exc}") from exc
    try:
        producer = open_producer(config.bootstrap_servers, config.timeout_s)
    except Exception:
        store.close()
        raise
    window = FeedbackWindow(config.feedback_window_s, config.feedback_max)
    log.info("model %s: version %d, d_model %d, on %s", config.checkpoint, version,
             model.cfg.d_model, device)
    metrics = metrics if metrics is not None else WorkerMetrics()
    metrics.set_model_version(version)
    return WorkerServices(
        store=store,
        applier=InteractionApplier(store, model, version),
        scorer=ImpressionScorer(store, Scorer(model, device), version),
        window=window,
        labels=LabelBuffer(window, config.label_capacity),
        producer=producer,
        topics=config.topics,
        model_version=version,
        metrics=metrics,
    )


def plan_resume(services: WorkerServices, config: WorkerConfig,
                partitions: Iterable[int]) -> dict[int, int]:
    """``{partition: offset to seek to}`` for the given ``interactions`` partitions.

    Sets ``services.log_ids``. Raises ``WorkerError`` naming the partition when the stored
    offsets belong to another log, unless ``config.reset_on_new_log`` (then the partition is
    reset in the store and read from offset 0).
    """
    topic = services.topics.interactions
    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    log_id = log_identity(config.bootstrap_servers, topic, config.timeout_s)
    ends = end_offsets(config.bootstrap_servers, topic, config.timeout_s)
    plan: dict[int, int] = {}
    for partition in wanted:
        end = ends.get(partition, 0)
        try:
            offset = services.store.resume_offset(topic, partition, log_id, end)
        except LogMismatchError as exc:
            if not config.reset_on_new_log:
                raise WorkerError(
                    f"{exc}; refusing to skip the new log's events. Pass --reset-on-new-log "
                    f"to consume partition {topic}[{partition}] from its start"
                ) from exc
            log.warning("%s; --reset-on-new-log: consuming %s[%d] from its start",
                        exc, topic, partition)
            services.store.reset_partition(topic, partition)
            offset = None
        services.log_ids[partition] = log_id
        plan[partition] = 0 if offset is None else offset
    log.info("%s: resuming partitions at %s (log %s, end offsets %s)", topic, plan, log_id,
             {p: ends.get(p) for p in wanted})
    return plan


def _records(events: Sequence[faust.EventT]) -> list[Record]:
    return [
        Record(e.message.partition, e.message.offset, e.message.key, e.message.value)
        for e in events
    ]


def _fatal(message: str) -> None:
    """Log ``message`` and end the process at once with ``EXIT_LOG_CHANGED``: continuing would
    apply events against the wrong offsets, and faust's crash path does not exit non-zero."""
    log.critical("%s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_LOG_CHANGED)


def _install_store_seek(app: faust.App, services: WorkerServices, config: WorkerConfig) -> None:
    """After each of faust's seeks to committed offsets, seek the assigned ``interactions``
    partitions to the store's offsets (see the module docstring)."""
    consumer = app.consumer
    seek_to_committed = consumer.perform_seek
    topic = services.topics.interactions

    async def perform_seek() -> None:
        await seek_to_committed()
        assigned = [tp for tp in consumer.assignment() if tp.topic == topic]
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(
                None, plan_resume, services, config, [tp.partition for tp in assigned]
            )
        except WorkerError as exc:
            _fatal(str(exc))
            return
        for tp in assigned:
            await consumer.seek(tp, plan[tp.partition])

    async def forget_revoked(sender: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        """A revoked partition's log must be checked again before anything of it is applied
        (after a broker restart, the same partition may come back from another log)."""
        for tp in revoked:
            if tp.topic == topic:
                services.log_ids.pop(tp.partition, None)
                services.metrics.forget_partition(topic, tp.partition)

    consumer.perform_seek = perform_seek  # type: ignore[method-assign]
    app.on_partitions_revoked.connect(forget_revoked)


def _install_lag_timer(app: faust.App, services: WorkerServices, config: WorkerConfig) -> None:
    """Every ``lag_interval_s``, set the consumer lag of each assigned ``interactions``
    partition: its high water (as of the consumer's last fetch: no broker request) minus the
    next offset to apply (the store's). Partitions not fetched yet are left out."""
    topic = services.topics.interactions

    @app.timer(config.lag_interval_s, name="unirec_consumer_lag")
    async def consumer_lag() -> None:
        consumer = app.consumer
        try:
            assigned = consumer.assignment()
        except Exception:  # the consumer is not started yet
            return
        for tp in assigned:
            if tp.topic != topic:
                continue
            try:
                end = consumer.highwater(tp)
            except Exception:  # no fetch yet (or rebalancing): nothing to report
                continue
            if end is None:
                continue
            stored = services.store.offset(topic, tp.partition)
            services.metrics.set_lag(topic, tp.partition,
                                     end - (0 if stored is None else stored.next_offset))


def build_app(services: WorkerServices, config: WorkerConfig,
              executors: list[ThreadPoolExecutor] | None = None) -> faust.App:
    """The faust app with the three agents; each agent's thread is appended to ``executors``
    (shut them down, waiting, before closing the store)."""
    app = faust.App(
        config.group_id,
        broker=f"kafka://{config.bootstrap_servers}",
        web_port=config.web_port,
        web_bind=config.web_bind,
        web_enabled=True,
        datadir=str(config.store_dir.parent / f"{config.store_dir.name}-faust"),
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=config.rebalance_timeout_s,
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=config.heartbeat_interval_s,
        topic_allow_declare=False,
        topic_disable_leader=True,
        **config.extra,
    )
    names = services.topics
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw"}
    within = timedelta(seconds=config.batch_within_s)
    n = config.batch_size

    def agent(topic: str, handle: Callable[[WorkerServices, list[Record]], object]) -> None:
        """An agent over ``topic`` whose batches run, in order, on a thread of its own: the
        event loop (heartbeats, fetches, the other agents) is never blocked by torch."""
        executor = ThreadPoolExecutor(  # torch's thread count is per OpenMP thread: set it
            max_workers=1, thread_name_prefix=f"agent-{topic}",
            initializer=torch.set_num_threads, initargs=(config.torch_threads,),
        )
        if executors is not None:
            executors.append(executor)

        async def process(stream: faust.StreamT) -> None:
            loop = asyncio.get_running_loop()
            async for events in stream.take_events(n, within=within):
                await loop.run_in_executor(executor, handle, services, _records(events))

        app.agent(app.topic(topic, **raw), name=topic)(process)

    agent(names.interactions, handle_interactions)
    agent(names.impressions, handle_impressions)
    agent(names.labels, handle_labels)
    _install_store_seek(app, services, config)
    _install_lag_timer(app, services, config)
    return app


Hook = Callable[[faust.App, WorkerServices], None]


def run_worker(config: WorkerConfig, hooks: Sequence[Hook] = (),
               metrics: WorkerMetrics | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the exit status.

    ``metrics``: what the handlers count into (default: a new one); pass the one a hook
    serves (e.g. ``stream.http_api.views_hook(metrics)``).

    Raises ``WorkerError`` when it cannot start (no checkpoint, a store of another model, a
    partition whose stored offsets belong to another log without ``reset_on_new_log``).
    """
    torch.set_num_threads(config.torch_threads)
    if not config.checkpoint.is_file():
        raise WorkerError(f"no checkpoint at {config.checkpoint} (train a model first, e.g. "
                          "`unirec train`, or pass --checkpoint)")
    log.info("unirec worker config: %s", {k: str(v) for k, v in asdict(config).items()})
    topics = config.topics
    ensure_topics(config.bootstrap_servers, config.partitions, topics=topics,
                  timeout_s=config.timeout_s)
    services = build_services(config, metrics)
    executors: list[ThreadPoolExecutor] = []
    try:
        # Fail fast, before joining the group, on every partition this store has applied.
        stored = [p for (t, p) in services.store.offsets() if t == topics.interactions]
        plan_resume(services, config, stored)
        app = build_app(services, config, executors)
        for hook in hooks:
            hook(app, services)
        worker = faust.Worker(app, loglevel=logging.getLevelName(logging.root.level),
                              quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
            return code
        return 0
    finally:
        for executor in executors:  # let a batch being applied finish before closing
            executor.shutdown(wait=True, cancel_futures=True)
        log.info("worker stopping: %s", services.summary())
        services.producer.close(timeout=config.timeout_s)
        services.store.close()
