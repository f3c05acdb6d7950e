"""The online learning-rate sweep on the validation slice: one row per (seed, lr, embedding
lr), every row of a seed fine-tunes the same trained model, at lr 0 fine-tuning is the frozen
model (its metrics to 1e-9: chunked float32 scores of averaged weights can differ from the
whole slice's in the last bit), and the embedding rows alone move it when only their rate is
above 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.online_lr import sweep
from evaluation.sizes import ModelSize
from eventlog.loaders import load_events
from model.config import ModelConfig
from tests.test_cli import _write_events

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelSize(ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, n_layers=2,
                             layer_widths=(1.0, 0.5)), 1e-3, 3)


def test_rows_per_seed_and_lr_share_the_frozen_model_and_lr_zero_changes_nothing(
        tmp_path: Path) -> None:
    log = load_events(_write_events(tmp_path / "tiny.parquet", n_users=16, per_user=15))
    rows = list(sweep(log, TINY, seeds=[0, 1], lrs=[0.0, 1e-2], chunks=3))
    assert [(r["seed"], r["lr"]) for r in rows] == [(0, 0.0), (0, 1e-2), (1, 0.0), (1, 1e-2)]
    for zero, high in (rows[0:2], rows[2:4]):
        assert zero["frozen"] == high["frozen"]
        assert zero["fine_tuned"] == pytest.approx(zero["frozen"], abs=1e-9)
        assert zero["online_steps"] == high["online_steps"] > 0
        assert high["fine_tuned"] != high["frozen"]


def test_an_embedding_rate_alone_fine_tunes_and_rows_cover_every_pair(tmp_path: Path) -> None:
    log = load_events(_write_events(tmp_path / "tiny.parquet", n_users=16, per_user=15))
    rows = list(sweep(log, TINY, seeds=[0], lrs=[0.0], chunks=3, embedding_lrs=[0.0, 1e-2]))
    assert [(r["lr"], r["embedding_lr"]) for r in rows] == [(0.0, 0.0), (0.0, 1e-2)]
    assert rows[0]["fine_tuned"] == pytest.approx(rows[0]["frozen"], abs=1e-9)
    assert rows[1]["fine_tuned"] != rows[1]["frozen"]
