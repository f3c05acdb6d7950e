"""``unirec eval-suite``: the whole evaluation table of docs/model.md's protocol on one event log.

For every variant (the four models and UniRec's ablations) and every seed: train under the
matched budget on the training part, score the test part. For the four models, also run the
prequential evaluation (frozen vs fine-tuned) over the test period, fine-tuning with the
worker's online learner settings (``ONLINE``: its learning rate, batch size and weight decay,
the same for every model), and replay the same test
events through the online River peers (``evaluation.river_peers``; skipped, with a note, when
River is not installed or ``peers`` is off). Hyperparameters come from the tuning file
(``--tune`` reruns the grid first). Writes ``<out>/<log name>.md``,
``.png`` and ``.json``; returns the JSON record. A hand-kept ``<out>/<log name>.changes.md``
(what was changed in the model or the protocol and what each change measured) goes into the
report as it is.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from evaluation.experiment import (
    MODELS,
    VARIANTS,
    Budget,
    Hyper,
    make_splits,
    matched_width,
    run_one,
)
from evaluation.prequential import online_train_config, prequential
from evaluation.results_report import write_report
from evaluation.river_peers import peers_record
from evaluation.tuning import RUNS_PER_MODEL, load_tuning, save_tuning, tune
from eventlog.log import EventLog
from model.kinds import build_model, parameter_count
from model.online import OnlineConfig

ONLINE = OnlineConfig()
"""The prequential fine-tuning: the settings the worker's online learner runs with."""

Progress = Callable[[int, int, str], None]  # (runs done, runs in all, what just finished)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads)")


def run_suite(log: EventLog, budget: Budget, out_dir: Path, device: torch.device,
              retune: bool = False, on_run: Progress | None = None,
              peers: bool = True) -> dict[str, Any]:
    """Run the table (after the tuning grid when ``retune``), then the River peers (when
    ``peers``), and write the report files."""
    started = time.perf_counter()
    splits = make_splits(log, budget)
    spec = splits.featurizer.spec
    target = parameter_count(build_model("unirec", budget.model_config(0.0, **MODELS[0].overrides),
                                         spec))
    widths = {v.kind: matched_width(v.kind, budget, spec, target) for v in MODELS}
    total = len(VARIANTS) * budget.seeds + (RUNS_PER_MODEL * len(MODELS) if retune else 0) + 1
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if on_run is not None:
            on_run(done, total, label)

    tuning_path = out_dir / f"{log.name}.tuning.json"
    if retune:
        save_tuning(tune(splits, budget, widths, device, step), tuning_path)
    tuned = load_tuning(tuning_path)
    hypers = tuned or {v.kind: Hyper() for v in MODELS}
    rows, online = [], {}
    for variant in VARIANTS:
        hyper = hypers[variant.kind]
        runs, preq = [], []
        for seed in range(budget.seeds):
            result = run_one(variant, hyper, seed, splits, budget, widths[variant.kind], device)
            if variant in MODELS:
                preq.append(asdict(prequential(result.model, splits.featurizer, splits.test,
                                               result.probabilities,
                                               online_train_config(ONLINE, seed),
                                               budget.chunks, device,
                                               ONLINE.count_item_labels)))
            runs.append({"seed": seed, **result.metrics, "seconds": result.seconds,
                         "train_seconds": result.train_seconds, "steps": result.steps,
                         "curve": result.curve})
            step(f"{variant.name} seed {seed}")
        rows.append({"name": variant.name, "kind": variant.kind, "claim": variant.claim,
                     "overrides": {k: str(v) for k, v in variant.overrides.items()},
                     "d_model": widths[variant.kind], "lr": hyper.lr, "dropout": hyper.dropout,
                     "parameters": result.parameters,
                     "embedding_parameters": result.embedding_parameters,
                     "runs": runs})
        if preq:
            online[variant.name] = preq
    val_start = len(splits.train)
    if peers:
        peer_section = peers_record(log, val_start, val_start + len(splits.val), budget.chunks)
    else:
        peer_section = {"status": "skipped", "note": "not run (unirec eval-suite --no-peers)"}
    step("river peers")
    record = {
        "dataset": log.name,
        "events": len(log),
        "split": {"train": len(splits.train), "validation": len(splits.val),
                  "test": len(splits.test)},
        "budget": asdict(budget),
        "device": device_name(device),
        "hyperparameters": "tuned: " + tuning_path.name if tuned else "untuned defaults",
        "variants": rows,
        "prequential": online,
        "online_config": asdict(ONLINE),
        "peers": peer_section,
        "changes": changes.read_text() if (changes := out_dir / f"{log.name}.changes.md"
                                            ).is_file() else None,
        "wall_seconds": time.perf_counter() - started,
    }
    write_report(record, out_dir)
    return record
