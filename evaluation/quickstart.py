"""The offline quick-start: train on the time-ordered first part of a log, evaluate on the rest.

Never shuffles across time: the feature spec is fitted and the model trained on events before
the split only; evaluation examples come after it (their histories may reach back into the
training period, as they would when serving).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from eventlog.log import EventLog, time_split
from model.backbone import UniRecModel
from model.baselines import MODEL_KINDS
from model.config import ModelConfig
from model.dataset import ExampleSet, build_examples
from model.features import FeatureSpec, Featurizer
from model.item_rates import DEFAULT_SMOOTHING
from model.kinds import build_model, parameter_count
from model.prediction_metrics import report
from model.training import TrainConfig, fit, predict


def train_on_log(
    log: EventLog,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    device: torch.device,
    train_fraction: float = 0.8,
    on_step: Callable[[int, int, float], None] | None = None,
    kind: str = "unirec",
    item_rate_smoothing: float = DEFAULT_SMOOTHING,
) -> tuple[UniRecModel, dict[str, Any]]:
    """A model of ``kind`` (``model.kinds``) trained on ``log``'s first ``train_fraction``, and
    metadata for its checkpoint; its spec keeps the item rates of that part when
    ``item_rate_smoothing`` > 0 (``model.item_rates``)."""
    split = time_split(log, train_fraction)
    if split == 0:
        raise ValueError(f"the training part of {log.name!r} is empty")
    train_log = log.slice(0, split)
    torch.manual_seed(train_cfg.seed)
    spec = FeatureSpec.fit(train_log.interactions, log.profiles.values(),
                           labels=train_log.labels, item_rate_smoothing=item_rate_smoothing)
    featurizer = Featurizer(spec)
    model = build_model(kind, model_cfg, spec, MODEL_KINDS).to(device)
    examples = build_examples(train_log, featurizer, model_cfg.history_len,
                              affinity_len=model_cfg.affinity_len)
    started = time.perf_counter()
    losses = fit(model, featurizer, examples, train_cfg, device, on_step)
    meta = {
        "dataset": log.name,
        "model": kind,
        "train_fraction": train_fraction,
        "split_index": split,
        "train_examples": len(examples),
        "steps": len(losses),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": time.perf_counter() - started,
        "parameters": parameter_count(model),
        "train_config": train_cfg.__dict__,
    }
    return model.eval(), meta


def predict_on_log(
    model: UniRecModel, log: EventLog, device: torch.device, train_fraction: float = 0.8,
    events: int | None = None,
) -> tuple[ExampleSet, np.ndarray]:
    """The examples after the time split (its first ``events``, or all of them) and their
    probabilities [N], u_t as served (``model.training.predict``)."""
    split = time_split(log, train_fraction)
    if split == len(log):
        raise ValueError(f"the test part of {log.name!r} is empty")
    featurizer = Featurizer(model.spec)
    stop = len(log) if events is None else min(len(log), split + events)
    examples = build_examples(log, featurizer, model.cfg.history_len, split, stop,
                              model.cfg.affinity_len)
    return examples, predict(model, featurizer, examples, device)


def evaluate_on_log(
    model: UniRecModel, log: EventLog, device: torch.device, train_fraction: float = 0.8,
    events: int | None = None,
) -> dict[str, Any]:
    """AUC, GAUC and LogLoss of ``predict_on_log``."""
    examples, probabilities = predict_on_log(model, log, device, train_fraction, events)
    return report(examples.user_ids, examples.labels, probabilities)
