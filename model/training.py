"""Training and prediction over an ``ExampleSet``.

``guarded_step`` is the one optimizer step every learner here shares (the offline quick-start
through ``train_step``, the online trainer, its static student, and the prequential
evaluation): u_t is the state as served (``model.user_state.served_state``, the one code path
of the state), the loss is binary cross-entropy of the click head, and an update whose loss or
gradient is not finite (or that a guard refuses) is not applied.

The state as served, offline (``fit``, ``predict``): each example's u_t is the GRU unrolled,
with gradient, over its history window from the state carried over every earlier event of its
user (truncated backpropagation through time). The carried states come from one chronological
no-grad pass over the whole log under the current weights (``model.user_state.carried_states``),
refreshed every ``TrainConfig.state_refresh_steps`` steps (25): a pass costs about half a
training step on MovieLens-100K (0.20 s at the suite size, 0.35 s at the default size, one
thread), so refreshing every 25 steps adds about 2%, while the carried states lag the weights
by at most 25 steps (of a few hundred to a few thousand). ``predict`` makes a fresh pass, so
an evaluated u_t is exactly the state a frozen worker carries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model.backbone import UniRecModel
from model.dataset import ExampleSet, gather_batch
from model.features import CandidateInputs, Featurizer, UserInputs
from model.tokens import EmbeddingTable
from model.user_state import carried_states, served_state
from model.weight_average import WeightAverage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of one training run."""

    lr: float = 1e-3
    embedding_lr: float | None = None  # of the embedding table's rows; None: ``lr``
    weight_decay: float = 1e-5
    batch_size: int = 256
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    task: str = "click"
    state_refresh_steps: int = 25  # steps between two passes of carried states (``fit``)
    # decay of the weights' average ``fit`` returns (None: the last weights); by validation,
    # docs/model.md "Why the checkpoint over-predicts"
    weight_average: float | None = 0.95


FUSED_ADAM_DEVICES = frozenset({"cpu", "cuda"})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters; the fused kernel where every parameter is on a
    device that has one (one pass over all parameters instead of a dozen small kernels per
    tensor: 23 ms -> 4 ms a step at d 32, 48 ms -> 12 ms at the default size, one thread).

    With ``cfg.embedding_lr`` set, the embedding table's rows (``model.tokens.EmbeddingTable``:
    ids, actions and categorical values) form a second parameter group at that rate, and
    every other parameter (the backbone, heads, GRU) learns at ``cfg.lr``."""
    parameters = list(model.parameters())
    fused = all(p.device.type in FUSED_ADAM_DEVICES for p in parameters)
    groups: list[dict] = [{"params": parameters}]
    if cfg.embedding_lr is not None:
        tables = {id(m.weight) for m in model.modules() if isinstance(m, EmbeddingTable)}
        groups = [{"params": [p for p in parameters if id(p) not in tables]},
                  {"params": [p for p in parameters if id(p) in tables], "lr": cfg.embedding_lr}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def dense_gradients(model: torch.nn.Module) -> None:
    """Turn every sparse gradient of ``model`` (the embedding table's,
    ``model.tokens.EmbeddingTable``) into the dense gradient a dense table would have had:
    what clipping and the optimizer read."""
    for parameter in model.parameters():
        if parameter.grad is not None and parameter.grad.is_sparse:
            parameter.grad = parameter.grad.to_dense()


@dataclass(frozen=True)
class StepResult:
    """What one ``guarded_step`` did: the loss, the gradient norm before clipping (NaN when no
    backward pass ran), and why the update was refused (None: it was applied)."""

    loss: float
    grad_norm: float
    refused: str | None

    @property
    def accepted(self) -> bool:
        return self.refused is None


def guarded_step(
    model: UniRecModel,
    optimizer: torch.optim.Optimizer,
    user: UserInputs,
    cands: CandidateInputs,
    targets: torch.Tensor,
    task: str = "click",
    *,
    unroll_window: bool = True,
    clip_norm: float = 1.0,
    guard: Callable[[float], str | None] | None = None,
) -> StepResult:
    """One step on B examples of C = 1 candidate each; targets: [B] in [0, 1] (labels, or a
    teacher's probabilities when distilling).

    u_t: with ``model.cfg.use_state`` and ``unroll_window``, ``user.state`` is the state
    carried over the user's events before the history window, and u_t is the GRU unrolled from
    it over the window (``model.user_state.served_state``), trained by backpropagation through
    the window; otherwise ``user.state`` is u_t as given (the served state for the online
    learner, zeros for a static student).

    Refused, with the weights and the optimizer state left exactly as they were: a non-finite
    loss; a loss for which ``guard(loss)`` returns a reason (checked before the backward pass);
    a non-finite gradient norm. Gradients are cleared on a refusal.
    """
    model.train()
    if isinstance(model, UniRecModel):  # embed each history once: the GRU and the S tokens
        interaction = model.tokenizer.interaction(user)
        if model.cfg.use_state and unroll_window:
            user = served_state(model, user, interaction)
        logits = model(user, cands, interaction)[task][:, 0]
    else:
        if model.cfg.use_state and unroll_window:
            user = served_state(model, user)
        logits = model(user, cands)[task][:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, targets.float())
    value = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    refused = "non-finite loss" if not math.isfinite(value) else guard(value) if guard else None
    if refused is not None:
        return StepResult(value, float("nan"), refused)
    loss.backward()
    dense_gradients(model)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(value, norm, "non-finite gradient")
    optimizer.step()
    return StepResult(value, norm, None)


def train_step(
    model: UniRecModel,
    optimizer: torch.optim.Optimizer,
    user: UserInputs,
    cands: CandidateInputs,
    labels: torch.Tensor,
    task: str = "click",
) -> float:
    """``guarded_step`` on labels [B] in {0, 1} (a refusal is logged). Returns the loss."""
    result = guarded_step(model, optimizer, user, cands, labels, task)
    if not result.accepted:
        log.warning("training step refused: %s (loss %.4g)", result.refused, result.loss)
    return result.loss


def fit(
    model: UniRecModel,
    featurizer: Featurizer,
    examples: ExampleSet,
    cfg: TrainConfig,
    device: torch.device,
    on_step: Callable[[int, int, float], bool | None] | None = None,
) -> list[float]:
    """Train on shuffled mini-batches of ``examples`` (all from the training period).

    ``on_step(step, total_steps, loss)`` is called after every step; training stops early
    when it returns True (e.g. ``evaluation.experiment.ValidationCurve``). Returns the losses.

    With ``cfg.weight_average`` set, the model ends with an exponential average of its
    weights over the steps (``model.weight_average``), and ``on_step`` sees that average
    (so early stopping judges and keeps the weights that will be returned); the steps
    themselves, and so the trained weights, are the same as without it.
    """
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    average = None if cfg.weight_average is None else WeightAverage(model, cfg.weight_average)
    try:
        return _train_steps(model, featurizer, examples, cfg, device, optimizer, rng, on_step,
                            average)
    finally:
        if average is not None:
            average.apply()


def _train_steps(
    model: UniRecModel, featurizer: Featurizer, examples: ExampleSet, cfg: TrainConfig,
    device: torch.device, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
    on_step: Callable[[int, int, float], bool | None] | None, average: WeightAverage | None,
) -> list[float]:
    per_epoch = -(-len(examples) // cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    losses: list[float] = []
    carried = None
    while len(losses) < total:
        order = rng.permutation(len(examples))
        for begin in range(0, len(order), cfg.batch_size):
            rows = order[begin : begin + cfg.batch_size]
            if len(losses) % cfg.state_refresh_steps == 0:
                carried = example_states(model, examples)
            user, cands = gather_batch(examples, featurizer, rows, model.cfg.d_model, carried)
            labels = torch.from_numpy(examples.labels[rows].astype(np.float32))
            loss = train_step(
                model, optimizer, user.to(device), cands.to(device), labels.to(device), cfg.task
            )
            losses.append(loss)
            if average is not None:
                average.update()
            if on_step is not None and _call_averaged(on_step, average, len(losses), total,
                                                      loss):
                return losses
            if len(losses) >= total:
                break
    return losses


def _call_averaged(on_step: Callable[[int, int, float], bool | None],
                   average: WeightAverage | None, step: int, total: int, loss: float
                   ) -> bool | None:
    """``on_step`` with the weights' average in the model, when there is one."""
    if average is None:
        return on_step(step, total, loss)
    with average.swapped_in():
        return on_step(step, total, loss)


def example_states(model: UniRecModel, examples: ExampleSet) -> np.ndarray | None:
    """The carried states of ``examples``' log under ``model``'s current weights
    (``model.user_state.carried_states``), or None for a model without a state."""
    if not model.cfg.use_state:
        return None
    return carried_states(model, examples.events, examples.timelines)


@torch.no_grad()
def predict(
    model: UniRecModel,
    featurizer: Featurizer,
    examples: ExampleSet,
    device: torch.device,
    batch_size: int = 1024,
    task: str = "click",
    carried: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities [N] for every example, in order, u_t as served: ``carried`` states
    (``example_states`` under the model's current weights) when the caller has them, else a
    fresh pass."""
    model.eval()
    out = np.empty(len(examples), dtype=np.float64)
    if carried is None:
        carried = example_states(model, examples)
    for begin in range(0, len(examples), batch_size):
        rows = np.arange(begin, min(begin + batch_size, len(examples)))
        user, cands = gather_batch(examples, featurizer, rows, model.cfg.d_model, carried)
        user, cands = user.to(device), cands.to(device)
        if model.cfg.use_state:
            user = served_state(model, user)
        out[rows] = torch.sigmoid(model(user, cands)[task][:, 0]).double().cpu().numpy()
    return out
