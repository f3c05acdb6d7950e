"""CUDA scores equal CPU scores to bf16 tolerance, JSON; exits 1 when they do not.

    python bench/gpu_check.py [--device cuda] [--n 64 256 512] [--candidates 16 128 512]

For each (n, C) it scores the same requests (``bench/scoring.py``'s synthetic requests, a
seeded model) with ``Scorer`` on the CPU in fp32 (the reference) and on ``--device`` (bf16
autocast on CUDA), cached and reference paths, plain and W8A16, and checks that every
probability is within ``--tol`` of the CPU fp32 one. On a machine without a GPU,
``--device cpu --quantize w8a16`` runs the same comparison on the CPU (tests use it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoring import Catalog, fit_spec, make_request

from model.backbone import UniRecModel
from model.config import ModelConfig
from model.scorer import BF16_TOLERANCE, Scorer


def compare(device: torch.device, n: int, n_cands: int, modes: list[str], batch: int,
            seed: int = 0) -> list[dict]:
    """Rows (mode, path, max |p_device - p_cpu_fp32|) for ``batch`` requests at (n, C)."""
    rng = np.random.default_rng(seed)
    catalog = Catalog(rng)
    spec = fit_spec(rng, catalog)
    torch.manual_seed(seed)
    model = UniRecModel(replace(ModelConfig(), history_len=n), spec)
    requests = [make_request(rng, catalog, n, n_cands, model.cfg.d_model) for _ in range(batch)]
    args = [list(col) for col in zip(*(r.args() for r in requests), strict=True)]
    cpu = Scorer(model, torch.device("cpu"), max_batch=batch)
    rows = []
    for reference in (False, True):
        expected = cpu.score_many(*args, reference=reference)
        for mode in modes:
            scorer = Scorer(model, device, max_batch=batch, quantize=mode)
            got = scorer.score_many(*args, reference=reference)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))
            rows.append({"n": n, "candidates": n_cands, "quantize": mode,
                         "path": "reference" if reference else "cached",
                         "max_abs_diff_vs_cpu_fp32": diff})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--quantize", nargs="+", default=["none", "w8a16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tol", type=float, default=BF16_TOLERANCE)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [row for n in args.n for c in args.candidates
            for row in compare(device, n, c, args.quantize, args.batch)]
    worst = max(r["max_abs_diff_vs_cpu_fp32"] for r in rows)
    print(json.dumps({"device": str(device), "tol": args.tol, "max_abs_diff": worst,
                      "ok": worst <= args.tol, "rows": rows}, indent=2))
    if worst > args.tol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
