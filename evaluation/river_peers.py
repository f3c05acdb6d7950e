"""Online peers from River: two pipelines replayed over the same events as the prequential rows.

Protocol, one event at a time in time order: each event of the scored slice is first scored
(``predict_proba_one``), then learned from (``learn_one``); the warm-up learns, without
scoring, every event before the slice. Features: ``evaluation.peer_features``, whose layout
(numeric bin edges, cross fields) is fitted on the training part. Metrics:
``model.prediction_metrics.report`` over the scored slice, as for the suite's own rows.

Pipelines (``Candidate.pipeline``):

- ``logistic``: ``river.linear_model.LogisticRegression`` with SGD at ``lr``;
- ``fm``: ``river.facto.FMClassifier`` with ``n_factors`` and SGD at ``lr`` for the weights
  and the latent factors.

With ``scale``, the running statistics (``rate.*``, ``logn.*``) pass through a
``preprocessing.StandardScaler`` first; the one-hot keys bypass it (their running variance is
0, and the scaler would map them to 0). Keys reach a model in a fixed order (the FM draws a
feature's latent factors when it first sees the feature), so runs are reproducible.

Tuning reads the training and validation slices only: warm-up on train, test-then-train over
validation, and each pipeline keeps its candidate with the best validation AUC. While a
pipeline's best learning rate is the lowest or highest tried (with its other parameters
fixed), the next one beyond it (x or / ``PeerConfig.widen_factor``) is tried too, at most
``PeerConfig.widen`` times. The final run replays the chosen candidates: warm-up on train +
validation, test-then-train over test.

River is imported only here and only when a run starts; without it ``peers_record`` returns
``{"status": "skipped", "note": SKIP_NOTE}``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from evaluation.peer_features import FeatureConfig, FeatureLayout, event_features
from evaluation.prequential import chunk_bounds
from eventlog.log import EventLog
from model.prediction_metrics import auc, report

SKIP_NOTE = "install the [peers] extra: pip install -e '.[peers]'"
PIPELINES = {"logistic": "River logistic regression", "fm": "River factorization machine"}


@dataclass(frozen=True)
class Candidate:
    """One point of a pipeline's grid (``n_factors`` is the FM's; 0 for ``logistic``)."""

    pipeline: str
    lr: float
    scale: bool
    n_factors: int = 0

    def describe(self) -> str:
        factors = f"k={self.n_factors}, " if self.pipeline == "fm" else ""
        return f"{factors}SGD lr={self.lr:g}, rates {'scaled' if self.scale else 'raw'}"


@dataclass(frozen=True)
class PeerConfig:
    """The features, each pipeline's initial grid, the widening rule and the FM's seed.

    ``fm_factors`` is one value by default: on MovieLens-100K the FM's validation AUC moved by
    under 0.002 between k = 4, 10 and 20, and every grid point is a full FM replay.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    logistic_lr: tuple[float, ...] = (0.003, 0.01, 0.03)
    logistic_scale: tuple[bool, ...] = (False, True)
    fm_lr: tuple[float, ...] = (0.003, 0.01, 0.03)
    fm_factors: tuple[int, ...] = (10,)
    fm_scale: tuple[bool, ...] = (False, True)
    widen_factor: float = 3.0
    widen: int = 2
    seed: int = 0

    def grid(self) -> list[Candidate]:
        """The initial candidates of both pipelines."""
        logistic = [Candidate("logistic", lr, scale)
                    for lr in self.logistic_lr for scale in self.logistic_scale]
        fm = [Candidate("fm", lr, scale, k)
              for lr in self.fm_lr for scale in self.fm_scale for k in self.fm_factors]
        return logistic + fm


def peers_record(log: EventLog, val_start: int, test_start: int, chunks: int,
                 config: PeerConfig | None = None) -> dict[str, Any]:
    """The suite's ``peers`` section: tuning and final run (``run_peers``), or
    ``{"status": "skipped", "note": SKIP_NOTE}`` when River cannot be imported."""
    try:
        import river
    except ImportError:
        return {"status": "skipped", "note": SKIP_NOTE}
    return {"status": "ran", "river": river.__version__,
            **run_peers(log, val_start, test_start, chunks, config or PeerConfig())}


def run_peers(log: EventLog, val_start: int, test_start: int, chunks: int,
              config: PeerConfig) -> dict[str, Any]:
    """Tune on validation, then replay the test slice [test_start, N); the per-pipeline
    grids, choices and test metrics (with the AUC of each of ``chunks`` test chunks)."""
    layout = FeatureLayout.fit(log.interactions[:val_start], config.features)
    started = time.perf_counter()
    grid = tune(log, layout, val_start, test_start, config)
    tuned = time.perf_counter()
    chosen = {name: best(grid, name) for name in PIPELINES}
    scores = replay(log, layout, config, list(chosen.values()), test_start, len(log))
    users, labels = _users(log, test_start, len(log)), log.labels[test_start:]
    bounds = chunk_bounds(len(labels), chunks)
    timestamps = log.timestamps()[test_start:]
    pipelines = {}
    for (name, candidate), probabilities in zip(chosen.items(), scores, strict=True):
        pipelines[name] = {
            "name": PIPELINES[name],
            "chosen": asdict(candidate),
            "describe": candidate.describe(),
            "at_edge": at_edge(grid, candidate),
            "validation": [{**asdict(c), **metrics} for c, metrics in grid.items()
                           if c.pipeline == name],
            "test": report(users, labels, probabilities),
            "chunk_auc": [auc(labels[b:e], probabilities[b:e]) for b, e in bounds],
            "chunk_end_ts": [float(timestamps[e - 1]) for _, e in bounds],
        }
    return {
        "config": asdict(config),
        "cross_fields": list(layout.cross_fields),
        "numeric_fields": list(layout.bin_edges),
        "warm_up": {"tuning": val_start, "final": test_start},
        "scored": {"validation": test_start - val_start, "test": len(log) - test_start},
        "pipelines": pipelines,
        "best": max(chosen, key=lambda name: _auc_key(grid[chosen[name]])),
        "seconds": {"tuning": tuned - started, "final": time.perf_counter() - tuned},
    }


def tune(log: EventLog, layout: FeatureLayout, val_start: int, test_start: int,
         config: PeerConfig) -> dict[Candidate, dict[str, float]]:
    """Validation metrics of every candidate tried (module docstring); reads no event at or
    after ``test_start``."""
    users, labels = _users(log, val_start, test_start), log.labels[val_start:test_start]
    results: dict[Candidate, dict[str, float]] = {}
    pending = config.grid()
    for _ in range(config.widen + 1):
        scores = replay(log, layout, config, pending, val_start, test_start)
        for candidate, probabilities in zip(pending, scores, strict=True):
            results[candidate] = report(users, labels, probabilities)
        pending = [wider for name in PIPELINES
                   for wider in _widened(results, best(results, name), config.widen_factor)]
        if not pending:
            break
    return results


def replay(log: EventLog, layout: FeatureLayout, config: PeerConfig,
           candidates: list[Candidate], score_from: int, stop: int) -> np.ndarray:
    """Fresh models of ``candidates`` learn events [0, stop) in order, all on the same dicts;
    each event from ``score_from`` on is scored by every model before any learns it.
    Returns the probabilities [len(candidates), stop - score_from]."""
    models = [build(candidate, layout.rate_keys(), config.seed) for candidate in candidates]
    probabilities = np.empty((len(models), stop - score_from), dtype=np.float64)
    for i, x in enumerate(event_features(log, layout, config.features, stop)):
        if i >= score_from:
            for k, model in enumerate(models):
                probabilities[k, i - score_from] = model.predict_proba_one(x).get(True, 0.5)
        label = bool(log.labels[i])
        for model in models:
            model.learn_one(x, label)
    return probabilities


def build(candidate: Candidate, rate_keys: tuple[str, ...], seed: int) -> Any:
    """A fresh River model of ``candidate`` (``rate_keys``: the keys ``scale`` standardizes)."""
    from river import compose, facto, linear_model, optim, preprocessing

    if candidate.pipeline == "logistic":
        model = linear_model.LogisticRegression(optimizer=optim.SGD(candidate.lr))
    elif candidate.pipeline == "fm":
        model = facto.FMClassifier(n_factors=candidate.n_factors,
                                   weight_optimizer=optim.SGD(candidate.lr),
                                   latent_optimizer=optim.SGD(candidate.lr), seed=seed)
    else:
        raise ValueError(f"unknown pipeline {candidate.pipeline!r}; known: {list(PIPELINES)}")
    if not candidate.scale:
        return model
    def pick(x: dict[str, float]) -> dict[str, float]:  # compose.Select's order is a set's
        return {key: x[key] for key in rate_keys}

    scaled = compose.FuncTransformer(pick) | preprocessing.StandardScaler()
    return compose.TransformerUnion(scaled, compose.Discard(*rate_keys)) | model


def best(results: dict[Candidate, dict[str, float]], pipeline: str) -> Candidate:
    """``pipeline``'s candidate with the highest validation AUC (the first on a tie)."""
    return max((c for c in results if c.pipeline == pipeline),
               key=lambda c: _auc_key(results[c]))


def at_edge(results: dict[Candidate, dict[str, float]], candidate: Candidate) -> bool:
    """Whether ``candidate``'s learning rate is the lowest or highest tried with its other
    parameters: the optimum may lie beyond the grid."""
    rates = _learning_rates(results, candidate)
    return candidate.lr in (rates[0], rates[-1])


def _widened(results: dict[Candidate, dict[str, float]], candidate: Candidate,
             factor: float) -> list[Candidate]:
    """The untried learning rates one step beyond ``candidate``'s when it is at an edge."""
    rates = _learning_rates(results, candidate)
    beyond = []
    if candidate.lr == rates[0]:
        beyond.append(replace(candidate, lr=float(f"{candidate.lr / factor:.3g}")))
    if candidate.lr == rates[-1]:
        beyond.append(replace(candidate, lr=float(f"{candidate.lr * factor:.3g}")))
    return [c for c in beyond if c not in results]


def _learning_rates(results: dict[Candidate, Any], candidate: Candidate) -> list[float]:
    return sorted(c.lr for c in results if replace(c, lr=candidate.lr) == candidate)


def _auc_key(metrics: dict[str, float]) -> float:
    return metrics["auc"] if math.isfinite(metrics["auc"]) else -math.inf


def _users(log: EventLog, start: int, stop: int) -> np.ndarray:
    return np.array([event.user_id for event in log.interactions[start:stop]])
