"""``deploy/claim_slot.py``: each live worker gets a state slot of its own; a slot is freed
when its holder ends, however it ends, and is taken again by the next one to start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_fixtures import REPO

pytestmark = pytest.mark.broker  # every test here starts a broker or a subprocess

SCRIPT = REPO / "deploy" / "claim_slot.py"
# The command run under the slot: prints its store and slot, then sleeps until killed.
HOLD = ["--", sys.executable, "-c",
        "import os, sys, time; print(sys.argv[1], os.environ['UNIREC_STATE_SLOT'], flush=True);"
        " time.sleep(60)", "{store}"]


def start(root: Path) -> tuple[subprocess.Popen[str], str]:
    """A holder of a slot under ``root`` and the line it printed (``STORE SLOT``)."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(root), *HOLD],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_live_holders_get_distinct_slots_and_a_killed_ones_slot_is_reused(
        tmp_path: Path) -> None:
    root = tmp_path / "state"
    holders = []
    try:
        for _ in range(3):
            holders.append(start(root))
        assert [line for _, line in holders] == [f"{root / f'slot-{n}'} {n}" for n in range(3)]
        assert all((root / f"slot-{n}").is_dir() for n in range(3))
        first, _ = holders[0]
        first.send_signal(signal.SIGKILL)  # no cleanup ran: the kernel drops the lock
        first.wait(10)
        process, line = start(root)
        holders.append((process, line))
        assert line == f"{root / 'slot-0'} 0"
    finally:
        for process, _ in holders:
            process.kill()
            process.wait(10)


def test_the_command_replaces_the_claiming_process(tmp_path: Path) -> None:
    """exec, not a child: the PID that holds the slot is the command's own."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path), "--", sys.executable, "-c",
         "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    assert int(out.strip()) == process.pid and process.returncode == 0


def test_no_free_slot_and_no_command_exit_2(tmp_path: Path) -> None:
    holder, _ = start(tmp_path)
    try:
        full = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--max-slots", "1",
                               *HOLD], capture_output=True, text=True, timeout=30)
        assert full.returncode == 2 and "all 1 state slots" in full.stderr
    finally:
        holder.kill()
        holder.wait(10)
    empty = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                           text=True, timeout=30)
    assert empty.returncode == 2 and "no command" in empty.stderr
    started = time.monotonic()
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--",
                              "no-such-command-here"], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2 and "cannot run" in missing.stderr
    assert time.monotonic() - started < 30
