"""Run a command with a state directory of its own, claimed on a volume that replicas share.

    python deploy/claim_slot.py /state -- unirec worker --store {store} ...

Why: ``docker compose`` gives every replica of a service the same volume spec, and a
replica's hostname is its container id, which changes whenever the container is recreated
(an upgrade, ``up --force-recreate``). So the workers share one volume, and each one claims a
numbered slot on it.

Contract:

- the slot is the lowest ``N`` in ``0 .. max_slots - 1`` whose lock file ``ROOT/slot-N.lock``
  this process can lock exclusively (``flock``, non-blocking); its directory is
  ``ROOT/slot-N`` (created if missing);
- every ``{store}`` in the command's arguments is replaced by that directory, every ``{slot}``
  by ``N``, and ``UNIREC_STATE_SLOT=N`` is set in its environment;
- the command replaces this process (``exec``) and inherits the locked descriptor, so the slot
  is held exactly as long as the command runs and is freed by the kernel however it ends
  (exit, crash, SIGKILL, a stopped container). Two live processes never hold one slot;
- a recreated replica takes the lowest free slot back, with the state stored there: after
  ``docker compose up`` with N replicas, slots ``0 .. N-1`` are in use again, not necessarily
  by the same replica numbers. The offsets stored with the state say which partitions each
  slot has applied, so which slot a worker gets does not matter to correctness;
- exit status 2 with one line on stderr if no slot is free or the command is missing.

``flock`` needs every holder on one kernel: a local Docker volume (one host) works; on a
network file system check that it supports ``flock`` before sharing one volume across hosts.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

DEFAULT_MAX_SLOTS = 64


def claim(root: Path, max_slots: int = DEFAULT_MAX_SLOTS) -> tuple[int, int]:
    """Lock the lowest free slot under ``root``: ``(slot, locked file descriptor)``.

    The descriptor stays open (and the slot locked) until it is closed or the process ends.
    Raises ``RuntimeError`` when all ``max_slots`` slots are held.
    """
    root.mkdir(parents=True, exist_ok=True)
    for slot in range(max_slots):
        fd = os.open(root / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        (root / f"slot-{slot}").mkdir(exist_ok=True)
        return slot, fd
    raise RuntimeError(f"all {max_slots} state slots under {root} are held")


def expand(command: list[str], store: Path, slot: int) -> list[str]:
    """``command`` with ``{store}`` and ``{slot}`` replaced in every argument."""
    return [arg.replace("{store}", str(store)).replace("{slot}", str(slot)) for arg in command]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s ROOT [--max-slots N] -- COMMAND...")
    parser.add_argument("root", type=Path, help="the shared state volume")
    parser.add_argument("--max-slots", type=int, default=DEFAULT_MAX_SLOTS)
    args = parser.parse_args(ours)
    if not command:
        print("claim_slot: no command given (after --)", file=sys.stderr)
        return 2
    try:
        slot, fd = claim(args.root, args.max_slots)
    except (RuntimeError, OSError) as exc:
        print(f"claim_slot: {exc}", file=sys.stderr)
        return 2
    os.set_inheritable(fd, True)
    store = args.root / f"slot-{slot}"
    print(f"claim_slot: slot {slot}, store {store}", file=sys.stderr, flush=True)
    env = {**os.environ, "UNIREC_STATE_SLOT": str(slot)}
    try:
        os.execvpe(command[0], expand(command, store, slot), env)
    except OSError as exc:
        print(f"claim_slot: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
