"""The online learning rate, chosen on the validation slice: for each seed, a UniRec model is
trained on the training part, then fine-tuned test-then-train over the validation part
(``evaluation.prequential``, at the online learner's batch size and weight decay) at each
candidate learning rate (and, with ``--embedding-lrs``, each rate of the embedding table's
rows, ``OnlineConfig.embedding_lr``); one JSON line per (seed, learning rate, embedding rate)
with the frozen and the fine-tuned metrics (pooled AUC, GAUC, LogLoss, mean chunk AUC).

Two sizes: ``suite``, the eval suite's UniRec (its budget, capacity split and tuned learning
rate and dropout, trained its best step count, 200); ``default``, ``ModelConfig()`` trained
as ``unirec demo`` trains it (250 steps at lr 1e-3, history 50). The test period is not read.

    python -m evaluation.online_lr [--size suite|default] [--seeds 0 1 2]
                                   [--lrs 3e-5 1e-4 3e-4] [--embedding-lrs 1e-4 1e-3]
                                   [--dataset movielens-100k]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from evaluation.experiment import MODELS, Budget, make_splits
from evaluation.prequential import online_train_config, prequential
from evaluation.results_report import chunk_means
from eventlog.loaders import EventLog, load_dataset
from model.config import ModelConfig
from model.kinds import build_model
from model.online import OnlineConfig
from model.training import TrainConfig, fit, predict


@dataclass(frozen=True)
class OfflineRun:
    """How the model that is fine-tuned is built and trained: its config, the history
    length of its examples, its offline learning rate and steps."""

    config: ModelConfig
    history_len: int
    lr: float
    steps: int


def offline_run(size: str) -> OfflineRun:
    """``suite``: the eval suite's UniRec at its tuned settings; ``default``: the demo's."""
    if size == "suite":
        budget = Budget()
        return OfflineRun(budget.model_config(0.15, **MODELS[0].overrides), budget.history_len,
                          3e-3, 200)
    if size == "default":
        return OfflineRun(ModelConfig(), ModelConfig.history_len, 1e-3, 250)
    raise ValueError(f"unknown size {size!r}: suite or default")


def sweep(log: EventLog, run: OfflineRun, seeds: Sequence[int], lrs: Sequence[float],
          chunks: int = 10, device: torch.device | None = None,
          embedding_lrs: Sequence[float | None] = (None,)) -> Iterator[dict]:
    """One result per (seed, lr, embedding lr), in that order (see the module docstring);
    an embedding lr of None is ``lr``."""
    device = device or torch.device("cpu")
    splits = make_splits(log, Budget(history_len=run.history_len))
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model("unirec", run.config, splits.featurizer.spec).to(device)
        fit(model, splits.featurizer, splits.train,
            TrainConfig(lr=run.lr, batch_size=256, max_steps=run.steps, seed=seed), device)
        frozen = predict(model, splits.featurizer, splits.val, device)
        for lr, embedding_lr in itertools.product(lrs, embedding_lrs):
            online = replace(OnlineConfig(), lr=lr, embedding_lr=embedding_lr)
            record = asdict(prequential(model, splits.featurizer, splits.val, frozen,
                                        online_train_config(online, seed), chunks, device))
            yield {"seed": seed, "lr": lr, "embedding_lr": embedding_lr,
                   "frozen": record["frozen"],
                   "fine_tuned": record["fine_tuned"],
                   "mean_chunk_auc_frozen": chunk_means([record], "frozen")[0],
                   "mean_chunk_auc_fine_tuned": chunk_means([record], "fine_tuned")[0],
                   "online_steps": record["online_steps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("suite", "default"), default="suite")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    parser.add_argument("--embedding-lrs", type=float, nargs="+", default=None,
                        help="rates of the embedding table's rows (default: each --lrs value)")
    parser.add_argument("--dataset", default="movielens-100k")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = offline_run(args.size)
    for row in sweep(load_dataset(args.dataset), run, args.seeds, args.lrs,
                     embedding_lrs=args.embedding_lrs or (None,)):
        print(json.dumps({"size": args.size, **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
