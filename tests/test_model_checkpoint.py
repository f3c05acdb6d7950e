"""A checkpoint round-trips a model exactly (same config, spec, weights and so the same
scores), and any file that is not a readable checkpoint is refused with CheckpointError. The
model's signature is recorded (derived for older files), and a file of another signature is
refused with IncompatibleVersion naming the difference, before its weights are built."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_fixtures import (
    SPEC,
    cached_logits,
    config,
    fresh_model,
    inputs,
    make_request,
    max_diff,
    reference_logits,
)

from model.backbone import UniRecModel
from model.baselines import MODEL_KINDS
from model.checkpoint import CheckpointError, load, save
from model.kinds import build_model
from model.signature import IncompatibleVersion, signature_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("overrides", [{}, {"compression": "pyramid", "use_state": False}])
def test_save_then_load_gives_identical_scores(tmp_path, overrides):
    """load(save(model)) has the same config and spec, is in eval mode, and gives bit-identical
    cached and reference scores; the metadata comes back as saved. A differently initialised
    model scores differently (so the comparison can fail)."""
    model = fresh_model(seed=3, **overrides)
    path = tmp_path / "sub" / "model.pt"
    save(model, path, meta={"steps": 7, "dataset": "synthetic"})
    loaded, meta = load(path)
    assert meta == {"steps": 7, "dataset": "synthetic"}
    assert loaded.cfg == model.cfg and loaded.spec == model.spec and not loaded.training
    other = fresh_model(seed=4, **overrides)
    for seed, n_hist in enumerate((0, 5, 30)):
        user, cands = inputs(model, make_request(seed, n_hist, 4))
        assert torch.equal(cached_logits(loaded, user, cands), cached_logits(model, user, cands))
        assert torch.equal(reference_logits(loaded, user, cands),
                           reference_logits(model, user, cands))
        assert max_diff(cached_logits(other, user, cands), cached_logits(model, user, cands)) > 1e-3


def _real_checkpoint(path: Path) -> bytes:
    save(fresh_model(), path)
    return path.read_bytes()


GARBAGE = {
    "random-bytes": lambda tmp: np.random.default_rng(0).bytes(4096),
    "empty-file": lambda tmp: b"",
    "text": lambda tmp: b"definitely not a checkpoint\n",
    "truncated-checkpoint": lambda tmp: _real_checkpoint(tmp / "real.pt")[:100_000],
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_loading_a_file_that_is_not_a_checkpoint_raises_checkpoint_error(tmp_path, kind):
    """Random bytes, an empty file, a text file and a truncated checkpoint all raise
    CheckpointError naming the path (never a raw pickle/EOF/zip error)."""
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(GARBAGE[kind](tmp_path))
    with pytest.raises(CheckpointError, match=kind):
        load(path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048)
       | st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).bytes(2048)))
def test_any_bytes_that_are_not_a_checkpoint_raise_checkpoint_error(tmp_path, data):
    """Whatever the bytes (a model version may be corrupt or hostile), load raises
    CheckpointError and nothing else: torch's weights-only unpickler raises IndexError, struct
    and Unicode errors on some inputs."""
    path = tmp_path / "version.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999), flip=st.integers(0, 2**31))
def test_a_truncated_or_bit_flipped_checkpoint_raises_checkpoint_error(tmp_path, cut, flip):
    """A checkpoint cut anywhere, or with one byte changed anywhere, loads as itself or raises
    CheckpointError, never another exception."""
    real = _real_checkpoint(tmp_path / "real.pt")
    path = tmp_path / "version.pt"
    path.write_bytes(real[: int(len(real) * cut)])
    with pytest.raises(CheckpointError):
        load(path)
    changed = bytearray(real)
    changed[flip % len(real)] ^= 0xFF
    path.write_bytes(bytes(changed))
    with contextlib.suppress(CheckpointError):
        load(path)


@pytest.mark.parametrize(
    "payload",
    [[1, 2, 3], {"format": 1}, {"format": 99, "config": {}}, {"format": 1, "config": {"x": 1}}],
    ids=["a-list", "no-config", "unknown-format", "bad-config"],
)
def test_loading_a_torch_file_that_is_not_a_unirec_checkpoint_raises_checkpoint_error(
    tmp_path, payload
):
    """A valid torch file with the wrong content raises CheckpointError too."""
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load(path)


@pytest.mark.parametrize("config_change", [{"d_model": 16}, {"d_model": 30}],
                         ids=["weights-of-another-size", "invalid-config"])
def test_a_config_that_does_not_fit_or_does_not_validate_raises_checkpoint_error(
    tmp_path, config_change
):
    """A checkpoint whose weights belong to another config, or whose config fails
    ModelConfig's validation (d_model=30 with 4 heads), is refused with CheckpointError."""
    model = fresh_model()
    data = {"format": 1, "config": {**model.cfg.to_dict(), **config_change},
            "spec": model.spec.to_dict(), "state_dict": model.state_dict(), "meta": {}}
    path = tmp_path / "mismatch.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError):
        load(path)


def test_loading_a_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load(tmp_path / "absent.pt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_unreadable(tmp_path, value):
    """A version whose weights are not finite would score and update every user NaN: it
    is refused like an unreadable file, naming the weight."""
    model = fresh_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = value
    save(model, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="holds NaN or infinity"):
        load(tmp_path / "broken.pt")


# --------------------------------------------------------------------------- signatures

OTHER_MODELS = {  # reason: a model that differs from fresh_model() in that part only
    "state_width": lambda: fresh_model(d_model=64),
    "feature_spec": lambda: UniRecModel(config(), replace(SPEC, id_buckets=8192)).eval(),
    "model_config": lambda: fresh_model(core_k=8),
    "model_kind": lambda: build_model("deepfm", config(), SPEC, MODEL_KINDS).eval(),
}


def test_the_signature_is_recorded_and_derived_for_an_older_file(tmp_path):
    """save records the model's signature; a file written before signatures existed (the
    same file without it) gets the same signature derived from its kind, config and spec:
    both load under it and both are refused under another model's."""
    model = fresh_model()
    path = tmp_path / "new.pt"
    save(model, path)
    data = torch.load(path, weights_only=True)
    assert data["signature"] == signature_of(model).to_dict()
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in data.items() if k != "signature"}, old)
    for file in (path, old):
        assert load(file, expect=signature_of(model))[0].cfg == model.cfg
        with pytest.raises(IncompatibleVersion) as refused:
            load(file, expect=signature_of(OTHER_MODELS["state_width"]()))
        assert refused.value.reason == "state_width"


@pytest.mark.parametrize("reason", list(OTHER_MODELS))
def test_another_signature_is_refused_before_the_weights_are_built(tmp_path, reason):
    """A file of another state width, feature spec, config or kind raises
    IncompatibleVersion with that reason, even when its weights would not even load (so the
    check comes first); the same file loads when nothing is expected of it."""
    other = OTHER_MODELS[reason]()
    path = tmp_path / "other.pt"
    save(other, path)
    data = torch.load(path, weights_only=True)
    assert load(path, kind=None, kinds=MODEL_KINDS)[0].cfg == other.cfg
    broken = tmp_path / "broken-weights.pt"
    torch.save({**data, "state_dict": {"not": torch.zeros(1)}}, broken)
    for file in (path, broken):
        with pytest.raises(IncompatibleVersion) as refused:
            load(file, expect=signature_of(fresh_model()))
        assert refused.value.reason == reason


def test_dropout_does_not_change_the_signature(tmp_path):
    """Dropout changes no shape and is off when serving: a model that differs only there
    loads under the other's signature."""
    path = tmp_path / "dropout.pt"
    save(fresh_model(dropout=0.3), path)
    assert load(path, expect=signature_of(fresh_model()))[0].cfg.dropout == 0.3


def test_a_recorded_signature_that_contradicts_the_config_is_unreadable(tmp_path):
    """A file whose recorded signature is not the one its config and spec give (tampered,
    or written by something else) raises CheckpointError."""
    path = tmp_path / "model.pt"
    save(fresh_model(), path)
    data = torch.load(path, weights_only=True)
    data["signature"]["state_width"] = 999
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="signature"):
        load(path)
