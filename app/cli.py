"""The ``unirec`` command line: each command parses flags, builds objects, calls one function.

    unirec train (--dataset movielens-100k | --events FILE) [--size default|suite] [--epochs N]
                 [--max-steps N] ...
    unirec eval  (--dataset movielens-100k | --events FILE) [--checkpoint PATH] [--json]
    unirec eval-suite [--dataset NAME | --events FILE] [--json] [--tune] [--seeds N] [--steps N]
                 [--no-peers]
                 the baselines, ablations, prequential and River peers -> reports/<data set>.md
    unirec demo [--events N] [--no-train] [--retrain] [--size suite|default]   the whole loop
                 on one machine: embedded broker, worker, monitor, MovieLens replay, a summary
    unirec produce (--dataset NAME | --events FILE | --synthetic N) [--bootstrap-servers HOST:PORT]
                 [--rate R] [--limit N] [--negatives K] [--label-delay S] [--partitions P]
    unirec worker [--bootstrap-servers HOST:PORT] [--checkpoint PATH] [--store DIR]
                 [--partitions P] [--batch-size N] [--batch-within S] [--web-port PORT]
                 [--reset-on-new-log]       (serves the HTTP API on 127.0.0.1:PORT)
                 [--no-train] [--versions-dir DIR] [--checkpoint-every N]
                 [--static-checkpoint PATH] [--drift-threshold D]
    unirec state USER_ID [--api URL | --store DIR]   a user's state snapshot as JSON
    unirec monitor [--bootstrap-servers HOST:PORT] [--web-port PORT] [--app-id ID | --fresh]
                 the fleet monitor: windows of feedback from every worker (faust app)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.experiment import Budget
from evaluation.quickstart import evaluate_on_log, train_on_log
from evaluation.sizes import SIZE_NAMES, model_size
from eventlog.generic import GenericFormatError
from eventlog.loaders import DATASETS, EventLog, load_dataset, load_events
from eventlog.movielens import DatasetUnavailable
from model.baselines import MODEL_KINDS
from model.checkpoint import CheckpointError, load, save
from model.config import ModelConfig
from model.item_rates import DEFAULT_SMOOTHING
from model.online import OnlineConfig
from model.training import TrainConfig
from stream.admission import RecordLimits
from stream.config import Settings, SettingsError
from stream.gate import IDLE_GRACE_S
from stream.kafka_client import KafkaSecurityError
from stream.producer import (
    ProduceError,
    ReplayStats,
    open_producer,
    replay_events,
    synthetic_events,
)
from stream.topics import BrokerUnavailable, TopicError, TopicNames, ensure_topics

log = logging.getLogger("unirec")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=sorted(DATASETS), help="a named data set")
    source.add_argument("--events", type=Path, help="an event file in the generic format")
    parser.add_argument("--data-dir", type=Path, help="data cache (env UNIREC_DATA_DIR)")
    parser.add_argument("--device", help="auto, cpu or cuda (env UNIREC_DEVICE)")
    parser.add_argument("--checkpoint", type=Path, help="default: runs/<data set>/model.pt")
    parser.add_argument("--train-fraction", type=float, default=0.8)


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--size", choices=SIZE_NAMES, default="default",
                        help="the model's config and learning rate (evaluation.sizes)")
    parser.add_argument("--lr", type=float, help="default: the size's")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--d-model", type=int, help="default: the size's")
    parser.add_argument("--history-len", type=int, help="default: the size's")
    parser.add_argument("--affinity-len", type=int,
                        help="the newest events the candidates' affinity is counted over, at "
                             "least --history-len (default: the size's)")
    parser.add_argument("--model", choices=list(MODEL_KINDS), default="unirec")
    parser.add_argument("--item-rate-smoothing", type=float, default=DEFAULT_SMOOTHING,
                        help="give candidates their training label rate, smoothed by this many "
                             "pseudo-events (model.item_rates; 0: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unirec", description="unirec-stream: a streaming, online-learning recommender"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: our INFO logs; -vv: our DEBUG and the libraries' INFO logs "
                             "(default: warnings only, but INFO for worker and trainer)")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train on the first part of a time-ordered log")
    _add_data_flags(train)
    _add_train_flags(train)
    evaluate = commands.add_parser("eval", help="AUC, GAUC and LogLoss on the later part")
    _add_data_flags(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    demo = commands.add_parser(
        "demo", help="the whole loop on one machine: embedded broker, worker, MovieLens replay")
    demo.add_argument("--events", type=int, help="held-out events to replay (default: all)")
    demo.add_argument("--rate", type=float, help="events/s of the replay (default: max)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--size", choices=SIZE_NAMES, default="suite",
                      help="the model trained when there is none yet (evaluation.sizes)")
    demo.add_argument("--train-steps", type=int,
                      help="steps of that training run (default: the size's)")
    demo.add_argument("--retrain", action="store_true", help="train even if a model exists")
    demo.add_argument("--no-train", action="store_true",
                      help="learning off: the worker serves the checkpoint frozen, and the "
                      "summary adds `unirec eval` on the same events for comparison")
    demo.add_argument("--partitions", type=int, default=4)
    demo.add_argument("--web-port", type=int, default=0, help="HTTP API port (default: free)")
    demo.add_argument("--data-dir", type=Path, help="env UNIREC_DATA_DIR")
    demo.add_argument("--device", help="auto, cpu or cuda (env UNIREC_DEVICE)")
    _add_suite_parser(commands)
    _add_produce_parser(commands)
    _add_worker_parser(commands)
    _add_state_parser(commands)
    _add_monitor_parser(commands)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    if getattr(args, "data_dir", None):
        settings = replace(settings, data_dir=args.data_dir)
    if getattr(args, "device", None):
        settings = replace(settings, device=args.device)
    return settings


def _open_log(args: argparse.Namespace, settings: Settings) -> EventLog:
    try:
        if args.events is not None:
            return load_events(args.events)
        return load_dataset(args.dataset, settings.data_dir)
    except (DatasetUnavailable, GenericFormatError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc


def _progress(total_hint: str) -> tuple[tqdm, object]:
    bar = tqdm(desc=total_hint, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    return bar, on_step


def _check_item_rate_smoothing(smoothing: float) -> None:
    """CliError unless ``--item-rate-smoothing`` is >= 0 and finite."""
    if not 0 <= smoothing < math.inf:
        raise CliError(f"--item-rate-smoothing must be >= 0 and finite, not {smoothing}")


def _model_config_error(exc: ValueError) -> CliError:
    """The error of a model config that the size flags made invalid (``ModelConfig``'s)."""
    return CliError(f"--d-model / --history-len / --affinity-len: {exc}")


def _train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of ``_add_train_flags``: the size's, with the flags
    given on top; CliError for a count that is not positive or a rate that is not positive
    and finite."""
    counts = {"--epochs": args.epochs, "--max-steps": args.max_steps,
              "--batch-size": args.batch_size, "--d-model": args.d_model,
              "--history-len": args.history_len, "--affinity-len": args.affinity_len}
    bad = [flag for flag, value in counts.items() if value is not None and value < 1]
    if bad:
        raise CliError(f"{', '.join(bad)} must be positive")
    if args.lr is not None and not 0 < args.lr < math.inf:
        raise CliError(f"--lr must be positive and finite, not {args.lr}")
    _check_item_rate_smoothing(args.item_rate_smoothing)
    size = model_size(args.size)
    try:
        model_cfg = replace(size.config, **{
            name: value for name, value in (("d_model", args.d_model),
                                            ("history_len", args.history_len),
                                            ("affinity_len", args.affinity_len))
            if value is not None
        })
    except ValueError as exc:
        raise _model_config_error(exc) from exc
    train_cfg = TrainConfig(
        lr=size.lr if args.lr is None else args.lr, batch_size=args.batch_size,
        epochs=args.epochs, max_steps=args.max_steps, seed=args.seed,
    )
    return model_cfg, train_cfg


def _train(args: argparse.Namespace, settings: Settings, event_log: EventLog,
           stop: threading.Event | None = None) -> dict | None:
    """Train and save the checkpoint; returns its summary, or None (nothing saved) when
    ``stop`` was set during training."""
    model_cfg, train_cfg = _train_configs(args)
    bar, show = _progress("training")

    def on_step(step: int, total: int, loss: float) -> bool:
        show(step, total, loss)
        return stop is not None and stop.is_set()

    with bar:
        model, meta = train_on_log(
            event_log, model_cfg, train_cfg, settings.torch_device(), args.train_fraction, on_step,
            args.model, args.item_rate_smoothing,
        )
    if stop is not None and stop.is_set():
        return None
    path = args.checkpoint or settings.checkpoint_path(event_log.name)
    save(model, path, meta)
    log.info("saved %s (%d parameters, %d steps)", path, meta["parameters"], meta["steps"])
    return {**meta, "checkpoint": str(path)}


def _evaluate(args: argparse.Namespace, settings: Settings, event_log: EventLog) -> dict:
    path = args.checkpoint or settings.checkpoint_path(event_log.name)
    device = settings.torch_device()
    try:
        model, meta = load(path, device, kind=None, kinds=MODEL_KINDS)
    except CheckpointError as exc:
        raise CliError(f"{exc} (run `unirec train` first or pass --checkpoint)") from exc
    if meta.get("dataset") not in (None, event_log.name):
        raise CliError(f"{path} was trained on {meta['dataset']!r}, not {event_log.name!r}")
    fraction = meta.get("train_fraction", args.train_fraction)
    return evaluate_on_log(model, event_log, device, fraction)


def run_train(args: argparse.Namespace) -> None:
    settings = _settings(args)
    summary = _train(args, settings, _open_log(args, settings))
    print(json.dumps(summary, indent=2))


def run_eval(args: argparse.Namespace) -> None:
    settings = _settings(args)
    metrics = _evaluate(args, settings, _open_log(args, settings))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"AUC {metrics['auc']:.4f}  GAUC {metrics['gauc']:.4f}  "
            f"LogLoss {metrics['logloss']:.4f}  on {metrics['n']} test examples"
        )


def run_demo(args: argparse.Namespace) -> None:
    from app.demo import DemoConfig, DemoError
    from app.demo import run_demo as run
    from stream.broker import BrokerStartError

    if any(value is not None and value <= 0
           for value in (args.events, args.rate, args.train_steps)):
        raise CliError("--events, --rate and --train-steps must be positive")
    steps = model_size(args.size).steps if args.train_steps is None else args.train_steps
    argv = ["train", "--dataset", "movielens-100k", "--size", args.size,
            "--max-steps", str(steps)]
    for flag in ("data_dir", "device"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    train_args = build_parser().parse_args(argv)
    settings = _settings(train_args)
    event_log = _open_log(train_args, settings)
    checkpoint = settings.checkpoint_path(event_log.name)
    train = None
    if args.retrain or not checkpoint.is_file():
        print(f"unirec demo: no model at {checkpoint}; training on the first 80% of "
              f"{event_log.name} ({args.size} size, {steps} steps) while the history streams into "
              "the broker", file=sys.stderr)

        def train(stop: threading.Event) -> bool:
            return _train(train_args, settings, event_log, stop) is not None
    config = DemoConfig(
        run_dir=settings.run_dir, checkpoint=checkpoint, data_dir=settings.data_dir,
        events=args.events, rate=args.rate, partitions=args.partitions,
        web_port=args.web_port, device=settings.torch_device().type,
        learning=not args.no_train,
    )
    try:
        code = run(config, event_log, args.json, train)
    except (DemoError, BrokerStartError, BrokerUnavailable, TopicError) as exc:
        raise CliError(str(exc).splitlines()[0]) from exc
    if code:
        sys.exit(code)


def _add_suite_parser(commands: argparse._SubParsersAction) -> None:
    defaults = Budget()
    suite = commands.add_parser("eval-suite", help="baselines, ablations, prequential: report")
    source = suite.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=sorted(DATASETS), default="movielens-100k")
    source.add_argument("--events", type=Path, help="an event file in the generic format")
    suite.add_argument("--data-dir", type=Path, help="data cache (env UNIREC_DATA_DIR)")
    suite.add_argument("--device", help="auto, cpu or cuda (env UNIREC_DEVICE)")
    suite.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    suite.add_argument("--json", action="store_true", help="print the record as JSON")
    suite.add_argument("--tune", action="store_true", help="rerun the lr x dropout grid first")
    suite.add_argument("--seeds", type=int, default=defaults.seeds)
    suite.add_argument("--steps", type=int, default=defaults.steps)
    suite.add_argument("--tune-steps", type=int, help="steps of a tuning run (default --steps)")
    suite.add_argument("--d-model", type=int, default=defaults.d_model)
    suite.add_argument("--history-len", type=int, default=defaults.history_len)
    suite.add_argument("--affinity-len", type=int, default=defaults.affinity_len,
                       help="the candidates' affinity window, at least --history-len "
                            "(default: %(default)s)")
    suite.add_argument("--batch-size", type=int, default=defaults.batch_size)
    suite.add_argument("--torch-threads", type=int, default=1)
    suite.add_argument("--item-rate-smoothing", type=float,
                       default=defaults.item_rate_smoothing,
                       help="every model's item-rate features (model.item_rates; 0: off)")
    suite.add_argument("--no-peers", action="store_true",
                       help="skip the online River peers (the [peers] extra)")


def run_eval_suite(args: argparse.Namespace) -> None:
    from evaluation.suite import run_suite  # matplotlib: loaded only for this command

    if min(args.seeds, args.steps, args.d_model, args.history_len, args.batch_size) < 1:
        raise CliError("--seeds, --steps, --d-model, --history-len, --batch-size must be >= 1")
    _check_item_rate_smoothing(args.item_rate_smoothing)
    budget = Budget(d_model=args.d_model, history_len=args.history_len,
                    affinity_len=args.affinity_len,
                    core_k=min(Budget.core_k, args.history_len), steps=args.steps,
                    batch_size=args.batch_size, seeds=args.seeds, tune_steps=args.tune_steps,
                    item_rate_smoothing=args.item_rate_smoothing)
    try:
        budget.model_config(dropout=0.0)
    except ValueError as exc:
        raise _model_config_error(exc) from exc
    settings = _settings(args)
    event_log = _open_log(args, settings)
    torch.set_num_threads(args.torch_threads)
    bar = tqdm(desc="eval-suite", unit="run", file=sys.stderr, dynamic_ncols=True)

    def on_run(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix_str(label, refresh=False)

    with bar:
        try:
            record = run_suite(event_log, budget, args.out, settings.torch_device(), args.tune,
                               on_run, peers=not args.no_peers)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(record))
    else:
        print(f"wrote {args.out / event_log.name}.md/.png/.json "
              f"in {record['wall_seconds'] / 60:.1f} min")


def _add_produce_parser(commands: argparse._SubParsersAction) -> None:
    produce = commands.add_parser("produce", help="replay events onto the Kafka topics")
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=sorted(DATASETS), help="a named data set")
    source.add_argument("--events", type=Path, help="an event file in the generic format")
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated events")
    produce.add_argument("--data-dir", type=Path, help="data cache (env UNIREC_DATA_DIR)")
    produce.add_argument("--bootstrap-servers", help="env KAFKA_BOOTSTRAP_SERVERS")
    produce.add_argument("--rate", type=float, help="interactions per second (default: max)")
    produce.add_argument("--limit", type=int, help="stop after N interactions")
    produce.add_argument("--negatives", type=int, default=9, help="negatives per impression")
    produce.add_argument("--label-delay", type=float, default=0.0, help="seconds")
    produce.add_argument("--partitions", type=int, default=4, help="for topics it creates")
    produce.add_argument("--topic-prefix", default="", help="prefix of every topic name")
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument("--timeout", type=float, default=10.0, help="broker timeout, seconds")


def _check_produce_args(args: argparse.Namespace) -> None:
    checks = [
        (args.rate is None or args.rate > 0, "--rate must be > 0"),
        (args.limit is None or args.limit >= 1, "--limit must be >= 1"),
        (args.synthetic is None or args.synthetic >= 1, "--synthetic must be >= 1"),
        (args.negatives >= 0, "--negatives must be >= 0"),
        (args.label_delay >= 0, "--label-delay must be >= 0"),
        (args.partitions >= 1, "--partitions must be >= 1"),
        (args.timeout > 0, "--timeout must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise CliError(message)


def run_produce(args: argparse.Namespace) -> None:
    _check_produce_args(args)
    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise CliError("no broker: pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS")
    if args.synthetic is not None:
        source, total = f"synthetic-{args.synthetic}", args.synthetic
        events = synthetic_events(args.synthetic, seed=args.seed)
    else:
        event_log = _open_log(args, _settings(args))
        source, total = event_log.name, len(event_log)
        events = zip(event_log.interactions, event_log.labels.tolist(), strict=True)
    topics = TopicNames.with_prefix(args.topic_prefix)
    if not args.verbose:  # kafka-python logs every refused connection; the error says it once
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        counts = ensure_topics(bootstrap, args.partitions, topics=topics,
                               timeout_s=args.timeout)
        producer = open_producer(bootstrap, args.timeout)
        bar = tqdm(desc=f"producing {source}", total=min(total, args.limit or total),
                   unit="ev", file=sys.stderr, dynamic_ncols=True)

        def on_progress(stats: ReplayStats) -> None:
            bar.update(stats.interactions - bar.n)

        with bar:
            try:
                stats = replay_events(events, bootstrap, topics, args.rate, args.limit,
                                      args.negatives, args.label_delay, args.seed,
                                      on_progress, producer)
            finally:
                producer.close(timeout=args.timeout)
    except (BrokerUnavailable, TopicError, ProduceError) as exc:
        raise CliError(str(exc).splitlines()[0]) from exc
    summary = {"source": source, "bootstrap_servers": bootstrap, "topics": counts,
               **stats.as_dict()}
    print(json.dumps(summary, indent=2))


def _add_worker_parser(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="consume the topics: apply, score, join")
    _add_consumer_flags(worker, group="unirec-worker", port=6066, store="state")
    worker.add_argument("--no-train", action="store_true",
                        help="do not fine-tune here (another process publishes versions)")
    _add_learning_flags(worker)
    trainer = commands.add_parser(
        "trainer", help="fine-tune from the stream in a process of its own and publish model "
                        "versions (workers run with --no-train and the same --versions-dir)")
    _add_consumer_flags(trainer, group="unirec-trainer", port=6067, store="trainer-state")
    _add_learning_flags(trainer)


def _add_consumer_flags(parser: argparse.ArgumentParser, group: str, port: int, store: str
                        ) -> None:
    """The flags ``worker`` and ``trainer`` share (both run ``stream.worker.run_worker``)."""
    parser.set_defaults(default_store=store)
    parser.add_argument("--bootstrap-servers", help="env KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: runs/movielens-100k/model.pt)")
    parser.add_argument("--data-dir", type=Path, help="env UNIREC_DATA_DIR")
    parser.add_argument("--store", type=Path, help=f"state store (default: <data dir>/{store})")
    parser.add_argument("--device", help="auto, cpu or cuda (env UNIREC_DEVICE)")
    parser.add_argument("--partitions", type=int, default=4, help="for topics it creates")
    parser.add_argument("--batch-size", type=int, default=256, help="events per micro-batch")
    parser.add_argument("--batch-within", type=float, default=0.05,
                        help="seconds to wait filling a micro-batch")
    parser.add_argument("--web-port", type=int, default=port, help="HTTP API port")
    parser.add_argument("--web-bind", help="HTTP API address (env UNIREC_WEB_BIND, default "
                        "127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--advertised-url", help="this API's URL as the other workers and "
                        "`unirec state --api` reach it, for redirects to a partition's owner "
                        "(env UNIREC_ADVERTISED_URL; default http://BIND:PORT, the host name "
                        "for 0.0.0.0)")
    parser.add_argument("--api-token", help="bearer token every HTTP endpoint but /healthz "
                        "requires (env UNIREC_API_TOKEN, preferred: a flag shows in ps)")
    parser.add_argument("--stall-after", type=float, default=30.0,
                        help="/healthz answers 503 after this many seconds without a loop pass")
    parser.add_argument("--group-id", default=group)
    parser.add_argument("--topic-prefix", default="", help="prefix of every topic name")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--quantize", choices=("none", "w8a16"), default="none",
                        help="w8a16: score with int8 weights and bf16 activations (UG-Sep)")
    parser.add_argument("--timeout", type=float, default=10.0, help="broker timeout, seconds")
    parser.add_argument("--idle-grace", type=float, default=IDLE_GRACE_S,
                        help="seconds after a record's arrival at which a topic with nothing to "
                             "read (asked of the broker) lets it pass the event-time merge "
                             "(covers a producer delivering one topic later than another; "
                             "adds that latency where a topic is idle)")
    parser.add_argument("--feedback-window", type=float, default=3600.0,
                        help="seconds of stream time (broker time) an impression waits for "
                             "its labels")
    _add_limit_flags(parser)
    parser.add_argument("--profiles", choices=sorted(DATASETS),
                        help="score with the user profiles of this data set")
    parser.add_argument("--reset-on-new-log", action="store_true",
                        help="consume a changed log (new broker, recreated topic) from its start")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The ``RecordLimits`` flags (``stream.admission``): records past them are dead letters."""
    limits = RecordLimits()
    parser.add_argument("--max-record-bytes", type=int, default=limits.max_record_bytes,
                        help="largest record value accepted")
    parser.add_argument("--max-id-bytes", type=int, default=limits.max_id_bytes,
                        help="longest id (user, item, event, request, action), UTF-8 bytes")
    parser.add_argument("--max-candidates", type=int, default=limits.max_candidates,
                        help="most candidates an impression may carry")
    parser.add_argument("--max-event-ahead", type=float, default=limits.max_event_ahead_s,
                        help="seconds an event time may be after its record's broker time")
    parser.add_argument("--max-event-age", type=float, default=limits.max_event_age_s,
                        help="seconds an event time may be before its record's broker time "
                             "(default: any, so that old logs can be replayed)")


def _record_limits(args: argparse.Namespace) -> RecordLimits:
    """The ``RecordLimits`` of ``_add_limit_flags``; ``CliError`` if they are not valid."""
    try:
        return RecordLimits(max_record_bytes=args.max_record_bytes,
                            max_id_bytes=args.max_id_bytes, max_candidates=args.max_candidates,
                            max_event_ahead_s=args.max_event_ahead,
                            max_event_age_s=args.max_event_age)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _add_learning_flags(parser: argparse.ArgumentParser) -> None:
    """Online learning and drift flags shared by ``worker`` and ``trainer``."""
    online = OnlineConfig()
    parser.add_argument("--versions-dir", type=Path,
                        help="model versions directory (default: <store>-versions)")
    parser.add_argument("--checkpoint-every", type=int, default=online.checkpoint_every,
                        help="accepted online steps between two published model versions")
    parser.add_argument("--train-batch-size", type=int, default=online.batch_size)
    parser.add_argument("--train-lr", type=float, default=online.lr)
    parser.add_argument("--train-embedding-lr", type=float, default=online.embedding_lr,
                        help="learning rate of the embedding table's rows "
                             "(default: %(default)s; unset: --train-lr)")
    parser.add_argument("--no-student", action="store_true",
                        help="do not train the static student (no imitation loss)")
    parser.add_argument("--static-checkpoint", type=Path,
                        help="the static twin's checkpoint (default: the --checkpoint model)")
    parser.add_argument("--drift-threshold", type=float,
                        help="alert when the surrogate distance D_1000 exceeds this")


def _learning_config(args: argparse.Namespace) -> dict:
    """The ``WorkerConfig`` fields of ``_add_learning_flags``."""
    from stream.drift_tracker import DriftConfig
    from stream.learner import LearnerConfig

    if args.checkpoint_every < 1 or args.train_batch_size < 1:
        raise CliError("--checkpoint-every and --train-batch-size must be positive")
    rates = (args.train_lr, args.train_embedding_lr)
    if not all(0 < rate < math.inf for rate in rates if rate is not None):
        raise CliError("--train-lr and --train-embedding-lr must be positive and finite")
    online = OnlineConfig(lr=args.train_lr, embedding_lr=args.train_embedding_lr,
                          batch_size=args.train_batch_size, checkpoint_every=args.checkpoint_every)
    return {
        "versions_dir": args.versions_dir,
        "static_checkpoint": args.static_checkpoint,
        "learner": LearnerConfig(online=online, student=not args.no_student),
        "drift": DriftConfig(threshold=args.drift_threshold),
    }


def run_worker_command(args: argparse.Namespace) -> None:
    from stream.http_api import ApiToken
    from stream.metrics import WorkerMetrics
    from stream.worker import WorkerConfig, WorkerError, run_worker

    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise CliError("no broker: pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS")
    if (args.batch_size < 1 or args.batch_within <= 0 or args.partitions < 1
            or args.feedback_window <= 0 or args.stall_after <= 0):
        raise CliError("--batch-size, --batch-within, --partitions, --feedback-window and "
                       "--stall-after must be positive")
    if args.idle_grace < 0:
        raise CliError(f"--idle-grace must be >= 0 seconds, got {args.idle_grace}")
    settings = _settings(args)
    config = WorkerConfig(
        bootstrap_servers=bootstrap,
        store_dir=args.store or settings.data_dir / args.default_store,
        checkpoint=args.checkpoint or settings.checkpoint_path("movielens-100k"),
        device=settings.torch_device().type,
        partitions=args.partitions,
        batch_size=args.batch_size,
        batch_within_s=args.batch_within,
        web_port=args.web_port,
        web_bind=args.web_bind or os.environ.get("UNIREC_WEB_BIND") or "127.0.0.1",
        api_token=ApiToken.optional(args.api_token or os.environ.get("UNIREC_API_TOKEN")),
        stall_after_s=args.stall_after,
        advertised_url=args.advertised_url or os.environ.get("UNIREC_ADVERTISED_URL") or None,
        reset_on_new_log=args.reset_on_new_log,
        torch_threads=args.torch_threads,
        quantize=args.quantize,
        group_id=args.group_id,
        topic_prefix=args.topic_prefix,
        timeout_s=args.timeout,
        train=not getattr(args, "no_train", False),
        publish_scores=args.command == "worker",
        **_learning_config(args),
        profiles_dataset=args.profiles,
        data_dir=settings.data_dir,
        feedback_window_s=args.feedback_window,
        idle_grace_s=args.idle_grace,
        limits=_record_limits(args),
    )
    metrics = WorkerMetrics()  # one registry: the handlers count into it, /metrics renders it
    try:
        code = run_worker(config, metrics=metrics)
    except (WorkerError, BrokerUnavailable, TopicError) as exc:
        raise CliError(str(exc).splitlines()[0]) from exc
    if code:
        sys.exit(code)


def _add_state_parser(commands: argparse._SubParsersAction) -> None:
    state = commands.add_parser("state", help="print a user's state snapshot as JSON")
    state.add_argument("user_id")
    source = state.add_mutually_exclusive_group()
    source.add_argument("--api", help="a running worker's HTTP API, e.g. http://127.0.0.1:6066 "
                        "(sends env UNIREC_API_TOKEN as its bearer token when set; a worker that "
                        "does not own the user answers 421 with the owner's URL: followed)")
    source.add_argument("--store", type=Path,
                        help="a state store, opened read-only (default: <data dir>/state)")
    state.add_argument("--data-dir", type=Path, help="env UNIREC_DATA_DIR")


def run_state(args: argparse.Namespace) -> None:
    from state_store import StateStoreError
    from stream.http_api import ApiRequestError, UnknownUserError, state_snapshot

    store = None
    if args.api is None:
        store = args.store or _settings(args).data_dir / "state"
    try:
        snapshot = state_snapshot(args.user_id, api_url=args.api, store_dir=store,
                                  token=os.environ.get("UNIREC_API_TOKEN"))
    except (UnknownUserError, ApiRequestError, StateStoreError, ValueError) as exc:
        message = str(exc).strip()
        raise CliError(message.splitlines()[0] if message else type(exc).__name__) from exc
    print(json.dumps(snapshot, indent=2))


# --- unirec monitor (issue #14): the fleet monitor ----------------------------------------

def _add_monitor_parser(commands: argparse._SubParsersAction) -> None:
    from stream.monitor.app import MonitorConfig

    d = MonitorConfig(bootstrap="")
    monitor = commands.add_parser(
        "monitor", help="the fleet monitor: quality and drift windows over every worker's "
                        "feedback (faust app; web views /, /fleet/drift, /fleet/versions)")
    monitor.add_argument("--bootstrap-servers", help="env KAFKA_BOOTSTRAP_SERVERS")
    monitor.add_argument("--web-port", type=int, default=6068)
    monitor.add_argument("--web-bind", help="address of the web views (env UNIREC_WEB_BIND, "
                         "default 127.0.0.1; 0.0.0.0 in a container)")
    ident = monitor.add_mutually_exclusive_group()
    ident.add_argument("--app-id", default=d.app_id,
                       help="faust app id (consumer group, changelog topics)")
    ident.add_argument("--fresh", action="store_true",
                       help="a new app id per start: no changelog recovery, windows rebuilt "
                            "from feedback (the embedded broker's way)")
    monitor.add_argument("--data-dir", type=Path, help="faust's data directory "
                         "(default: <UNIREC_RUN_DIR>/monitor)")
    monitor.add_argument("--partitions", type=int, default=4, help="for topics it creates")
    monitor.add_argument("--topic-prefix", default="", help="prefix of every topic name")
    monitor.add_argument("--tumbling", type=float, default=d.tumbling_s, help="seconds")
    monitor.add_argument("--hopping", type=float, default=d.hopping_s, help="seconds")
    monitor.add_argument("--hop-step", type=float, default=d.hop_step_s, help="seconds")
    monitor.add_argument("--expires", type=float, default=d.expires_s,
                         help="seconds of event time a window is kept")
    monitor.add_argument("--distance-threshold", type=float, default=d.distance_threshold,
                         help="alert when the fleet's surrogate distance exceeds this")
    monitor.add_argument("--auc-gap-threshold", type=float, default=d.auc_gap_threshold,
                         help="alert when the twin's AUC exceeds the live model's by this")
    monitor.add_argument("--alert-min-count", type=int, default=d.alert_min_count)
    monitor.add_argument("--short-timeouts", action="store_true",
                         help="short group timeouts (rebalance 3 s, session 6 s, heartbeat 1 s): "
                              "for the embedded broker, not for production")


def run_monitor_command(args: argparse.Namespace) -> None:
    from stream.kafka_client import KafkaSecurity
    from stream.monitor import MonitorConfig, fresh_app_id, run_monitor

    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise CliError("no broker: pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS")
    if KafkaSecurity.from_env() != KafkaSecurity():
        raise CliError("unirec monitor speaks PLAINTEXT only so far (its faust consumer does "
                       "not take the KAFKA_SECURITY_* settings yet)")
    if min(args.tumbling, args.hopping, args.hop_step, args.expires, args.partitions) <= 0:
        raise CliError("--tumbling, --hopping, --hop-step, --expires and --partitions must be "
                       "positive")
    if args.hopping % args.hop_step or args.hopping < args.hop_step:
        raise CliError("--hopping must be a multiple of --hop-step")
    settings = _settings(args)
    config = MonitorConfig(
        bootstrap=bootstrap, topics=TopicNames.with_prefix(args.topic_prefix),
        app_id=fresh_app_id(args.app_id) if args.fresh else args.app_id,
        web_host=args.web_bind or os.environ.get("UNIREC_WEB_BIND") or "127.0.0.1",
        web_port=args.web_port, data_dir=args.data_dir or settings.run_dir / "monitor",
        partitions=args.partitions, tumbling_s=args.tumbling, hopping_s=args.hopping,
        hop_step_s=args.hop_step, expires_s=args.expires,
        distance_threshold=args.distance_threshold, auc_gap_threshold=args.auc_gap_threshold,
        alert_min_count=args.alert_min_count, short_timeouts=args.short_timeouts,
    )
    try:
        run_monitor(config)
    except (BrokerUnavailable, TopicError) as exc:
        raise CliError(str(exc).splitlines()[0]) from exc


COMMANDS = {"train": run_train, "eval": run_eval, "eval-suite": run_eval_suite, "demo": run_demo,
            "produce": run_produce, "worker": run_worker_command, "trainer": run_worker_command,
            "state": run_state, "monitor": run_monitor_command}


OUR_LOGGERS = frozenset({"unirec", "app", "stream", "model", "state_store", "eventlog",
                         "evaluation"})
SERVICES = frozenset({"worker", "trainer"})  # long-running: their lifecycle lines are the log


def configure_logging(verbose: int, command: str) -> None:
    """Quiet by default: warnings only, from our loggers and the libraries' (kafka-python,
    aiohttp...). ``-v``: our INFO; ``-vv``: our DEBUG and the libraries' INFO; ``-vvv``: all
    DEBUG. ``worker`` and ``trainer`` log our INFO without ``-v`` (a service's lifecycle:
    partitions assigned and resumed, versions published). Like ``logging.basicConfig``,
    nothing changes when the root logger already has handlers (an embedding application)."""
    root = logging.getLogger()
    if root.handlers:
        return
    ours = (logging.DEBUG if verbose >= 2
            else logging.INFO if verbose >= 1 or command in SERVICES else logging.WARNING)
    libraries = (logging.DEBUG if verbose >= 3
                 else logging.INFO if verbose >= 2 else logging.WARNING)

    def by_origin(record: logging.LogRecord) -> bool:
        is_ours = record.name.split(".", 1)[0] in OUR_LOGGERS
        return _level(record) >= (ours if is_ours else libraries)

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(by_origin)
    root.addHandler(handler)
    root.setLevel(min(ours, libraries))


def _level(record: logging.LogRecord) -> int:
    """The level a record is shown at: kafka-python's slow-task warning ("Task ... ran for
    0.2s ... blocking the event loop") counts as DEBUG. Its I/O thread shares the GIL with
    training and scoring threads, so a delayed step is expected here, not a stuck loop, and
    nothing a user can act on."""
    if record.name == "kafka.net.selector" and "blocking the event loop" in record.getMessage():
        return logging.DEBUG
    return record.levelno


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.command)
    try:
        COMMANDS[args.command](args)
    except (CliError, SettingsError, KafkaSecurityError) as exc:
        print(f"unirec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
