"""What a new model version costs the worker's apply path: events/s of
``InteractionApplier.apply`` when every user's stored state is current, against when every
one is stale and rebuilt from its stored history, JSON.

A model version makes every stored state stale: the next event of each user rebuilds it under
the new weights from the user's stored history (``stream.applier``), so the more often the
online learner publishes (``--checkpoint-every``), the more of the worker's applies rebuild.
This measures both ends, in one process, one torch thread, no broker: a store of ``--users``
users, each with a full history of ``--history-len`` synthetic events applied under version
1; then batches of one new event per user applied under the same version (``current``) and
under a new version each time (``stale``), ``--rounds`` batches of each, alternating.

- ``events_per_s``: the median batch's (by seconds) events / seconds, per case;
- ``stages_s``: that batch's decode / read / compute / write seconds (``StageTimes``);
- ``stale_cost_ratio``: current events/s over stale events/s.

    python bench/rebuild.py [--quick] [--users U] [--history-len N] [--d-model D]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventlog.schema import Interaction, encode
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import FeatureSpec
from state_store import StateStore, StoreConfig
from stream.applier import ApplyReport, InteractionApplier
from stream.producer import SyntheticConfig, synthetic_events
from stream.records import ConsumedRecord

TOPIC, LOG_ID = "interactions", "bench-rebuild"


class UserStream:
    """Each user's events, handed out one per user per batch, with growing offsets."""

    def __init__(self, users: int, per_user: int, seed: int = 0) -> None:
        by_user: dict[str, list[Interaction]] = {}
        population = SyntheticConfig(users=users)
        for event, _ in synthetic_events(users * per_user * 2, population, seed):
            by_user.setdefault(event.user_id, []).append(event)
        self.events = sorted(by_user.items(), key=lambda kv: -len(kv[1]))[:users]
        self.per_user = min(len(events) for _, events in self.events)
        self.spec = FeatureSpec.fit([e for _, events in self.events for e in events])
        self.offset = 0

    def batch(self, k: int) -> list[ConsumedRecord]:
        """Every user's ``k``-th event, one record each, at the next offsets."""
        records = []
        for user, events in self.events:
            records.append(ConsumedRecord(0, self.offset, user.encode(), encode(events[k])))
            self.offset += 1
        return records


def apply(store: StateStore, model: UniRecModel, version: int,
          records: list[ConsumedRecord]) -> tuple[float, ApplyReport]:
    applier = InteractionApplier(store, model, version)
    start = time.perf_counter()
    report = applier.apply(TOPIC, 0, LOG_ID, records, records[-1].offset)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 users, 3 rounds")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history-len", type=int, default=ModelConfig.history_len)
    parser.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.users, args.rounds = min(args.users, 200), 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stream = UserStream(args.users, args.history_len + 2 * args.rounds)
    if stream.per_user < args.history_len + 2 * args.rounds:
        raise SystemExit(f"the synthetic log gives {stream.per_user} events per user")
    cfg = ModelConfig(d_model=args.d_model, history_len=args.history_len)
    model = UniRecModel(cfg, stream.spec).eval()
    runs: dict[str, list[tuple[float, ApplyReport]]] = {"current": [], "stale": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = StoreConfig(state_dim=cfg.d_model, history_len=cfg.history_len)
        with StateStore.open(Path(tmp) / "store", config) as store:
            for k in range(args.history_len):
                apply(store, model, 1, stream.batch(k))
            version = 1
            for r in range(args.rounds):
                k = args.history_len + 2 * r
                runs["current"].append(apply(store, model, version, stream.batch(k)))
                version += 1
                runs["stale"].append(apply(store, model, version, stream.batch(k + 1)))
    result: dict = {"config": {**vars(args), "users": len(stream.events), "torch_threads": 1}}
    rates = {}
    for case, batches in runs.items():
        seconds, report = sorted(batches, key=lambda b: b[0])[len(batches) // 2]
        rates[case] = report.applied / seconds
        result[case] = {"events_per_s": round(rates[case]), "rebuilt": report.rebuilt,
                        "stages_s": {k: round(v, 4) for k, v in asdict(report.stages).items()}}
    result["stale_cost_ratio"] = round(rates["current"] / rates["stale"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
