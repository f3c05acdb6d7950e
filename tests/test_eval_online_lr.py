"""The online learning-rate sweep on the validation slice: one row per (seed, lr, embedding
lr), every row of a seed fine-tunes the same trained model, at lr 0 and with no labels counted
into the item-rate table fine-tuning is the frozen model (its metrics to FLOAT32_METRIC: the
fine-tuned arm scores chunk by chunk, the frozen one the whole slice at once, and float32
products over other batch shapes differ in the last bits), and the embedding rows alone move
it when only their rate is above 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.online_lr import sweep
from evaluation.sizes import ModelSize
from eventlog.loaders import load_events
from model.config import ModelConfig
from model.online import OnlineConfig
from tests.test_cli import _write_events

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOAT32_METRIC = 1e-6  # float32 rounding of the same weights' scores, batched differently
TINY = ModelSize(ModelConfig(d_model=16, n_heads=2, history_len=8, core_k=4, n_layers=2,
                             layer_widths=(1.0, 0.5)), 1e-3, 3)


def test_rows_per_seed_and_lr_share_the_frozen_model_and_lr_zero_changes_nothing(
        tmp_path: Path) -> None:
    log = load_events(_write_events(tmp_path / "tiny.parquet", n_users=16, per_user=15))
    rows = list(sweep(log, TINY, seeds=[0, 1], lrs=[0.0, 1e-2], chunks=3,
                      online=OnlineConfig(count_item_labels=False)))
    assert [(r["seed"], r["lr"]) for r in rows] == [(0, 0.0), (0, 1e-2), (1, 0.0), (1, 1e-2)]
    for zero, high in (rows[0:2], rows[2:4]):
        assert zero["frozen"] == high["frozen"]
        assert zero["fine_tuned"] == pytest.approx(zero["frozen"], abs=FLOAT32_METRIC)
        assert zero["online_steps"] == high["online_steps"] > 0
        assert high["fine_tuned"] != pytest.approx(high["frozen"], abs=FLOAT32_METRIC)


def test_an_embedding_rate_alone_fine_tunes_and_rows_cover_every_pair(tmp_path: Path) -> None:
    log = load_events(_write_events(tmp_path / "tiny.parquet", n_users=16, per_user=15))
    rows = list(sweep(log, TINY, seeds=[0], lrs=[0.0], chunks=3, embedding_lrs=[0.0, 1e-2],
                      online=OnlineConfig(count_item_labels=False)))
    assert [(r["lr"], r["embedding_lr"]) for r in rows] == [(0.0, 0.0), (0.0, 1e-2)]
    assert rows[0]["fine_tuned"] == pytest.approx(rows[0]["frozen"], abs=FLOAT32_METRIC)
    assert rows[1]["fine_tuned"] != pytest.approx(rows[1]["frozen"], abs=FLOAT32_METRIC)
