"""VersionStore: versions are numbered and pruned, a kill during a save leaves the previous
version the latest loadable one, and a corrupt newest version is skipped with a log line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_fixtures import fresh_model

from model.checkpoint import CheckpointError
from model.versions import VersionStore

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_publish_numbers_versions_and_keeps_the_newest(tmp_path):
    """Versions count up from 1, each loads back with its weights and metadata, only the
    newest ``keep`` files stay, and a new store on the same directory continues the count."""
    store = VersionStore(tmp_path, keep=2)
    assert store.latest() is None
    models = [fresh_model(seed) for seed in range(3)]
    assert [store.publish(m, {"steps": 10 * i}) for i, m in enumerate(models)] == [1, 2, 3]
    assert store.versions() == [2, 3]
    assert store.latest() == (3, store.path(3))
    loaded, meta = store.load(3)
    assert meta == {"steps": 20, "version": 3} and same_weights(loaded, models[2])
    assert not same_weights(loaded, models[1])
    with pytest.raises(CheckpointError):
        store.load(1)
    assert VersionStore(tmp_path, keep=2).publish(models[0]) == 4


KILLERS = {
    # killed after the whole temporary file is written, before it is synced and renamed
    "before-rename": "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)",
    # killed half-way through writing the temporary file
    "mid-write": textwrap.dedent("""
        def partial(obj, f):
            f.write(b"PK\\x03\\x04" + bytes(4096))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = partial
    """),
}


@pytest.mark.broker
@pytest.mark.parametrize("when", list(KILLERS))
def test_a_kill_during_save_leaves_the_previous_version_loadable(tmp_path, when):
    """A publisher process SIGKILLed while saving version 2 leaves a temporary file behind
    (so the kill did land mid-save) and version 1 as the latest loadable version; the next
    publish takes version 2 and clears the leftover."""
    store = VersionStore(tmp_path, keep=3)
    first = fresh_model(0)
    assert store.publish(first) == 1
    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, sys.argv[2])
        from model_fixtures import fresh_model
        from model.versions import VersionStore
        model = fresh_model(1)
    """) + KILLERS[when] + "\nVersionStore(Path(sys.argv[1])).publish(model)\n"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(TESTS)],
                          capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    leftovers = list(tmp_path.glob(".v00000002.pt.*.tmp"))
    assert len(leftovers) == 1 and store.versions() == [1]
    assert store.latest() == (1, store.path(1))
    assert same_weights(store.load(1)[0], first)
    assert store.publish(fresh_model(2)) == 2
    assert not leftovers[0].exists() and store.latest() == (2, store.path(2))


def test_a_corrupt_newest_version_is_skipped_with_one_log_line(tmp_path, caplog):
    """Version 3 truncated and version 4 random bytes: latest() is version 2, each bad file
    is logged once (a second latest() reads nothing again), and a repaired file is seen."""
    store = VersionStore(tmp_path, keep=5)
    for seed in range(3):
        store.publish(fresh_model(seed))
    good = store.path(3).read_bytes()
    store.path(3).write_bytes(good[: len(good) // 2])
    store.path(4).write_bytes(os.urandom(2048))
    with caplog.at_level(logging.ERROR, logger="model.versions"):
        assert store.latest() == (2, store.path(2))
        assert store.latest() == (2, store.path(2))
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert "model version 4" in skipped[0] and "model version 3" in skipped[1]
    store.path(4).unlink()
    store.path(3).write_bytes(good)
    assert store.latest() == (3, store.path(3))


def test_publish_at_least_moves_the_numbering_forward_and_never_back(tmp_path):
    """A publisher that has seen version 10 announced elsewhere publishes 10 next, then 11;
    an ``at_least`` below the directory's next number changes nothing."""
    store = VersionStore(tmp_path)
    assert store.publish(fresh_model(0)) == 1
    assert store.publish(fresh_model(1), at_least=10) == 10
    assert store.publish(fresh_model(2), at_least=3) == 11
    assert store.versions() == [1, 10, 11] and store.load(10)[1]["version"] == 10
