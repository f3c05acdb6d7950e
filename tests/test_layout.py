"""The repository's layout: dependencies flow one way, and the serving path imports neither
the offline evaluation nor the baselines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

REPO = Path(__file__).resolve().parents[1]


def imported_after(statement: str) -> set[str]:
    """The top-level project modules a fresh interpreter has loaded after ``statement``."""
    code = (f"import sys; {statement}; "
            "print('\\n'.join(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return set(out.split())


def test_the_worker_imports_no_evaluation_no_baselines_and_no_application_shell() -> None:
    loaded = imported_after("import stream.worker")
    assert not {m for m in loaded if m.split(".")[0] in ("evaluation", "app")}
    assert not {m for m in loaded if m.startswith("model.baselines")}


def test_model_state_store_and_eventlog_never_import_the_stream() -> None:
    loaded = imported_after("import model.checkpoint, model.online, state_store, eventlog.loaders")
    assert not {m for m in loaded if m.split(".")[0] in ("stream", "evaluation", "app")}
    assert not {m for m in imported_after("import state_store")
                if m.split(".")[0] in ("model", "eventlog", "stream")}
