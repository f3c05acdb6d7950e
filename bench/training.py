"""Offline training throughput of every model kind at the suite size and the default size, JSON.

    python bench/training.py [--quick] [--steps N] [--batch B] [--threads T] [--device D]

For each kind (``model.baselines.MODEL_KINDS``) and each size (``evaluation.sizes``:
``suite``, the eval suite's UniRec config, d_model 48, history 20; ``default``:
``ModelConfig()``, d_model 64, history 50), it
trains ``--steps`` AdamW steps of ``--batch`` examples on the same data, the way
``model.training.fit`` does (batch gathering from pre-built examples, the GRU state unrolled
over each history, forward, backward, clipping, the update), after two warm-up steps, and
prints examples/s with the seconds per step.

Achieved FLOP/s: the floating-point operations of one training step are counted by
``torch.utils.flop_counter.FlopCounterMode`` over one step (forward and backward; it counts
matrix multiplications, attention and convolutions, 2 FLOPs per multiply-add, and not
element-wise work or the optimizer), divided by the batch for FLOPs per example; achieved
FLOP/s = FLOPs per step / seconds per step.

``--device cuda`` trains on the GPU the way ``unirec train --device cuda`` does (fp32, the
model and every batch on the device; the carried states' pass there too) and reads every timer
after ``torch.cuda.synchronize``; ``device`` in the JSON names it.

Data: MovieLens-100K when it is cached (``UNIREC_DATA_DIR``, see README *Data*), else (and
with ``--quick``) the synthetic log of ``stream.producer.synthetic_events``; ``data`` in the
JSON says which. Every kind of one size trains on the same examples, whose feature spec is
fitted as ``unirec train`` fits it: with the log's labels and the default item-rate smoothing
(``model.item_rates``), so the models have the candidate's item-rate inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.sizes import SIZE_NAMES, model_size
from eventlog.loaders import DatasetUnavailable, load_dataset
from eventlog.log import EventLog
from model.baselines import MODEL_KINDS
from model.config import ModelConfig
from model.dataset import ExampleSet, build_examples, gather_batch
from model.features import FeatureSpec, Featurizer
from model.item_rates import DEFAULT_SMOOTHING
from model.kinds import build_model, parameter_count
from model.training import TrainConfig, example_states, guarded_step, make_optimizer
from stream.producer import synthetic_events

WARMUP_STEPS = 2


def training_log(quick: bool) -> EventLog:
    """With ``quick``, 5,000 synthetic events (a check that the benchmark runs); else
    MovieLens-100K if cached, else 50,000 synthetic events."""
    if not quick:
        try:
            return load_dataset("movielens-100k", _data_dir())
        except (DatasetUnavailable, OSError):
            pass
    pairs = list(synthetic_events(5_000 if quick else 50_000, seed=0))
    return EventLog("synthetic", [e for e, _ in pairs],
                    np.asarray([y for _, y in pairs], dtype=np.int8))


def _data_dir() -> Path | None:
    value = os.environ.get("UNIREC_DATA_DIR")
    return Path(value) if value else None


def sizes() -> dict[str, ModelConfig]:
    """The two sizes of ``evaluation.sizes``: the eval suite's UniRec config and the default
    ``ModelConfig``."""
    return {name: model_size(name).config for name in SIZE_NAMES}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(kind: str, cfg: ModelConfig, featurizer: Featurizer, examples: ExampleSet,
            steps: int, batch: int, device: torch.device) -> dict:
    """examples/s, seconds per step and FLOPs of ``steps`` training steps of ``kind`` on
    ``examples`` (built with ``cfg.history_len``), on ``device``."""
    torch.manual_seed(0)
    model = build_model(kind, cfg, featurizer.spec, MODEL_KINDS).to(device).train()
    optimizer = make_optimizer(model, TrainConfig())
    rng = np.random.default_rng(0)
    refresh = TrainConfig().state_refresh_steps
    taken, carried = 0, None

    def step() -> None:
        nonlocal taken, carried
        if taken % refresh == 0:  # the carried states' pass, as often as ``fit`` makes it
            carried = example_states(model, examples)
        taken += 1
        rows = rng.choice(len(examples), size=batch, replace=False)
        user, cands = gather_batch(examples, featurizer, rows, cfg.d_model, carried)
        labels = torch.from_numpy(examples.labels[rows].astype(np.float32))
        guarded_step(model, optimizer, user.to(device), cands.to(device), labels.to(device))

    for _ in range(WARMUP_STEPS):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    per_step = (time.perf_counter() - start) / steps
    return {
        "parameters": parameter_count(model),
        "examples_per_s": round(batch / per_step, 1),
        "seconds_per_step": round(per_step, 4),
        "flops_per_example": int(flops // batch),
        "achieved_gflop_per_s": round(flops / per_step / 1e9, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 steps of 32 on 5,000 synthetic events")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--kinds", nargs="+", default=list(MODEL_KINDS),
                        choices=list(MODEL_KINDS))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"--device {args.device}: {exc}")
    steps, batch = (3, 32) if args.quick else (args.steps, args.batch)
    torch.set_num_threads(args.threads)
    log = training_log(args.quick)
    featurizer = Featurizer(FeatureSpec.fit(log.interactions, log.profiles.values(),
                                            labels=log.labels,
                                            item_rate_smoothing=DEFAULT_SMOOTHING))
    results = {}
    for size, cfg in sizes().items():
        examples = build_examples(log, featurizer, cfg.history_len,
                                  affinity_len=cfg.affinity_len)
        results[size] = {kind: measure(kind, replace(cfg), featurizer, examples, steps,
                                         batch, device)
                         for kind in args.kinds}
    print(json.dumps({
        "data": {"name": log.name, "events": len(log)},
        "steps": steps, "batch": batch, "torch_threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "machine": platform.machine(),
        "sizes": {name: {"d_model": cfg.d_model, "history_len": cfg.history_len}
                  for name, cfg in sizes().items()},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
