"""Named UniRec sizes: a model config with the offline learning rate and step count it is
trained at. ``unirec train --size``, ``unirec demo --size`` and ``evaluation.online_lr`` read
them here.

- ``suite``: the eval suite's UniRec on MovieLens-100K (``Budget``: d 48, history 20, the
  candidates' affinity over the newest 300 events, core k 8; the capacity split
  ``UNIREC_CAPACITY``: two layers, the second at half the S width), at its tuned learning
  rate 3e-4 and dropout 0 (``reports/movielens-100k.tuning.json``, the grid of 2026-12-02,
  with the item rates) and its best step count on validation in that grid, 225. 35 to 70 s
  of training on 2 AVX2 cores, as loaded (35 s on 2026-12-02, quiet).
- ``default``: ``ModelConfig()`` (d 64, history 50, eight layers) at lr 1e-3 for 250 steps.
  About 4.4 min on 2 AVX2 cores, and no better on the test period (docs/model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.experiment import UNIREC_CAPACITY, Budget
from model.config import ModelConfig

SIZE_NAMES = ("suite", "default")


@dataclass(frozen=True)
class ModelSize:
    """A UniRec config, and the offline learning rate and steps it is trained at."""

    config: ModelConfig
    lr: float
    steps: int


def model_size(name: str) -> ModelSize:
    """The size called ``name`` (``SIZE_NAMES``); ValueError for any other name."""
    if name == "suite":
        return ModelSize(Budget().model_config(0.0, **UNIREC_CAPACITY), 3e-4, 225)
    if name == "default":
        return ModelSize(ModelConfig(), 1e-3, 250)
    raise ValueError(f"unknown size {name!r}: one of {', '.join(SIZE_NAMES)}")
