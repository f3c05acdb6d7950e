"""One evaluation run under a fixed budget: train a variant on the past, score a later slice.

The log is cut in time into train | validation | test (``Splits``); the feature spec is fitted
on the training part only and every example's history holds only earlier events. A
``Variant`` is a model kind plus ``ModelConfig`` overrides (an ablation). Baselines get the
``d_model`` that brings their parameter count closest to the default UniRec model's
(``matched_width``), so that every model has about the same parameter budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from eventlog.log import EventLog, time_split
from model.baselines import MODEL_KINDS
from model.config import INPUT_COMPRESSION_WIDTHS, ModelConfig
from model.dataset import ExampleSet, build_examples
from model.features import FeatureSpec, Featurizer
from model.kinds import build_model, parameter_count
from model.prediction_metrics import report
from model.training import TrainConfig, fit, predict

WIDTHS = tuple(range(8, 257, 4))  # d_model candidates for matching (multiples of n_heads)


@dataclass(frozen=True)
class Budget:
    """Sizes and schedule shared by every run (the matched budget)."""

    d_model: int = 32
    n_heads: int = 4
    history_len: int = 20
    core_k: int = 8
    steps: int = 200
    batch_size: int = 256
    seeds: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    chunks: int = 10  # prequential chunks over the test period
    tune_steps: int | None = None  # steps of a tuning run (None: ``steps``)

    def model_config(self, dropout: float, **overrides: Any) -> ModelConfig:
        base = ModelConfig(d_model=self.d_model, n_heads=self.n_heads,
                           history_len=self.history_len, core_k=self.core_k, dropout=dropout)
        return replace(base, **overrides)


@dataclass(frozen=True)
class Variant:
    """A row of the results table: a model kind and its ``ModelConfig`` overrides."""

    name: str
    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)
    claim: str = ""  # what the row tests (empty for the default models)


MODELS = (
    Variant("unirec", "unirec"),
    Variant("deepfm", "deepfm", claim="no sequence"),
    Variant("din", "din", claim="target attention over the history"),
    Variant("sasrec-dcnv2", "sasrec-dcnv2", claim="compress first, then interact"),
)
ABLATIONS = (
    Variant("unirec -S<->F", "unirec", {"seq_feature_mixing": False},
            "S<->F off-diagonal blocks closed"),
    Variant("unirec input-compression", "unirec", {"layer_widths": INPUT_COMPRESSION_WIDTHS},
            "compression at the input instead of delayed"),
    Variant("unirec -state", "unirec", {"use_state": False}, "GRU state off"),
    Variant("unirec -core", "unirec", {"core_selection": False},
            "core-behaviour selection off"),
    Variant("unirec -UG-Sep", "unirec", {"ug_sep": False}, "UG-Sep off (U->G open)"),
    Variant("unirec pyramid", "unirec", {"compression": "pyramid"},
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
    """Splits of ``log`` (spec fitted on the training part; histories from the whole log)."""
    val_start, test_start = split_points(log, budget)
    train_log = log.slice(0, val_start)
    featurizer = Featurizer(FeatureSpec.fit(train_log.interactions, log.profiles.values()))
    examples = build_examples(log, featurizer, budget.history_len)
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


@dataclass
class RunResult:
    """One trained model and its metrics on the slice it was scored on."""

    model: nn.Module
    metrics: dict[str, float]
    probabilities: np.ndarray
    parameters: int
    embedding_parameters: int
    steps: int
    train_seconds: float
    seconds: float


def run_one(variant: Variant, hyper: Hyper, seed: int, splits: Splits, budget: Budget,
            d_model: int, device: torch.device, on_val: bool = False,
            steps: int | None = None) -> RunResult:
    """Train ``variant`` (seeded) on the training part; score the test part (or validation)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    cfg = budget.model_config(hyper.dropout, d_model=d_model, **variant.overrides)
    model = build_model(variant.kind, cfg, splits.featurizer.spec, MODEL_KINDS).to(device)
    train_cfg = TrainConfig(lr=hyper.lr, batch_size=budget.batch_size,
                            max_steps=steps or budget.steps, seed=seed)
    losses = fit(model, splits.featurizer, splits.train, train_cfg, device)
    trained = time.perf_counter()
    target = splits.val if on_val else splits.test
    probabilities = predict(model, splits.featurizer, target, device)
    return RunResult(
        model=model.eval(),
        metrics=report(target.user_ids, target.labels, probabilities),
        probabilities=probabilities,
        parameters=parameter_count(model),
        embedding_parameters=embedding_count(model),
        steps=len(losses),
        train_seconds=trained - started,
        seconds=time.perf_counter() - started,
    )
