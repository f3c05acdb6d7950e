"""One evaluation run under a fixed budget: train a variant on the past, score a later slice.

The log is cut in time into train | validation | test (``Splits``); the feature spec is fitted
on the training part only and every example's history holds only earlier events. A
``Variant`` is a model kind plus ``ModelConfig`` overrides (an ablation). Baselines get the
``d_model`` that brings their parameter count closest to the default UniRec model's
(``matched_width``), so that every model has about the same parameter budget.

Every run stops early on the validation slice (``ValidationCurve``): the step budget is a
ceiling, and each run keeps the weights of its best validation AUC, measured every
``Budget.eval_every`` steps; it stops after ``Budget.patience`` measurements without a new
best. So each model gets the step count that suits it, chosen by validation only, under the
same ceiling, and the learning curves go into the report.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from eventlog.log import EventLog, time_split
from model.baselines import MODEL_KINDS
from model.config import ModelConfig
from model.dataset import ExampleSet, build_examples
from model.features import FeatureSpec, Featurizer
from model.item_rates import DEFAULT_SMOOTHING
from model.kinds import build_model, parameter_count
from model.prediction_metrics import auc, report
from model.training import TrainConfig, fit, predict

WIDTHS = tuple(range(8, 257, 4))  # d_model candidates for matching (multiples of n_heads)


@dataclass(frozen=True)
class Budget:
    """Sizes and schedule shared by every run (the matched budget)."""

    d_model: int = 48  # UniRec's; the baselines' are matched on parameter count
    n_heads: int = 4
    history_len: int = 20
    # the candidates' affinity window (ModelConfig's), by validation: docs/model.md "The
    # affinity window"
    affinity_len: int | None = 300
    core_k: int = 8
    steps: int = 400  # the ceiling: runs stop early on validation (ValidationCurve)
    eval_every: int = 25  # steps between two validation measurements
    patience: int = 4  # measurements without a new best before a run stops
    batch_size: int = 256
    seeds: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    chunks: int = 10  # prequential chunks over the test period
    tune_steps: int | None = None  # steps of a tuning run (None: ``steps``)
    weight_average: float | None = TrainConfig.weight_average  # of every run
    item_rate_smoothing: float = DEFAULT_SMOOTHING  # candidates' item rates (model.item_rates)

    def model_config(self, dropout: float, **overrides: Any) -> ModelConfig:
        base = ModelConfig(d_model=self.d_model, n_heads=self.n_heads,
                           history_len=self.history_len, affinity_len=self.affinity_len,
                           core_k=self.core_k, dropout=dropout)
        return replace(base, **overrides)


@dataclass(frozen=True)
class Variant:
    """A row of the results table: a model kind and its ``ModelConfig`` overrides."""

    name: str
    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)
    claim: str = ""  # what the row tests (empty for the default models)


# UniRec's capacity split on the matched budget: two layers (the second at half the S width)
# at d = 48 (``Budget.d_model``) instead of eight layers at d = 32; chosen on validation
# (docs/model.md, "Evaluation protocol": the capacity split), so every UniRec row shares it.
UNIREC_CAPACITY: dict[str, Any] = {"n_layers": 2, "layer_widths": (1.0, 0.5)}
MODELS = (
    Variant("unirec", "unirec", UNIREC_CAPACITY),
    Variant("deepfm", "deepfm", claim="no sequence"),
    Variant("din", "din", claim="target attention over the history"),
    Variant("sasrec-dcnv2", "sasrec-dcnv2", claim="compress first, then interact"),
)
ABLATIONS = (
    Variant("unirec -S<->F", "unirec", {**UNIREC_CAPACITY, "seq_feature_mixing": False},
            "S<->F off-diagonal blocks closed"),
    Variant("unirec input-compression", "unirec",
            {**UNIREC_CAPACITY, "layer_widths": (0.5, 0.5)},
            "compression at the input instead of delayed"),
    Variant("unirec -state", "unirec", {**UNIREC_CAPACITY, "use_state": False}, "GRU state off"),
    Variant("unirec -core", "unirec", {**UNIREC_CAPACITY, "core_selection": False},
            "core-behaviour selection off"),
    Variant("unirec -UG-Sep", "unirec", {**UNIREC_CAPACITY, "ug_sep": False},
            "UG-Sep off (U->G open)"),
    Variant("unirec pyramid", "unirec", {**UNIREC_CAPACITY, "compression": "pyramid"},
            "pyramid instead of learned-query compression"),
)
VARIANTS = MODELS + ABLATIONS


@dataclass
class Splits:
    """A log cut in time: examples [0, val_start) train, [val_start, test_start) validation,
    [test_start, N) test; every event of a later part is strictly later than the earlier."""

    log: EventLog
    featurizer: Featurizer
    train: ExampleSet
    val: ExampleSet
    test: ExampleSet


def split_points(log: EventLog, budget: Budget) -> tuple[int, int]:
    """``(val_start, test_start)``: events [0, val_start) train, [val_start, test_start)
    validation, [test_start, N) test. Raises ``ValueError`` when a part would be empty."""
    val_start = time_split(log, 1.0 - budget.val_fraction - budget.test_fraction)
    test_start = time_split(log, 1.0 - budget.test_fraction)
    if not 0 < val_start < test_start < len(log):
        raise ValueError(f"{log.name!r} is too small for a train/validation/test split "
                         f"({len(log)} events: {val_start}, {test_start})")
    return val_start, test_start


def make_splits(log: EventLog, budget: Budget) -> Splits:
    """Splits of ``log`` (spec fitted on the training part, with its labels' item rates when
    ``budget.item_rate_smoothing``; histories from the whole log)."""
    val_start, test_start = split_points(log, budget)
    train_log = log.slice(0, val_start)
    featurizer = Featurizer(FeatureSpec.fit(
        train_log.interactions, log.profiles.values(), labels=train_log.labels,
        item_rate_smoothing=budget.item_rate_smoothing))
    examples = build_examples(log, featurizer, budget.history_len,
                              affinity_len=budget.affinity_len)
    return Splits(
        log, featurizer,
        train=examples.subset(slice(0, val_start)),
        val=examples.subset(slice(val_start, test_start)),
        test=examples.subset(slice(test_start, len(log))),
    )


def embedding_count(model: nn.Module) -> int:
    """Parameters of the shared hashed embedding table."""
    return model.tokenizer.table.weight.numel()


def matched_width(kind: str, budget: Budget, spec: FeatureSpec, target: int) -> int:
    """The ``d_model`` in ``WIDTHS`` whose ``kind`` model has the parameter count closest to
    ``target`` (counts grow with d: bisection); the budget's own width for ``unirec``."""
    if kind == "unirec":
        return budget.d_model

    def count(d: int) -> int:
        return parameter_count(build_model(kind, budget.model_config(0.0, d_model=d), spec,
                                           MODEL_KINDS))

    low, high = 0, len(WIDTHS) - 1  # find the first width with count >= target
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(WIDTHS[middle]) < target else (low, middle)
    near = {WIDTHS[i] for i in (low - 1, low) if i >= 0}
    return min(near, key=lambda d: abs(count(d) - target))


@dataclass(frozen=True)
class Hyper:
    """The tuned hyperparameters of one model kind."""

    lr: float = 1e-3
    dropout: float = 0.1
    weight_decay: float = 1e-5


class ValidationCurve:
    """Early stopping on a validation slice, as ``fit``'s ``on_step``.

    Every ``every`` steps (and at the last step) the model's validation AUC is measured
    (``predict``: u_t as served); the weights of the best AUC so far are kept, and the call
    returns True (stop) after ``patience`` measurements without a new best. ``points``:
    ``{"step", "val_auc", "train_loss"}`` per measurement (the mean training loss since the
    previous one); ``restore_best()`` loads the best weights and returns their step.
    """

    def __init__(self, model: nn.Module, featurizer: Featurizer, val: ExampleSet,
                 device: torch.device, every: int, patience: int) -> None:
        self.model, self.featurizer, self.val, self.device = model, featurizer, val, device
        self.every, self.patience = every, patience
        self.points: list[dict[str, float]] = []
        self.best_auc, self.best_step, self.last_step, self.stale = -math.inf, 0, 0, 0
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._losses: list[float] = []

    def __call__(self, step: int, total: int, loss: float) -> bool:
        self._losses.append(loss)
        self.last_step = step
        if step % self.every and step < total:
            return False
        probabilities = predict(self.model, self.featurizer, self.val, self.device)
        val_auc = auc(self.val.labels, probabilities)
        self.points.append({"step": step, "val_auc": val_auc,
                            "train_loss": float(np.mean(self._losses))})
        self._losses = []
        if val_auc > self.best_auc:
            self.best_auc, self.best_step, self.stale = val_auc, step, 0
            self._best_weights = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore_best(self) -> int:
        """Load the best weights (none measured, or no AUC defined: the last ones) and
        return their step."""
        if self._best_weights is None:
            return self.last_step
        self.model.load_state_dict(self._best_weights)
        return self.best_step


@dataclass
class RunResult:
    """One trained model (its best validation weights) and its metrics on the slice it was
    scored on; ``steps``: the step of those weights; ``curve``: ``ValidationCurve.points``."""

    model: nn.Module
    metrics: dict[str, float]
    probabilities: np.ndarray
    parameters: int
    embedding_parameters: int
    steps: int
    train_seconds: float
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)


def run_one(variant: Variant, hyper: Hyper, seed: int, splits: Splits, budget: Budget,
            d_model: int, device: torch.device, on_val: bool = False,
            steps: int | None = None) -> RunResult:
    """Train ``variant`` (seeded) on the training part, stopping early on validation
    (``ValidationCurve``, at most ``steps`` or the budget's steps); score the test part (or
    validation) with the best validation weights."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    cfg = budget.model_config(hyper.dropout, d_model=d_model, **variant.overrides)
    model = build_model(variant.kind, cfg, splits.featurizer.spec, MODEL_KINDS).to(device)
    train_cfg = TrainConfig(lr=hyper.lr, weight_decay=hyper.weight_decay,
                            batch_size=budget.batch_size, max_steps=steps or budget.steps,
                            seed=seed, weight_average=budget.weight_average)
    curve = ValidationCurve(model, splits.featurizer, splits.val, device, budget.eval_every,
                            budget.patience)
    fit(model, splits.featurizer, splits.train, train_cfg, device, curve)
    best_step = curve.restore_best()
    trained = time.perf_counter()
    target = splits.val if on_val else splits.test
    probabilities = predict(model, splits.featurizer, target, device)
    return RunResult(
        model=model.eval(),
        metrics=report(target.user_ids, target.labels, probabilities),
        probabilities=probabilities,
        parameters=parameter_count(model),
        embedding_parameters=embedding_count(model),
        steps=best_step,
        train_seconds=trained - started,
        seconds=time.perf_counter() - started,
        curve=curve.points,
    )
