"""W8A16 against fp32 on a trained checkpoint: test-period AUC, GAUC, LogLoss, and sizes, JSON.

    python bench/w8a16_auc.py --checkpoint runs/movielens-100k/model.pt [--dataset movielens-100k]

Evaluates the checkpoint's model as trained (fp32) and its ``model.quantize.quantize_w8a16``
copy (what ``unirec worker --quantize w8a16`` scores with on the CPU: its matmuls in bf16 where
the CPU computes bf16 natively, the rest in fp32) on the test
period of the data set (the time split the checkpoint was trained with), the same way
``unirec eval`` does (``evaluation.quickstart.evaluate_on_log``). Reports both metric sets,
the AUC difference, the bytes of the weights (parameters and buffers, what ``torch.save``
writes) and of a saved state dict of each, and the resident memory the quantized weights save.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.quickstart import evaluate_on_log
from eventlog.loaders import load_dataset
from model.checkpoint import load
from model.quantize import native_bf16, quantize_w8a16, weight_bytes

AUC_TOLERANCE = 0.001


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, meta = load(args.checkpoint, device)
    log = load_dataset(args.dataset, args.data_dir)
    fraction = meta.get("train_fraction", 0.8)
    fp32 = evaluate_on_log(model, log, device, fraction)
    quantized = quantize_w8a16(model)
    w8a16 = evaluate_on_log(quantized, log, device, fraction)  # type: ignore[arg-type]
    diff = abs(w8a16["auc"] - fp32["auc"])
    print(json.dumps({
        "checkpoint": str(args.checkpoint),
        "w8a16_matmul_dtype": "bf16" if native_bf16(device) else "fp32",
        "dataset": args.dataset,
        "fp32": fp32,
        "w8a16": w8a16,
        "auc_abs_diff": diff,
        "auc_within_tolerance": diff <= AUC_TOLERANCE,
        "weight_bytes": {"fp32": weight_bytes(model), "w8a16": weight_bytes(quantized)},
        "state_dict_bytes": {"fp32": saved_bytes(model), "w8a16": saved_bytes(quantized)},
        "resident_bytes_saved": weight_bytes(model) - weight_bytes(quantized),
    }, indent=2, default=float))


if __name__ == "__main__":
    main()
