"""Hyperparameter tuning on the validation slice (between train and test in time).

The grid is the UniRec paper's: learning rate {1e-4, 3e-4, 1e-3} x dropout {0.1, 0.2, 0.3},
one seeded run per point and model kind, chosen by validation AUC. The choice is written to a
JSON file that normal suite runs read; ablations use the ``unirec`` choice.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from evaluation.experiment import MODELS, Budget, Hyper, Splits, run_one

GRID_LR = (1e-4, 3e-4, 1e-3)
GRID_DROPOUT = (0.1, 0.2, 0.3)
GRID = tuple(itertools.product(GRID_LR, GRID_DROPOUT))
TUNING_SEED = 0


def tune(splits: Splits, budget: Budget, widths: dict[str, int], device: torch.device,
         on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the grid for every model kind; returns the record ``save_tuning`` writes.

    ``widths``: each kind's matched ``d_model``. ``on_run(label)`` is called after each run.
    """
    steps = budget.tune_steps or budget.steps
    models: dict[str, Any] = {}
    for variant in MODELS:
        grid = []
        for lr, dropout in GRID:
            result = run_one(variant, Hyper(lr, dropout), TUNING_SEED, splits, budget,
                             widths[variant.kind], device, on_val=True, steps=steps)
            grid.append({"lr": lr, "dropout": dropout, "val_auc": result.metrics["auc"]})
            if on_run is not None:
                on_run(f"tune {variant.name} lr={lr:g} dropout={dropout:g}")
        best = max(grid, key=lambda point: point["val_auc"])
        models[variant.kind] = {**best, "grid": grid}
    return {"dataset": splits.log.name, "budget": {**asdict(budget), "steps": steps},
            "seed": TUNING_SEED, "models": models}


def save_tuning(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_tuning(path: Path) -> dict[str, Hyper] | None:
    """Each model kind's chosen ``Hyper`` from ``path``, or None when there is no file."""
    if not path.is_file():
        return None
    models = json.loads(path.read_text())["models"]
    return {kind: Hyper(lr=m["lr"], dropout=m["dropout"]) for kind, m in models.items()}
