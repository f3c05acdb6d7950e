"""Online learning in the worker: the learner fine-tunes a copy and publishes versions, the
scorer hot-swaps them (scores carry the version), a NaN batch is refused while the old weights
keep serving, and after a planted preference shift the fine-tuned model's online AUC beats the
static twin's while the surrogate distance rises (in-process objects, no broker). Versions of
another model (state width, feature spec, config, kind) are refused by the hot swap and at
start, older versions are ignored, and each refusal is counted by reason. A worker
subprocess on the embedded broker: versions rise during a replay, POST /score hammered from
threads while versions swap answers every request 200, /drift and /metrics carry the drift
figures."""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import PROFILES, SPEC, T0, USERS, config, context, training_log
from stream_fixtures import WorkerProcess, http_get, read_all, tiny_checkpoint, wait_for

from eventlog.schema import Candidate, Impression, Label
from model.backbone import UniRecModel
from model.baselines import MODEL_KINDS
from model.checkpoint import save
from model.features import FeatureSpec
from model.kinds import build_model
from model.online import OnlineConfig, OnlineExample, OnlineTrainer
from model.scorer import Scorer
from model.signature import signature_of
from model.versions import VersionStore
from state_store import StateStore, StoreConfig
from stream import learner as learner_module
from stream.applier import InteractionApplier
from stream.broker import EmbeddedBroker
from stream.drift_tracker import DriftConfig, DriftTracker
from stream.handlers import WorkerServices
from stream.learner import LearnerConfig, OnlineLearner
from stream.metrics import WorkerMetrics
from stream.model_updates import HotSwap, ModelUpdate, UpdateListener, announce, starting_model
from stream.producer import open_producer, replay_events, synthetic_events
from stream.publisher import DiscardingPublisher, KafkaPublisher
from stream.serving import FeedbackWindow, ImpressionScorer, LabelBuffer, ScoredImpression
from stream.topics import TopicNames, ensure_topics
from stream.trainer_claim import RivalWatch, TrainerIdentity

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides: object):
    return config(**{"d_model": 16, "n_heads": 2, "n_layers": 2, "layer_widths": (1.0, 0.5),
                     "history_len": 8, **overrides})


def tiny_model(seed: int = 3) -> UniRecModel:
    torch.manual_seed(seed)
    return UniRecModel(tiny_config(), SPEC).eval()


INCOMPATIBLE = {  # reason: a model that differs from tiny_model() in that part
    "state_width": lambda: UniRecModel(tiny_config(d_model=32), SPEC).eval(),
    "feature_spec": lambda: UniRecModel(tiny_config(), replace(SPEC, id_buckets=4096)).eval(),
    "model_config": lambda: UniRecModel(tiny_config(core_k=2), SPEC).eval(),
    "model_kind": lambda: build_model("deepfm", tiny_config(), SPEC, MODEL_KINDS).eval(),
}


def preference_stream(seed: int, n: int, favourite: str) -> list[tuple[Impression, int]]:
    """``n`` one-candidate impressions of an action or comedy item; clicked with probability
    0.85 if its genre is ``favourite`` (every user alike), else 0.15."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        genre = "action" if rng.random() < 0.5 else "comedy"
        candidate = Candidate(f"{genre[0]}{int(rng.integers(10))}",
                              {"genre": [genre], "price": float(rng.uniform(1, 60))})
        impression = Impression(f"r{seed}-{k}", USERS[k % len(USERS)], T0 + 60.0 * k,
                                [candidate], context(rng))
        out.append((impression, int(rng.random() < (0.85 if genre == favourite else 0.15))))
    return out


class InProcessWorker:
    """The worker's scoring, joining, drift, learner and hot swap, driven by hand."""

    def __init__(self, tmp: Path, model: UniRecModel, online: OnlineConfig,
                 watch: RivalWatch | None = None,
                 send: Callable[[ModelUpdate], None] | None = None) -> None:
        self.store = StateStore.open(tmp / "store", StoreConfig(state_dim=16, history_len=8))
        self.metrics = WorkerMetrics()
        window = FeedbackWindow(1e9, 100_000)
        self.labels = LabelBuffer(window, 100_000)
        self.drift = DriftTracker(self.metrics, DriftConfig(windows=(256,)))
        scorer = ImpressionScorer(self.store, Scorer(model, CPU), 1, PROFILES,
                                  static=Scorer(copy.deepcopy(model), CPU))
        self.services = WorkerServices(
            store=self.store, scorer=scorer,
            applier=InteractionApplier.following(self.store, scorer.serving_model),
            labels=self.labels, publisher=DiscardingPublisher(), topics=TopicNames(),
            metrics=self.metrics, drift=self.drift)
        self.versions = VersionStore(tmp / "versions")
        self.updates: list[ModelUpdate] = []

        def announced(update: ModelUpdate) -> None:
            self.updates.append(update)
            if send is not None:
                send(update)

        self.learner = OnlineLearner(model, self.labels, self.versions, announced,
                                     self.metrics, LearnerConfig(online=online), self.drift,
                                     watch)
        self.hot_swap = HotSwap(self.services, self.versions, CPU)
        self.scored: list[ScoredImpression] = []

    def feed(self, chunk: list[tuple[Impression, int]]) -> None:
        """Score, join the labels, feed drift, one learner round, swap what was announced."""
        self.join(chunk)
        self.learner.round()
        self.hot_swap.offer(self.updates)

    def join(self, chunk: list[tuple[Impression, int]]) -> None:
        """Score, join the labels and feed drift: the learner's examples wait in the buffer."""
        scored = self.services.scorer.score_many([i for i, _ in chunk])
        self.scored += scored
        joined = []
        for item, (impression, label) in zip(scored, chunk, strict=True):
            self.services.labels.window.add(item, impression.ts)
            joined.append(self.labels.offer(Label(impression.request_id, impression.user_id,
                                                  impression.candidates[0].item_id, label,
                                                  impression.ts), impression.ts))
        self.drift.update([j for j in joined if j is not None])

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def pretrained_on_action() -> UniRecModel:
    """The deployed model: fine-tuned on an "action" stream, so the shift to "comedy" hurts."""
    trainer = OnlineTrainer(tiny_model(), OnlineConfig(batch_size=16, replay_fraction=0.25,
                                                       replay_capacity=256, lr=3e-3))
    trainer.add(OnlineExample(i, i.candidates[0], [], PROFILES[i.user_id], float(y))
                for i, y in preference_stream(7, 16 * 50, "action"))
    while trainer.step() is not None:
        pass
    return trainer.model.eval()


def test_preference_shift_fine_tuned_beats_the_twin_versions_rise_and_distance_rises(
        tmp_path: Path) -> None:
    """After deploy every user prefers comedy: the served (hot-swapped) model's online AUC
    beats the frozen twin's, D_T rises from 0, versions rise and each score carries the
    version that served it; the student's imitation loss is exported."""
    online = OnlineConfig(batch_size=16, replay_fraction=0.25, replay_capacity=256, lr=3e-3,
                          checkpoint_every=4)
    worker = InProcessWorker(tmp_path, pretrained_on_action(), online)
    stream = preference_stream(9, 768, "comedy")
    worker.feed(stream[:32])
    assert worker.drift.monitor.distance(256) == 0.0  # the twin is the served model
    for begin in range(32, len(stream), 32):
        worker.feed(stream[begin : begin + 32])
    report = worker.drift.report()["windows"]["256"]
    assert report["auc_dynamic"] > report["auc_static"] + 0.2, report
    assert report["distance"] > 0.1, report
    versions = [s.scores.model_version for s in worker.scored]
    assert versions == sorted(versions) and versions[-1] > 4, versions[-40:]
    assert worker.services.scorer.model_version == versions[-1] == worker.learner.version
    assert worker.services.applier.model_version == versions[-1]
    assert worker.sample("unirec_model_version") == versions[-1]
    assert worker.sample("unirec_train_steps_total") == worker.learner.trainer.steps
    assert worker.sample("unirec_online_auc", model="dynamic") == report["auc_dynamic"]
    assert worker.sample("unirec_surrogate_distance", window="256") == report["distance"]
    assert worker.sample("unirec_student_imitation_loss", window="256") is not None
    assert worker.sample("unirec_score_psi", window="256") == report["psi"]


def test_a_published_version_carries_the_labels_counted_and_its_scorer_reads_them(
        tmp_path: Path) -> None:
    """With item rates in the spec, the learner counts every joined label into the item-rate
    table: the version it publishes holds them in its spec's online table, swaps in under the
    serving signature, and the live scorer then reads the moved rates, while the static twin
    keeps the deployed table."""
    log = training_log()
    spec = FeatureSpec.fit(log, PROFILES.values(), id_buckets=512, field_buckets=64,
                           action_buckets=16, item_rate_smoothing=10.0,
                           labels=np.random.default_rng(2).integers(0, 2, len(log)))
    torch.manual_seed(3)
    model = UniRecModel(tiny_config(), spec).eval()
    online = OnlineConfig(batch_size=16, replay_fraction=0.25, checkpoint_every=2)
    worker = InProcessWorker(tmp_path, model, online)
    stream = preference_stream(9, 96, "comedy")
    for begin in range(0, len(stream), 32):
        worker.feed(stream[begin : begin + 32])
    scorer = worker.services.scorer
    assert worker.learner.version is not None
    assert scorer.model_version == worker.learner.version
    live = scorer.scorer
    served = live.model.spec
    counted_labels = worker.learner.examples
    assert served.online_counts()[1].sum() == counted_labels > 0
    assert served.online_counts()[0].sum() == sum(
        label for _, label in stream[:counted_labels])
    assert signature_of(live.model) == signature_of(model)
    assert scorer.static.model.spec == spec
    rows = live.featurizer.items([i.candidates[0] for i, _ in stream]).item
    assert not np.allclose(live.featurizer.item_rates(rows),
                           scorer.static.featurizer.item_rates(rows))


def test_a_stopped_learner_takes_no_step_so_a_backlog_does_not_hold_a_stopping_worker(
        tmp_path: Path) -> None:
    """Once the worker's stop is set, a round takes the waiting examples but trains on none of
    them and publishes nothing (a SIGTERM'd trainer had kept training through its backlog
    past the join's timeout, and died mid-step at exit); without the stop the same backlog
    trains."""
    online = OnlineConfig(batch_size=16, replay_fraction=0.0, checkpoint_every=1)
    worker = InProcessWorker(tmp_path, tiny_model(), online)
    worker.join(preference_stream(5, 64, "comedy"))
    stop = threading.Event()
    stop.set()
    assert worker.learner.round(stop) == 64
    assert worker.learner.trainer.steps == 0 and worker.updates == []
    worker.learner.round()
    assert worker.learner.trainer.steps == 4 and len(worker.updates) == 4


def test_the_live_model_trains_a_backlog_before_the_student_which_still_predicts_it_all(
        tmp_path: Path) -> None:
    """A backlog of 64 examples (4 batches): one round takes all 4 live steps and publishes
    4 versions, then one student step; the student has predicted all 64 (its imitation is
    recorded before it trains), and rounds with no new label train it on the rest."""
    online = OnlineConfig(batch_size=16, replay_fraction=0.0, checkpoint_every=1)
    worker = InProcessWorker(tmp_path, tiny_model(), online)
    worker.join(preference_stream(5, 64, "comedy"))
    learner = worker.learner
    assert learner.student is not None
    student = learner.student.trainer
    assert learner.round() == 64
    assert learner.trainer.steps == 4 and len(worker.updates) == 4
    assert student.steps == 1 and student.pending == 48 and learner.student_ready
    assert learner.student.imitation.n == 64
    assert worker.sample("unirec_train_backlog", model="student") == 48
    assert worker.sample("unirec_train_backlog", model="live") == 0
    while learner.student_ready:
        assert learner.round() == 0
    assert student.steps == 4 and student.pending == 0 and learner.trainer.steps == 4
    assert worker.sample("unirec_train_backlog", model="student") == 0
    assert worker.sample("unirec_train_examples_dropped_total", model="student") == 0


def test_a_nan_batch_is_refused_and_the_old_weights_keep_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Examples whose targets are NaN make a NaN loss: the step is refused and counted by
    reason, no version is published, and the scorer keeps the same model and weights."""
    online = OnlineConfig(batch_size=16, replay_fraction=0.0, checkpoint_every=1)
    model = tiny_model()
    worker = InProcessWorker(tmp_path, model, online)
    serving = worker.services.scorer.scorer.model
    before = {k: v.clone() for k, v in serving.state_dict().items()}

    def poisoned(joined):  # what a NaN-producing example batch gives the trainer
        e = learner_module.student_example(joined)
        return OnlineExample(e.impression, e.candidate, e.history, e.profile, float("nan"))

    monkeypatch.setattr(learner_module, "online_example", poisoned)
    worker.feed(preference_stream(3, 32, "comedy"))
    assert worker.learner.trainer.refused == 2 and worker.learner.trainer.steps == 0
    assert worker.sample("unirec_train_refused_total", reason="non-finite loss") == 2
    assert worker.updates == [] and worker.versions.versions() == []
    assert worker.services.scorer.scorer.model is serving
    assert worker.services.scorer.model_version == 1
    assert all(torch.equal(v, before[k]) for k, v in serving.state_dict().items())
    scored = worker.services.scorer.score(preference_stream(4, 1, "comedy")[0][0])
    assert scored.scores.model_version == 1 and np.isfinite(scored.dynamic).all()


def test_a_corrupt_version_is_skipped_and_the_old_model_keeps_serving(tmp_path: Path) -> None:
    model = tiny_model()
    worker = InProcessWorker(tmp_path, model, OnlineConfig())
    serving = worker.services.scorer.scorer
    worker.versions.path(2).write_bytes(b"not a checkpoint")
    assert worker.hot_swap.offer([ModelUpdate(2, "v2", 10, 0.0)]) is None
    assert worker.services.scorer.scorer is serving and worker.services.scorer.model_version == 1
    assert worker.sample("unirec_model_versions_skipped_total") == 1


@pytest.mark.parametrize("reason", list(INCOMPATIBLE))
def test_an_announced_version_of_another_model_is_refused_and_counted(
        tmp_path: Path, reason: str) -> None:
    """Version 2 in the versions directory is a readable checkpoint of another model: its
    announcement is refused with that reason (counted), the old scorer keeps serving and
    scoring; a compatible version 3 announced next is swapped in."""
    worker = InProcessWorker(tmp_path, tiny_model(), OnlineConfig())
    serving = worker.services.scorer.scorer
    save(INCOMPATIBLE[reason](), worker.versions.path(2), {"version": 2})
    assert worker.hot_swap.offer([ModelUpdate(2, "v2", 10, 0.0)]) is None
    assert worker.services.scorer.scorer is serving and worker.services.scorer.model_version == 1
    assert worker.services.applier.model_version == 1
    assert worker.sample("unirec_model_versions_refused_total", reason=reason) == 1
    scored = worker.services.scorer.score(preference_stream(4, 1, "comedy")[0][0])
    assert scored.scores.model_version == 1 and np.isfinite(scored.dynamic).all()
    worker.versions.publish(tiny_model(seed=5), at_least=3)
    assert worker.hot_swap.offer([ModelUpdate(3, "v3", 20, 0.0)]) == 3
    assert worker.services.scorer.model_version == 3


@pytest.mark.parametrize("reason", list(INCOMPATIBLE))
def test_swap_in_refuses_a_model_of_another_signature(tmp_path: Path, reason: str) -> None:
    """HotSwap.swap_in, handed a built model of another state width, spec, config or kind,
    refuses it (counted) instead of serving it."""
    worker = InProcessWorker(tmp_path, tiny_model(), OnlineConfig())
    serving = worker.services.scorer.scorer
    assert worker.hot_swap.swap_in(INCOMPATIBLE[reason](), 2) is False
    assert worker.services.scorer.scorer is serving and worker.services.scorer.model_version == 1
    assert worker.sample("unirec_model_versions_refused_total", reason=reason) == 1


def test_versions_only_move_forward(tmp_path: Path) -> None:
    """Serving version 4, announcements of versions 2 and 4 (both loadable) are ignored and
    counted as not newer, in a poll of their own or beside a newer one; the served version
    never decreases."""
    worker = InProcessWorker(tmp_path, tiny_model(), OnlineConfig())
    for seed in range(4):
        worker.versions.publish(tiny_model(seed=10 + seed))
    assert worker.hot_swap.offer([ModelUpdate(4, "v4", 40, 0.0)]) == 4
    serving = worker.services.scorer.scorer
    assert worker.hot_swap.offer([ModelUpdate(2, "v2", 20, 0.0)]) is None
    assert worker.hot_swap.offer([ModelUpdate(4, "v4", 40, 0.0)]) is None
    assert worker.services.scorer.scorer is serving and worker.services.scorer.model_version == 4
    assert worker.sample("unirec_model_versions_refused_total", reason="not_newer") == 2
    worker.versions.publish(tiny_model(seed=20))
    assert worker.hot_swap.offer([ModelUpdate(5, "v5", 50, 0.0),
                                  ModelUpdate(3, "v3", 30, 0.0)]) == 5
    assert worker.sample("unirec_model_versions_refused_total", reason="not_newer") == 3
    assert worker.hot_swap.swap_in(tiny_model(seed=30), 1) is False
    assert worker.services.scorer.model_version == 5


def test_starting_model_starts_from_the_newest_compatible_version(tmp_path: Path) -> None:
    """A versions directory whose newest versions are of another state width, another
    feature spec and unreadable: the worker starts from the newest compatible version (2),
    counting each refusal and the skip; a trainer with nothing compatible publishes the
    checkpoint above every number present."""
    checkpoint = tiny_model()
    versions = VersionStore(tmp_path / "versions")
    versions.publish(tiny_model(seed=1))
    compatible = tiny_model(seed=2)
    versions.publish(compatible)
    for reason in ("state_width", "feature_spec"):
        versions.publish(INCOMPATIBLE[reason]())
    versions.path(5).write_bytes(b"not a checkpoint")
    metrics = WorkerMetrics()
    model, version = starting_model(versions, checkpoint, 7, CPU, publish=False,
                                    metrics=metrics)
    assert version == 2
    assert all(torch.equal(v, compatible.state_dict()[k]) for k, v in model.state_dict().items())
    refused = "unirec_model_versions_refused_total"
    assert [metrics.registry.get_sample_value(refused, {"reason": r})
            for r in ("state_width", "feature_spec")] == [1, 1]
    assert metrics.registry.get_sample_value("unirec_model_versions_skipped_total") == 1

    other = VersionStore(tmp_path / "other")
    other.publish(INCOMPATIBLE["state_width"]())
    model, version = starting_model(other, checkpoint, 1, CPU, publish=True)
    assert model is checkpoint and version == 2 and other.versions() == [1, 2]


def test_outranking_goes_by_start_then_id_and_an_announcement_without_id_always_wins() -> None:
    """Of two trainers the one that started earlier keeps the topic (equal starts: the
    smaller id), both sides agree, a trainer never yields to itself, and an announcement
    without a trainer id (a trainer that cannot yield) outranks everyone."""
    elder, younger = TrainerIdentity("b" * 32, 100.0), TrainerIdentity("a" * 32, 101.0)
    twin = TrainerIdentity("c" * 32, 100.0)

    def by(who: TrainerIdentity) -> ModelUpdate:
        return ModelUpdate(1, "v1", 1, 0.0, who.trainer_id, who.started)

    assert younger.outranked_by(by(elder)) and not elder.outranked_by(by(younger))
    assert twin.outranked_by(by(elder)) and not elder.outranked_by(by(twin))
    assert not elder.outranked_by(by(elder))
    assert elder.outranked_by(ModelUpdate(1, "v1", 1, 0.0))


@pytest.mark.broker
def test_the_younger_of_two_trainers_on_one_topic_yields_and_the_elder_keeps_publishing(
        tmp_path: Path) -> None:
    """Two learners with their own versions directories announce on one model-updates topic
    (embedded broker). The younger published first, yet once the elder's announcements reach
    it, it refuses to publish (reason kept, counted, its rounds stop, nothing more written),
    while the elder keeps publishing, numbered above every version it saw announced."""
    online = OnlineConfig(batch_size=16, replay_fraction=0.0, checkpoint_every=1)
    topics = TopicNames.with_prefix("rival-")
    stream = preference_stream(5, 32 * 60, "comedy")
    chunks = iter(stream[i : i + 32] for i in range(0, len(stream), 32))
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, 1, topics=topics)
        publisher = KafkaPublisher(open_producer(bootstrap))

        def send(update: ModelUpdate) -> None:
            announce(publisher, topics.model_updates, update)

        def watch(identity: TrainerIdentity) -> RivalWatch:
            return RivalWatch(UpdateListener(bootstrap, topics.model_updates), identity)

        elder_id = TrainerIdentity.new()
        younger_id = TrainerIdentity(uuid.uuid4().hex, elder_id.started + 1.0)
        elder = InProcessWorker(tmp_path / "elder", tiny_model(), online, watch(elder_id), send)
        younger = InProcessWorker(tmp_path / "younger", tiny_model(), online,
                                  watch(younger_id), send)
        try:
            younger.feed(next(chunks))
            first = younger.learner.version
            assert first is not None and younger.learner.refused is None
            for chunk in chunks:  # the elder reads the younger's versions and passes them
                elder.feed(chunk)
                if (elder.learner.version or 0) > first and elder.learner.watch.newest >= first:
                    break
            assert elder.learner.watch.newest >= first
            for chunk in chunks:  # the younger reads the elder's announcements and yields
                younger.feed(chunk)
                if younger.learner.refused is not None:
                    break
            assert younger.learner.refused is not None and elder_id.trainer_id in \
                younger.learner.refused
            assert younger.sample("unirec_trainer_refused_total", reason="rival_trainer") == 1
            written, announced = younger.versions.versions(), len(younger.updates)
            before = elder.learner.version
            for _ in range(3):
                chunk = next(chunks)
                younger.feed(chunk)
                elder.feed(chunk)
            assert younger.versions.versions() == written and len(younger.updates) == announced
            assert younger.learner.round() == 0
            younger.learner.run(threading.Event())  # returns at once: it has yielded
            assert elder.learner.refused is None and elder.learner.version > before
            assert elder.sample("unirec_trainer_refused_total", reason="rival_trainer") is None
            assert [u.trainer for u in elder.updates] == [elder_id.trainer_id] * len(elder.updates)
        finally:
            for worker in (elder, younger):
                worker.learner.watch.close()
                worker.store.close()
            publisher.close()


# ------------------------------------------------------------------- a worker subprocess


def post_json(url: str, body: bytes) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            reply.read()
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def score_versions(bootstrap: str, topic: str) -> set[int]:
    """The model versions found in ``topic`` (the scores) so far."""
    return {json.loads(r.value)["model_version"] for r in read_all(bootstrap, topic)}


@pytest.mark.broker
def test_worker_learns_swaps_under_load_and_serves_drift(tmp_path: Path) -> None:
    """A training worker over a replay: its version rises (in /healthz, the scores topic and
    /users/{id}/state), every POST /score sent from four threads meanwhile is answered 200,
    and /drift and /metrics carry the drift figures."""
    from kafka import KafkaConsumer

    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    prefix, topics = "onl-", TopicNames.with_prefix("onl-")
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, 2, topics=topics)
        worker = WorkerProcess(bootstrap, checkpoint, tmp_path / "store", tmp_path / "w.log",
                               prefix=prefix, extra=("--checkpoint-every", "3",
                                                     "--train-batch-size", "16"))
        codes: list[int] = []
        stop = threading.Event()
        try:
            wait_for(lambda: http_get(worker.url + "/healthz")[0] == 200, 60, worker, "up")
            start = json.loads(http_get(worker.url + "/healthz")[1])["model_version"]
            events = list(synthetic_events(600, seed=5))
            replay_events(events[:50], bootstrap, topics, negatives=3, seed=5)
            consumer = KafkaConsumer(topics.impressions, bootstrap_servers=bootstrap,
                                     group_id=None, auto_offset_reset="earliest")
            body = next(iter(consumer.poll(timeout_ms=10_000).values()))[0].value
            consumer.close()

            def hammer() -> None:
                while not stop.is_set():
                    codes.append(post_json(worker.url + "/score", body))

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for thread in threads:
                thread.start()
            replay_events(events[50:500], bootstrap, topics, negatives=3, seed=5)

            def version() -> int:
                status, reply = http_get(worker.url + "/healthz")
                return json.loads(reply)["model_version"] if status == 200 else -1

            wait_for(lambda: version() >= start + 2 and len(codes) > 20, 120, worker,
                     "two hot swaps and more than 20 answers")
            stop.set()
            for thread in threads:
                thread.join()
            replay_events(events[500:], bootstrap, topics, negatives=3, seed=5)
            wait_for(lambda: max(score_versions(bootstrap, topics.scores)) > start, 60, worker,
                     "a score of a swapped-in version")
            drift = json.loads(http_get(worker.url + "/drift")[1])
            metrics = http_get(worker.url + "/metrics")[1].decode()
            user = json.loads(body)["user_id"]
            state = json.loads(http_get(f"{worker.url}/users/{user}/state")[1])
        finally:
            stop.set()
            worker.stop()
        seen = score_versions(bootstrap, topics.scores)
    assert len(codes) > 20 and set(codes) == {200}, sorted(set(codes))
    assert len(seen) >= 2 and max(seen) > start, seen
    assert state["model_version"] >= start
    assert drift["configured"] is True and drift["windows"]["1000"]["n"] > 0, drift
    for name in ("unirec_surrogate_distance{window=\"1000\"}", "unirec_online_auc{",
                 "unirec_score_psi{", "unirec_drift_alert ", "unirec_train_steps_total "):
        assert name in metrics, name
