"""Training and prediction over an ``ExampleSet``.

``train_step`` is the one optimizer step every learner here shares (the offline quick-start,
and later the prequential evaluation and the online trainer): u_t is the GRU unrolled over the
example's history, the loss is binary cross-entropy of the click head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model.backbone import UniRecModel
from model.dataset import ExampleSet, gather_batch
from model.features import CandidateInputs, Featurizer, UserInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of one training run."""

    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    task: str = "click"


def make_optimizer(model: UniRecModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(
    model: UniRecModel,
    optimizer: torch.optim.Optimizer,
    user: UserInputs,
    cands: CandidateInputs,
    labels: torch.Tensor,
    task: str = "click",
) -> float:
    """One step on B examples of C = 1 candidate each; labels: [B] in {0, 1}. Returns the loss."""
    model.train()
    if model.cfg.use_state:
        user = model.with_history_state(user)
    logits = model(user, cands)[task][:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def fit(
    model: UniRecModel,
    featurizer: Featurizer,
    examples: ExampleSet,
    cfg: TrainConfig,
    device: torch.device,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train on shuffled mini-batches of ``examples`` (all from the training period).

    ``on_step(step, total_steps, loss)`` is called after every step. Returns the losses.
    """
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    per_epoch = -(-len(examples) // cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    losses: list[float] = []
    while len(losses) < total:
        order = rng.permutation(len(examples))
        for begin in range(0, len(order), cfg.batch_size):
            rows = order[begin : begin + cfg.batch_size]
            user, cands = gather_batch(examples, featurizer, rows, model.cfg.d_model)
            labels = torch.from_numpy(examples.labels[rows].astype(np.float32))
            loss = train_step(
                model, optimizer, user.to(device), cands.to(device), labels.to(device), cfg.task
            )
            losses.append(loss)
            if on_step is not None:
                on_step(len(losses), total, loss)
            if len(losses) >= total:
                break
    return losses


@torch.no_grad()
def predict(
    model: UniRecModel,
    featurizer: Featurizer,
    examples: ExampleSet,
    device: torch.device,
    batch_size: int = 1024,
    task: str = "click",
) -> np.ndarray:
    """Probabilities [N] for every example, in order."""
    model.eval()
    out = np.empty(len(examples), dtype=np.float64)
    for begin in range(0, len(examples), batch_size):
        rows = np.arange(begin, min(begin + batch_size, len(examples)))
        user, cands = gather_batch(examples, featurizer, rows, model.cfg.d_model)
        user, cands = user.to(device), cands.to(device)
        if model.cfg.use_state:
            user = model.with_history_state(user)
        out[rows] = torch.sigmoid(model(user, cands)[task][:, 0]).double().cpu().numpy()
    return out
