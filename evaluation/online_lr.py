"""The online learning rate, chosen on the validation slice: for each seed, a UniRec model is
trained on the training part, then fine-tuned test-then-train over the validation part
(``evaluation.prequential``, at the online learner's batch size and weight decay) at each
candidate learning rate (and, with ``--embedding-lrs``, each rate of the embedding table's
rows, ``OnlineConfig.embedding_lr``); one JSON line per (seed, learning rate, embedding rate)
with the frozen and the fine-tuned metrics (pooled AUC, GAUC, LogLoss, mean chunk AUC). The
fine-tuned arm also counts the labels into its item-rate table, as the online learner does;
``--no-item-counts`` turns that off, to see the weights' share alone.

The model is one of ``evaluation.sizes``: ``suite`` (the eval suite's UniRec, which
``unirec demo`` trains) or ``default`` (``ModelConfig()``). The test period is not read.

    python -m evaluation.online_lr [--size suite|default] [--seeds 0 1 2]
                                   [--lrs 3e-5 1e-4 3e-4] [--embedding-lrs 1e-4 1e-3]
                                   [--no-item-counts] [--dataset movielens-100k]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace

import torch

from evaluation.experiment import Budget, make_splits
from evaluation.prequential import online_train_config, prequential
from evaluation.results_report import chunk_means
from evaluation.sizes import SIZE_NAMES, ModelSize, model_size
from eventlog.loaders import EventLog, load_dataset
from model.kinds import build_model
from model.online import OnlineConfig
from model.training import TrainConfig, fit, predict


def sweep(log: EventLog, size: ModelSize, seeds: Sequence[int], lrs: Sequence[float],
          chunks: int = 10, device: torch.device | None = None,
          embedding_lrs: Sequence[float | None] = (None,),
          online: OnlineConfig | None = None) -> Iterator[dict]:
    """One result per (seed, lr, embedding lr), in that order (see the module docstring);
    an embedding lr of None is ``lr``. ``online``: the learner's other settings (default
    ``OnlineConfig()``)."""
    device = device or torch.device("cpu")
    splits = make_splits(log, Budget(history_len=size.config.history_len,
                                     affinity_len=size.config.affinity_len))
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model("unirec", size.config, splits.featurizer.spec).to(device)
        fit(model, splits.featurizer, splits.train,
            TrainConfig(lr=size.lr, batch_size=256, max_steps=size.steps, seed=seed), device)
        frozen = predict(model, splits.featurizer, splits.val, device)
        for lr, embedding_lr in itertools.product(lrs, embedding_lrs):
            cfg = replace(online or OnlineConfig(), lr=lr, embedding_lr=embedding_lr)
            record = asdict(prequential(model, splits.featurizer, splits.val, frozen,
                                        online_train_config(cfg, seed), chunks, device,
                                        cfg.count_item_labels))
            yield {"seed": seed, "lr": lr, "embedding_lr": embedding_lr,
                   "count_item_labels": cfg.count_item_labels,
                   "frozen": record["frozen"],
                   "fine_tuned": record["fine_tuned"],
                   "mean_chunk_auc_frozen": chunk_means([record], "frozen")[0],
                   "mean_chunk_auc_fine_tuned": chunk_means([record], "fine_tuned")[0],
                   "online_steps": record["online_steps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZE_NAMES, default="suite")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    parser.add_argument("--embedding-lrs", type=float, nargs="+", default=None,
                        help="rates of the embedding table's rows (default: each --lrs value)")
    parser.add_argument("--no-item-counts", action="store_true",
                        help="the fine-tuned arm counts no labels into its item-rate table")
    parser.add_argument("--dataset", default="movielens-100k")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for row in sweep(load_dataset(args.dataset), model_size(args.size), args.seeds, args.lrs,
                     embedding_lrs=args.embedding_lrs or (None,),
                     online=OnlineConfig(count_item_labels=not args.no_item_counts)):
        print(json.dumps({"size": args.size, **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
