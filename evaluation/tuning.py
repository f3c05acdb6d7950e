"""Hyperparameter tuning on the validation slice (between train and test in time).

A coordinate search that brackets each model's optimum: the learning rate first, over
``LEARNING_RATES`` at the middle dropout, then the dropout over ``DROPOUTS`` at the best
learning rate. Whenever the best point of a coordinate is at an edge of what was tried, the
next value past that edge is tried too (learning rates x3 or /3, dropout +-0.15 within [0,
``MAX_DROPOUT``]), up to ``MAX_EXTENSIONS`` times per coordinate, so the choice is inside the
tried range unless a bound stops it (the record says so). One seeded run per point and model
kind, each stopping early on validation (``evaluation.experiment.ValidationCurve``), chosen by
validation AUC. The choice is written to a JSON file that normal suite runs read; ablations
use the ``unirec`` choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from evaluation.experiment import MODELS, Budget, Hyper, Splits, Variant, run_one

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
DROPOUTS = (0.0, 0.15, 0.3)
LR_FACTOR = 3.0
DROPOUT_STEP = 0.15
MAX_DROPOUT = 0.6
MAX_EXTENSIONS = 2
RUNS_PER_MODEL = len(LEARNING_RATES) + len(DROPOUTS) - 1  # without extensions
TUNING_SEED = 0


def _bracket(values: list[float], score: Callable[[float], float], beyond: Callable[[float, int],
             float | None]) -> float:
    """The best of ``values`` by ``score``, trying ``beyond(edge, direction)`` (direction -1
    below the smallest value, +1 above the largest; None: nothing there) while the best is at
    an edge, at most ``MAX_EXTENSIONS`` times."""
    tried = {v: score(v) for v in sorted(values)}
    for _ in range(MAX_EXTENSIONS):
        best = max(tried, key=tried.__getitem__)
        ordered = sorted(tried)
        direction = -1 if best == ordered[0] else 1 if best == ordered[-1] else 0
        nxt = beyond(best, direction) if direction else None
        if nxt is None or nxt in tried:
            break
        tried[nxt] = score(nxt)
    return max(tried, key=tried.__getitem__)


def tune(splits: Splits, budget: Budget, widths: dict[str, int], device: torch.device,
         on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the search for every model kind; returns the record ``save_tuning`` writes.

    ``widths``: each kind's matched ``d_model``. ``on_run(label)`` is called after each run.
    """
    steps = budget.tune_steps or budget.steps
    models = {variant.kind: _search(variant, splits, budget, widths[variant.kind], device,
                                    steps, on_run) for variant in MODELS}
    return {"dataset": splits.log.name, "budget": {**asdict(budget), "steps": steps},
            "seed": TUNING_SEED, "models": models}


def _search(variant: Variant, splits: Splits, budget: Budget, d_model: int,
            device: torch.device, steps: int, on_run: Callable[[str], None] | None
            ) -> dict[str, Any]:
    """One model kind's coordinate search: its chosen point and every point tried."""
    grid: list[dict[str, float]] = []
    seen: dict[tuple[float, float], float] = {}

    def val_auc(lr: float, dropout: float) -> float:
        key = (round(lr, 10), round(dropout, 4))
        if key not in seen:
            result = run_one(variant, Hyper(*key), TUNING_SEED, splits, budget, d_model,
                             device, on_val=True, steps=steps)
            seen[key] = result.metrics["auc"]
            grid.append({"lr": key[0], "dropout": key[1], "val_auc": seen[key],
                         "steps": result.steps})
            if on_run is not None:
                on_run(f"tune {variant.name} lr={lr:g} dropout={dropout:g}")
        return seen[key]

    middle = DROPOUTS[len(DROPOUTS) // 2]
    lr = _bracket(list(LEARNING_RATES), lambda v: val_auc(v, middle),
                  lambda edge, d: edge * LR_FACTOR ** d)
    dropout = _bracket(list(DROPOUTS), lambda v: val_auc(lr, v), _next_dropout)
    key = (round(lr, 10), round(dropout, 4))
    best = next(p for p in grid if (p["lr"], p["dropout"]) == key)
    return {**best, "grid": grid}


def _next_dropout(edge: float, direction: int) -> float | None:
    value = round(edge + direction * DROPOUT_STEP, 4)
    return value if 0.0 <= value <= MAX_DROPOUT else None


def save_tuning(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_tuning(path: Path) -> dict[str, Hyper] | None:
    """Each model kind's chosen ``Hyper`` from ``path``, or None when there is no file."""
    if not path.is_file():
        return None
    models = json.loads(path.read_text())["models"]
    return {kind: Hyper(lr=m["lr"], dropout=m["dropout"]) for kind, m in models.items()}
