"""The online trainer and the static student: batches mix fresh and replayed examples, the
trainer sees the scorer's inputs, refused steps leave the weights and optimizer bit-identical,
add/step run from two threads, the student learns to imitate without the state, and after a
planted preference shift the fine-tuned model beats its frozen copy while D_T rises; the live
trainer counts its labels into the item-rate table, and each example reads its item's rate
from before its own label."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from model_fixtures import (
    FEATURIZER,
    PROFILES,
    SPEC,
    T0,
    USERS,
    config,
    context,
    fresh_model,
    make_history,
    training_log,
)

from eventlog.schema import Candidate, Impression
from model.backbone import UniRecModel
from model.drift import DriftMonitor
from model.features import FeatureSpec, Featurizer
from model.online import (
    ItemLabelCounter,
    OnlineConfig,
    OnlineExample,
    OnlineTrainer,
    collate,
    predict,
)
from model.prediction_metrics import auc
from model.student import StaticStudent
from model.training import guarded_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> UniRecModel:
    """Two layers, d = 16, eight history slots: fast enough for hundreds of steps."""
    torch.manual_seed(seed)
    cfg = config(d_model=16, n_heads=2, n_layers=2, layer_widths=(1.0, 0.5), history_len=8,
                 **overrides)
    return UniRecModel(cfg, SPEC).eval()


def preference_stream(seed: int, n: int, favourite: str) -> list[OnlineExample]:
    """``n`` impressions of one action or comedy item each; clicked with probability 0.85 if
    its genre is ``favourite`` (the same for every user), else 0.15. Histories are random
    events, independent of the label."""
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(n):
        user = USERS[k % len(USERS)]
        ts = T0 + 86_400.0 + 60.0 * k
        genre = "action" if rng.random() < 0.5 else "comedy"
        candidate = Candidate(f"{genre[0]}{int(rng.integers(10))}",
                              {"genre": [genre], "price": float(rng.uniform(1, 60))})
        impression = Impression(f"r{seed}-{k}", user, ts, [candidate], context(rng))
        history = make_history(seed * 100_000 + k, int(rng.integers(0, 12)), user, ts - 1.0)
        clicked = rng.random() < (0.85 if genre == favourite else 0.15)
        examples.append(OnlineExample(impression, candidate, history, PROFILES[user],
                                      float(clicked)))
    return examples


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_state(trainer: OnlineTrainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("affinity_len", [None, 12])
def test_collate_gives_the_scorers_inputs(affinity_len):
    """Each collated row equals Featurizer.request of that example alone with the state it was
    served with (zeros for an example without one), its affinity over the model's affinity
    window included, so the trainer learns from exactly what the scorer scored; the static
    student's collation (``served=False``) has zero states."""
    model = tiny_model(affinity_len=affinity_len)
    rng = np.random.default_rng(4)
    examples = [replace(e, state=rng.standard_normal(16).astype(np.float32)) if b % 2 else e
                for b, e in enumerate(preference_stream(0, 6, "action"))]
    assert max(len(e.history) for e in examples) > 8  # the two windows differ
    user, cands, targets = collate(FEATURIZER, examples, model.cfg)
    assert cands.shape == (6, 1) and targets.tolist() == [e.target for e in examples]
    assert not collate(FEATURIZER, examples, model.cfg, served=False)[0].state.any()
    for b, e in enumerate(examples):
        alone = Impression(e.impression.request_id, e.impression.user_id, e.impression.ts,
                           [e.candidate], e.impression.context)
        served = np.zeros(16, np.float32) if e.state is None else e.state
        ref_user, ref_cands = FEATURIZER.request(alone, e.history, e.profile, served, 8,
                                                 affinity_len)
        for name, value in vars(ref_user).items():
            assert torch.equal(getattr(user, name)[b : b + 1], value), name
        for name, value in vars(ref_cands).items():
            assert torch.equal(getattr(cands, name)[b : b + 1], value), name
    assert len(predict(model, FEATURIZER, examples)) == 6


def test_batches_mix_fresh_and_replayed_examples():
    """The first step waits for a whole fresh batch; later steps take (1 - f) B fresh and f B
    replayed; versions are due every checkpoint_every accepted steps."""
    cfg = OnlineConfig(batch_size=8, replay_fraction=0.25, checkpoint_every=2)
    trainer = OnlineTrainer(tiny_model(), cfg)
    examples = preference_stream(1, 30, "action")
    trainer.add(examples[:7])
    assert trainer.step() is None and trainer.pending == 7
    trainer.add(examples[7:])
    reports = [trainer.step() for _ in range(4)]
    assert [(r.fresh, r.replayed) for r in reports] == [(8, 0), (6, 2), (6, 2), (6, 2)]
    assert [r.steps for r in reports] == [1, 2, 3, 4] and all(r.accepted for r in reports)
    assert [r.version_due for r in reports] == [False, True, False, True]
    assert trainer.step() is None and trainer.pending == 30 - 26


def test_a_nan_batch_is_refused_and_the_old_weights_stay(caplog):
    """A batch with a NaN target gives a NaN loss: refused, counted and logged; the weights
    and the optimizer state are bit-identical to before it, its examples are not replayed,
    and the next good batch trains."""
    trainer = OnlineTrainer(tiny_model(), OnlineConfig(batch_size=8, replay_fraction=0.5))
    good = preference_stream(2, 40, "action")
    trainer.add(good[:8])
    assert trainer.step().accepted
    before, state = parameters(trainer.model), optimizer_state(trainer)
    bad = [OnlineExample(e.impression, e.candidate, e.history, e.profile, float("nan"))
           for e in good[8:12]]
    trainer.add(bad)
    with caplog.at_level(logging.WARNING, logger="model.online"):
        report = trainer.step()
    assert report.refused == "non-finite loss" and report.steps == 1
    assert identical(parameters(trainer.model), before)
    after = optimizer_state(trainer)
    assert len(after) == len(state)
    assert all(identical(a, b) for a, b in zip(after, state, strict=True))
    assert trainer.refused == 1 and trainer.refusals == {"non-finite loss": 1}
    assert trainer.dropped == 4 and "non-finite loss" in caplog.text
    trainer.add(good[12:16])
    report = trainer.step()
    assert report.accepted and not identical(parameters(trainer.model), before)
    assert all(bool(torch.isfinite(p).all()) for p in parameters(trainer.model).values())


def test_the_embedding_rows_learn_at_their_own_rate_and_the_rest_at_lr():
    """With ``embedding_lr`` = 0 a step moves every parameter but the embedding table; with
    ``lr`` = 0 it moves the table alone; unset, both learn at ``lr`` as one group."""
    examples = preference_stream(5, 8, "action")

    def moved(cfg: OnlineConfig) -> set[str]:
        trainer = OnlineTrainer(tiny_model(), cfg)
        before = parameters(trainer.model)
        trainer.add(examples)
        assert trainer.step().accepted
        after = parameters(trainer.model)
        return {name for name in before if not torch.equal(before[name], after[name])}

    table = "tokenizer.table.weight"
    base = OnlineConfig(batch_size=8, replay_fraction=0.0, lr=1e-3)
    frozen_table = moved(replace(base, embedding_lr=0.0))
    assert table not in frozen_table and len(frozen_table) > 10
    assert moved(replace(base, lr=0.0, embedding_lr=1e-3)) == {table}
    assert moved(base) == frozen_table | {table}


def test_a_non_finite_gradient_is_refused():
    """A finite loss whose gradient is infinite (a hook on the head) is refused by
    guarded_step with the weights unchanged."""
    model = tiny_model()
    trainer = OnlineTrainer(model)
    user, cands, targets = collate(FEATURIZER, preference_stream(3, 8, "action"), model.cfg)
    model.heads["click"].mlp[-1].weight.register_hook(lambda g: g * float("inf"))
    before = parameters(model)
    result = guarded_step(model, trainer.optimizer, user, cands, targets)
    assert np.isfinite(result.loss) and result.refused == "non-finite gradient"
    assert identical(parameters(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_an_exploding_loss_is_refused_but_a_lasting_change_is_followed():
    """After warm-up on one preference, a batch of the opposite labels whose loss is above
    explode_factor x the running mean is refused with the weights unchanged; the running mean
    follows the new level, so that the same data is trained on after a few refusals."""
    cfg = OnlineConfig(batch_size=16, replay_fraction=0.0, lr=1e-2, explode_factor=1.5,
                       explode_warmup=5, loss_decay=0.5)
    trainer = OnlineTrainer(tiny_model(), cfg)
    trainer.add(preference_stream(4, 16 * 40, "action"))
    while trainer.step() is not None:
        pass
    inverted = [OnlineExample(e.impression, e.candidate, e.history, e.profile, 1 - e.target)
                for e in preference_stream(5, 16 * 10, "action")]
    before = parameters(trainer.model)
    trainer.add(inverted[:16])
    report = trainer.step()
    assert report.refused is not None and report.refused.startswith("exploding loss")
    assert identical(parameters(trainer.model), before)
    trainer.add(inverted[16:])
    reports = [trainer.step() for _ in range(9)]
    assert any(r.accepted for r in reports)


def test_add_and_step_from_two_threads_account_for_every_example():
    """One thread adds 20 batches while another steps: every example is trained on, pending
    or dropped, and none is lost or counted twice."""
    cfg = OnlineConfig(batch_size=8, replay_fraction=0.5, fresh_capacity=50)
    trainer = OnlineTrainer(tiny_model(), cfg)
    examples = preference_stream(6, 200, "comedy")
    done = threading.Event()
    fresh_trained = []

    def stepper():
        while not done.is_set() or trainer.pending >= 4:
            report = trainer.step()
            if report is not None:
                fresh_trained.append(report.fresh)

    thread = threading.Thread(target=stepper)
    thread.start()
    for begin in range(0, 200, 10):
        trainer.add(examples[begin : begin + 10])
    done.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert sum(fresh_trained) + trainer.pending + trainer.dropped == 200
    assert trainer.steps == len(fresh_trained) > 0


def test_the_student_learns_to_imitate_a_stateless_teacher():
    """The teacher's output does not depend on the state (use_state off); a differently
    initialised student distilled on the teacher's probabilities gets closer: its imitation
    loss over the last 160 predictions is well below that over the first 160. Its GRU gets no
    gradient (the state token is fed zeros), so its GRU weights do not change."""
    teacher = fresh_model(seed=1, use_state=False, n_layers=2, layer_widths=(1.0, 0.5))
    student = StaticStudent(tiny_model(seed=2), OnlineConfig(batch_size=16, lr=3e-3),
                            windows=(160,))
    gru = parameters(student.model.gru)
    first = None
    for chunk in range(30):
        examples = preference_stream(100 + chunk, 32, "action")
        p_dyn = predict(teacher, FEATURIZER, examples)
        student.observe([OnlineExample(e.impression, e.candidate, e.history, e.profile, p)
                         for e, p in zip(examples, p_dyn.tolist(), strict=True)])
        while student.step() is not None:
            pass
        if chunk == 4:
            first = student.imitation_loss(160)
    last = student.imitation_loss(160)
    assert student.trainer.steps >= 50 and last < 0.5 * first, (first, last)
    assert identical(parameters(student.model.gru), gru)


def test_after_a_preference_shift_fine_tuning_beats_the_frozen_copy_and_distance_rises():
    """A model trained online on "action" is copied and frozen; the stream then keeps "action"
    for 320 impressions (D_T stays small) and switches every user to "comedy" for 640.
    Prequentially (predict, then train), the fine-tuned model's AUC on the post-shift stream
    beats the frozen copy's by a wide margin (and is well above chance once it has adapted, on
    the second half), and D_T over the last 320 predictions ends several times above its
    pre-shift value."""
    cfg = OnlineConfig(batch_size=16, replay_fraction=0.25, replay_capacity=256, lr=3e-3)
    trainer = OnlineTrainer(tiny_model(seed=3), cfg)
    trainer.add(preference_stream(7, 16 * 60, "action"))
    while trainer.step() is not None:
        pass
    frozen = copy.deepcopy(trainer.model)
    monitor = DriftMonitor(windows=(320,))
    y, p_dyn, p_stat = [], [], []
    pre_shift = None
    stream = preference_stream(8, 320, "action") + preference_stream(9, 640, "comedy")
    for begin in range(0, len(stream), 32):
        chunk = stream[begin : begin + 32]
        p_dyn += predict(trainer.model, FEATURIZER, chunk).tolist()
        p_stat += predict(frozen, FEATURIZER, chunk).tolist()
        y += [e.target for e in chunk]
        monitor.update(p_dyn[-32:], p_stat[-32:], y[-32:])
        if begin + 32 == 320:
            pre_shift = monitor.distance(320)
        trainer.add(chunk)
        while trainer.step() is not None:
            pass
    y_post, dyn_post, stat_post = (np.array(v[320:]) for v in (y, p_dyn, p_stat))
    auc_dyn, auc_stat = auc(y_post, dyn_post), auc(y_post, stat_post)
    assert auc_stat < 0.3 and auc_dyn > auc_stat + 0.25, (auc_dyn, auc_stat)
    assert auc(y_post[320:], dyn_post[320:]) > 0.7
    assert monitor.distance(320) > 4 * pre_shift, (pre_shift, monitor.distance(320))
    window = monitor.report()["windows"][320]
    assert window["auc_dynamic"] > window["auc_static"]


def rated_model() -> UniRecModel:
    """``tiny_model`` on a spec with item rates (random labels on the fixtures' training log)."""
    log = training_log()
    labels = np.random.default_rng(11).integers(0, 2, len(log))
    spec = FeatureSpec.fit(log, PROFILES.values(), id_buckets=512, field_buckets=64,
                           action_buckets=16, labels=labels, item_rate_smoothing=10.0)
    torch.manual_seed(0)
    return UniRecModel(tiny_model().cfg, spec).eval()


def test_each_example_reads_its_items_rate_before_its_own_label_and_the_spec_counts_them():
    """Counting in order: every example keeps the item-rate features of its item over the
    labels counted before its own (never its own label), ``collate`` trains on those, the
    trainer's ``counted_spec()`` holds every label it was given in its online table, so a
    served request of that spec reads what one more example would; the student counts none."""
    model = rated_model()
    featurizer = Featurizer(model.spec)
    examples = preference_stream(5, 60, "action")
    read = ItemLabelCounter(featurizer).read_then_count(examples)
    rows = featurizer.items([e.candidate for e in examples]).item
    positives, counts = np.zeros(model.spec.n_embeddings), np.zeros(model.spec.n_embeddings)
    for example, row in zip(read, rows.tolist(), strict=True):
        np.testing.assert_allclose(
            example.item_rates,
            featurizer.item_rates(np.asarray(row), positives[row], counts[row]), rtol=1e-6)
        positives[row] += example.target
        counts[row] += 1
    assert len(set(rows.tolist())) < len(examples)  # items recur: later examples read more
    _, cands, _ = collate(featurizer, read, model.cfg)
    np.testing.assert_allclose(cands.rates[:, 0].numpy(), np.stack([e.item_rates for e in read]))

    trainer = OnlineTrainer(model, OnlineConfig(batch_size=8))
    trainer.add(examples[:25])
    trainer.add(examples[25:])
    counted = trainer.counted_spec()
    assert counted.online_counts()[1].sum() == len(examples)
    np.testing.assert_array_equal(counted.online_counts()[0], positives)
    np.testing.assert_allclose(Featurizer(counted).item_rates(rows),
                               featurizer.item_rates(rows, positives[rows], counts[rows]),
                               rtol=1e-6)
    student = StaticStudent(model, OnlineConfig(batch_size=8))
    student.observe(examples)
    assert student.trainer.counted_spec() == model.spec
    off = OnlineTrainer(rated_model(), OnlineConfig(batch_size=8, count_item_labels=False))
    off.add(examples)
    assert off.counted_spec() == model.spec
