"""Benchmark of the fleet monitor: its sustained ``feedback`` records/s against the demo's rate.

In one run, against the embedded Tansu broker:

1. ``demo``: ``unirec demo --events E --json`` (a subprocess; it trains a model first if the
   run directory has none) replays E held-out MovieLens events as fast as it can; its feedback
   rate = labels joined (one ``feedback`` record each) per second while the worker joined
   them (``feedback_per_s`` of the summary, from its 1-second samples of
   ``unirec_labels_joined_total``: the scored part of the replay only; ``replay_s``, which
   includes sending the history, is reported beside it).
   ``--demo-rate R`` skips the demo and takes R instead.
2. ``monitor``: N synthetic ``feedback`` records (two model versions, event times over the
   last 50 minutes) are produced, then ``unirec monitor`` (fresh app id) is started and
   ``/fleet/drift`` polled every 0.25 s; sustained records/s = records consumed between the
   10% and 90% marks / seconds between them (group join and start-up left out).

Prints one JSON object on stdout (``headroom`` = monitor rate / demo rate); progress on stderr.

    python bench/monitor.py                     # 100k records, a 10,000-event demo
    python bench/monitor.py --quick             # 20k records, a 300-event demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.broker import EmbeddedBroker, free_port  # noqa: E402
from stream.feedback import Feedback  # noqa: E402
from stream.producer import open_producer  # noqa: E402
from stream.topics import TopicNames, ensure_topics  # noqa: E402


def say(line: str) -> None:
    print(f"[bench/monitor] {line}", file=sys.stderr, flush=True)


def demo_rate(events: int, run_dir: Path) -> dict:
    """Feedback records/s of ``unirec demo --events events`` (labels joined / replay s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UNIREC_RUN_DIR": str(run_dir)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--events", str(events),
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=1800)
    summary = json.loads(done.stdout)
    return {"events": events, "labels_joined": summary["labels_joined"],
            "replay_s": summary["replay_s"],
            "feedback_per_s": summary["feedback_per_s"],
            "fleet_n": summary["fleet"].get("n")}


def monitor_rate(n: int, partitions: int, home: Path) -> dict:
    """Sustained records/s of a fresh monitor over ``n`` waiting feedback records."""
    rng = np.random.default_rng(0)
    now = time.time()
    with EmbeddedBroker(log_dir=home) as broker:
        bootstrap, topics = broker.bootstrap_servers, TopicNames()
        ensure_topics(bootstrap, partitions, topics=topics)
        producer = open_producer(bootstrap)
        for i in range(n):
            y = int(rng.random() < 0.3)
            p = float(np.clip(0.3 + 0.3 * y + rng.normal(0, 0.15), 0.001, 0.999))
            q = float(np.clip(0.3 + 0.1 * y + rng.normal(0, 0.15), 0.001, 0.999))
            r = Feedback(f"r{i}", f"u{i % 943}", f"i{i % 1682}", y, p, q,
                         1 if i < n // 2 else 2, now - 3000 + 3000 * i / n)
            producer.send(topics.feedback, key=r.user_id.encode(), value=r.encode())
        producer.flush()
        producer.close()
        say(f"{n:,} feedback records produced; starting the monitor")
        port = free_port()
        log = (home / "monitor.log").open("ab")
        monitor = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "monitor", "--bootstrap-servers", bootstrap,
             "--web-port", str(port), "--fresh", "--short-timeouts", "--partitions",
             str(partitions), "--data-dir", str(home / "monitor")],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
            stderr=subprocess.STDOUT)
        marks: list[tuple[float, int]] = []
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if monitor.poll() is not None:
                    raise RuntimeError(f"the monitor exited ({monitor.returncode}); see {log.name}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet/drift",
                                                timeout=5) as reply:
                        consumed = json.loads(reply.read())["records_consumed"]
                    marks.append((time.monotonic(), consumed))
                    if consumed >= n:
                        break
                except OSError:
                    pass
                time.sleep(0.25)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet/drift") as reply:
                fleet_n = sum(w["n"] for w in json.loads(reply.read())["tumbling"]["all"])
        finally:
            monitor.terminate()
            monitor.wait(30)
            log.close()
    lo = next(m for m in marks if m[1] >= 0.1 * n)
    hi = next(m for m in marks if m[1] >= 0.9 * n)
    return {"records": n, "partitions": partitions,
            "records_per_s": round((hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9), 1),
            "windows_hold": fleet_n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--demo-events", type=int, default=10_000)
    parser.add_argument("--demo-rate", type=float, help="skip the demo, take this rate")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs",
                        help="the demo's run directory (its model is reused)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.records, args.demo_events = 20_000, 300
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        if args.demo_rate is None:
            say(f"running unirec demo --events {args.demo_events}")
            demo = demo_rate(args.demo_events, args.run_dir)
        else:
            demo = {"feedback_per_s": args.demo_rate, "given": True}
        say(f"demo feedback rate {demo['feedback_per_s']}/s")
        monitor = monitor_rate(args.records, args.partitions, Path(tmp))
    print(json.dumps({"demo": demo, "monitor": monitor,
                      "headroom": round(monitor["records_per_s"] / demo["feedback_per_s"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
