"""Benchmark of request scoring: the cached user side vs one full joint pass per candidate.

For every history length n (``--n``, default 64 and 256; ``ModelConfig(history_len=n)``,
otherwise the default config) and candidate count C (``--candidates``, default 16, 128, 512)
it builds one synthetic but realistic request (a ``FeatureSpec`` fitted on synthetic events
with a multi-valued "genre" bag, a numeric "price", a "device" context field, a numeric context
field and a user profile; a full history of n events; C candidates with features) and measures,
in the same run:

- ``cached``: the whole ``Scorer.score`` call (featurization included): the user side once,
  all C candidates against its cache in one batch;
- ``reference``: the whole ``Scorer.score_reference`` call: one full joint pass per candidate;
- ``model_only``: the same two paths on prepared tensors (``encode_user`` + ``score`` vs
  ``reference``), plus ``encode_user`` alone, the candidate pass alone and featurization alone,
  so the JSON shows where the time goes;
- ``speedup_p50``: reference p50 / cached p50 (whole call), and ``max_abs_diff`` between the
  probabilities of the two paths (``max_abs_diff_logits`` on the model-only logits).

With ``--batch B [B ...]`` it measures batched serving instead: for every (n, C) case and each
B, one ``Scorer.score_many`` call over B impressions of different users (own histories,
states, contexts; C candidates each), end to end; it reports impressions/s and candidates/s at
the p50 latency, the speedup over B = 1, and ``max_abs_diff_vs_alone`` between the batched
probabilities and ``Scorer.score`` on each impression alone.

Every measurement runs under ``torch.no_grad`` in eval mode, after warm-up calls, then repeats
until it has ``--min-reps`` samples and ``--budget`` seconds are spent (at most ``--max-reps``),
so slow cases (the reference at C=512, n=256 takes seconds on a CPU) get fewer repetitions; each
case reports its repetition counts. On CUDA the model runs with bf16 autocast (as ``Scorer``
does) and every timer reads after ``torch.cuda.synchronize``.

Prints one JSON document on stdout; progress goes to stderr.

    python bench/scoring.py                   # full grid, a few minutes on a 2-core CPU
    python bench/scoring.py --quick           # n=64 only, 1 warm-up + 2 calls: a smoke test
    python bench/scoring.py --device cuda --n 256 --candidates 512 --out scoring.json
    python bench/scoring.py --n 50 --candidates 10 --batch 1 16 64 --threads 1   # batched serving
    python bench/scoring.py --n 50 --candidates 10 --batch 64 --threads 1 --quantize none w8a16
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventlog.schema import Candidate, Impression, Interaction, UserProfile
from model.backbone import UniRecModel
from model.config import ModelConfig
from model.features import CandidateInputs, FeatureSpec, UserInputs
from model.quantize import QUANTIZATION_MODES, weight_bytes
from model.scorer import Scorer

log = logging.getLogger("bench.scoring")

HISTORY_LENGTHS = (64, 256)
QUICK_N = (64,)  # the reference at n=256, C=512 alone takes seconds per call on a CPU
CANDIDATE_COUNTS = (16, 128, 512)
TARGET_CANDIDATES, TARGET_SPEEDUP = 512, 8.0

CATALOG_SIZE = 20_000
GENRES = tuple(f"genre-{i:02d}" for i in range(24))
ACTIONS = ("impression", "click", "like", "purchase")
ACTION_WEIGHTS = (0.70, 0.22, 0.06, 0.02)
DEVICES = ("ios", "android", "web", "tv")
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
COUNTRIES = ("de", "fr", "us", "br", "jp", "in")
FIT_USERS, FIT_EVENTS_PER_USER = 64, 40
REQUEST_TS = 1_700_000_000.0


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs."""

    warmup: int = 3
    budget_s: float = 3.0
    min_reps: int = 3
    max_reps: int = 200
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(warmup=1, budget_s=0.0, min_reps=2, max_reps=2, quick=True)


# -- synthetic data -------------------------------------------------------------------------


class Catalog:
    """A catalog of items with fixed features; popularity follows a Zipf-like law."""

    def __init__(self, rng: np.random.Generator, size: int = CATALOG_SIZE) -> None:
        self.rng = rng
        self.ids = [f"item-{i:06d}" for i in range(size)]
        self.prices = np.round(rng.lognormal(mean=3.0, sigma=0.8, size=size), 2)
        self.genres = [
            sorted(rng.choice(GENRES, size=rng.integers(1, 4), replace=False).tolist())
            for _ in range(size)
        ]
        weights = 1.0 / np.arange(1, size + 1) ** 0.8
        self.popularity = weights / weights.sum()

    def features(self, i: int) -> dict[str, Any]:
        return {"genre": list(self.genres[i]), "price": float(self.prices[i])}

    def sample(self, count: int, with_replacement: bool = True) -> np.ndarray:
        return self.rng.choice(
            len(self.ids), size=count, replace=with_replacement, p=self.popularity
        )


def context(rng: np.random.Generator) -> dict[str, Any]:
    """A request or event context: a categorical device and a numeric session depth."""
    return {"device": str(rng.choice(DEVICES)), "session_depth": float(rng.integers(1, 40))}


def profile(rng: np.random.Generator, user_id: str) -> UserProfile:
    features = {
        "age_bucket": str(rng.choice(AGE_BUCKETS)),
        "country": str(rng.choice(COUNTRIES)),
        "gender": str(rng.choice(("f", "m", "x"))),
    }
    return UserProfile(user_id=user_id, features=features)


def history(
    rng: np.random.Generator, catalog: Catalog, user_id: str, count: int, end_ts: float
) -> list[Interaction]:
    """``count`` events of one user, oldest first, the newest shortly before ``end_ts``."""
    gaps = rng.exponential(scale=1800.0, size=count)
    ts = end_ts - np.cumsum(gaps)[::-1]
    items = catalog.sample(count)
    actions = rng.choice(ACTIONS, size=count, p=ACTION_WEIGHTS)
    return [
        Interaction(
            event_id=f"{user_id}-e{j}",
            user_id=user_id,
            item_id=catalog.ids[i],
            action=str(actions[j]),
            ts=float(ts[j]),
            item_features=catalog.features(i),
            context=context(rng),
        )
        for j, i in enumerate(items.tolist())
    ]


def fit_spec(rng: np.random.Generator, catalog: Catalog) -> FeatureSpec:
    """A ``FeatureSpec`` fitted on a small synthetic training log and its user profiles."""
    events: list[Interaction] = []
    profiles = []
    for u in range(FIT_USERS):
        user_id = f"fit-user-{u}"
        events += history(rng, catalog, user_id, FIT_EVENTS_PER_USER, REQUEST_TS - 86400.0)
        profiles.append(profile(rng, user_id))
    return FeatureSpec.fit(events, profiles)


@dataclass
class Request:
    """Everything ``Scorer.score`` reads for one request."""

    impression: Impression
    history: list[Interaction]
    profile: UserProfile
    state: np.ndarray

    def args(self) -> tuple[Impression, list[Interaction], UserProfile, np.ndarray]:
        return self.impression, self.history, self.profile, self.state


def make_request(
    rng: np.random.Generator, catalog: Catalog, n: int, n_cands: int, d_model: int
) -> Request:
    """A request of a returning user: a full history of ``n`` events, ``n_cands`` candidates."""
    user_id = "bench-user"
    cands = [
        Candidate(item_id=catalog.ids[i], item_features=catalog.features(i))
        for i in catalog.sample(n_cands, with_replacement=False).tolist()
    ]
    impression = Impression(
        request_id=f"bench-{n}-{n_cands}",
        user_id=user_id,
        ts=REQUEST_TS,
        candidates=cands,
        context=context(rng),
    )
    state = (rng.standard_normal(d_model) * 0.1).astype(np.float32)
    return Request(
        impression,
        history(rng, catalog, user_id, n, REQUEST_TS - 30.0),
        profile(rng, user_id),
        state,
    )


# -- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock samples of one measurement (ms) and the last call's result."""

    samples_ms: list[float]
    result: Any

    def summary(self, n_cands: int | None = None) -> dict[str, float | int]:
        p50, p99 = np.percentile(self.samples_ms, [50, 99])
        out: dict[str, float | int] = {
            "p50_ms": round(float(p50), 3),
            "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(np.mean(self.samples_ms)), 3),
            "min_ms": round(min(self.samples_ms), 3),
            "reps": len(self.samples_ms),
        }
        if n_cands is not None:
            out["candidates_per_s"] = round(n_cands / (float(p50) / 1e3), 1)
        return out

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples_ms, 50))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work, so that a timer read after it covers that work."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def warm_up(fn: Callable[[], Any], settings: Settings, sync: Callable[[], None]) -> None:
    """``settings.warmup`` calls, cut short once they have taken half the budget."""
    start = time.perf_counter()
    for i in range(settings.warmup):
        if i and time.perf_counter() - start > settings.budget_s / 2:
            break
        fn()
        sync()


def wants_more(timing: Timing, spent_s: float, settings: Settings) -> bool:
    reps = len(timing.samples_ms)
    return reps < settings.max_reps and (reps < settings.min_reps or spent_s < settings.budget_s)


def measure(
    calls: dict[str, Callable[[], Any]], settings: Settings, sync: Callable[[], None]
) -> dict[str, Timing]:
    """Warm every call up, then time them interleaved.

    The next call is always the one with the least time spent so far, so the calls share the
    machine's slow and fast moments (other processes) instead of each getting its own window.
    Each gets ``min_reps`` to ``max_reps`` repetitions and about ``budget_s`` seconds.
    """
    gc.collect()
    for fn in calls.values():
        warm_up(fn, settings, sync)
    timings = {name: Timing([], None) for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    while todo := [name for name in calls if wants_more(timings[name], spent[name], settings)]:
        name = min(todo, key=spent.__getitem__)
        t0 = time.perf_counter()
        timings[name].result = calls[name]()
        sync()
        elapsed = time.perf_counter() - t0
        timings[name].samples_ms.append(elapsed * 1e3)
        spent[name] += elapsed
    return timings


# -- one case -------------------------------------------------------------------------------


def autocast(device: torch.device) -> torch.autocast:
    """The autocast ``Scorer`` uses: bf16 on CUDA, off (fp32) on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_calls(
    scorer: Scorer, user: UserInputs, cands: CandidateInputs
) -> dict[str, Callable[[], Any]]:
    """The model-only calls on prepared tensors, each under no_grad and the scorer's autocast."""
    model, device = scorer.model, scorer.device
    cache = _no_grad(lambda: model.encode_user(user), device)()

    return {
        "cached": _no_grad(lambda: model.score(model.encode_user(user), cands), device),
        "reference": _no_grad(lambda: model.reference(user, cands), device),
        "encode_user": _no_grad(lambda: model.encode_user(user), device),
        "score_candidates": _no_grad(lambda: model.score(cache, cands), device),
    }


def _no_grad(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad(), autocast(device):
            return fn()

    return call


def max_abs_diff(a: Any, b: Any) -> float:
    a_arr = a.float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b_arr = b.float().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.max(np.abs(a_arr.astype(np.float64) - b_arr.astype(np.float64))))


def run_case(scorer: Scorer, request: Request, settings: Settings) -> dict[str, Any]:
    """Every measurement of one (n, C) case."""
    n_cands = len(request.impression.candidates)
    user, cands = scorer.inputs(*request.args())
    calls = {
        "e2e_cached": lambda: scorer.score(*request.args()),
        "e2e_reference": lambda: scorer.score_reference(*request.args()),
        "featurize": lambda: scorer.inputs(*request.args()),
        **model_calls(scorer, user, cands),
    }
    timings = measure(calls, settings, synchronizer(scorer.device))
    cached, reference, featurize = (
        timings.pop(k) for k in ("e2e_cached", "e2e_reference", "featurize")
    )
    model, task = timings, scorer.task
    return {
        "cached": cached.summary(n_cands),
        "reference": reference.summary(n_cands),
        "model_only": {
            "cached_p50_ms": round(model["cached"].p50, 3),
            "reference_p50_ms": round(model["reference"].p50, 3),
            "speedup_p50": round(model["reference"].p50 / model["cached"].p50, 2),
            "cached": model["cached"].summary(n_cands),
            "reference": model["reference"].summary(n_cands),
            "encode_user": model["encode_user"].summary(),
            "score_candidates": model["score_candidates"].summary(n_cands),
            "featurize": featurize.summary(),
        },
        "speedup_p50": round(reference.p50 / cached.p50, 2),
        # the fastest calls are the least disturbed by other processes on a shared machine
        "speedup_min": round(min(reference.samples_ms) / min(cached.samples_ms), 2),
        "max_abs_diff": max_abs_diff(cached.result, reference.result),
        "max_abs_diff_logits": max_abs_diff(
            model["cached"].result[task], model["reference"].result[task]
        ),
    }


def score_many_call(scorer: Scorer, requests: Sequence[Request]) -> Callable[[], Any]:
    """One ``Scorer.score_many`` call over ``requests`` (arguments prepared once)."""
    impressions, histories, profiles, states = (
        list(column) for column in zip(*(r.args() for r in requests), strict=True)
    )
    return lambda: scorer.score_many(impressions, histories, profiles, states)


def run_batched_case(
    scorer: Scorer, requests: Sequence[Request], batches: Sequence[int], settings: Settings
) -> list[dict[str, Any]]:
    """One ``score_many`` call per batch size B over the first B of ``requests`` (one
    candidate count C, at least max(batches) requests), timed interleaved; one row per B with
    its latency, impressions/s and candidates/s at the p50, and its largest difference from
    scoring each impression alone."""
    n_cands = len(requests[0].impression.candidates)
    calls = {b: score_many_call(scorer, requests[:b]) for b in batches}
    timings = measure(calls, settings, synchronizer(scorer.device))
    alone = [scorer.score(*r.args()) for r in requests[: max(batches)]]
    smallest = min(batches)
    base_p50 = timings[smallest].p50
    rows = []
    for b, timing in timings.items():
        per_call_s = timing.p50 / 1e3
        rows.append({
            "batch": b,
            **timing.summary(),
            "impressions_per_s": round(b / per_call_s, 1),
            "candidates_per_s": round(b * n_cands / per_call_s, 1),
            # impressions/s relative to the smallest batch size's
            "speedup_vs_smallest_batch": round(base_p50 * b / (timing.p50 * smallest), 2),
            "max_abs_diff_vs_alone": max(
                max_abs_diff(batched, single)
                for batched, single in zip(timing.result, alone[:b], strict=True)
            ),
        })
    return rows


def run_batched(
    device: torch.device,
    ns: Sequence[int],
    counts: Sequence[int],
    batches: Sequence[int],
    settings: Settings,
    seed: int = 0,
    quantize: Sequence[str] = ("none",),
) -> dict[str, Any]:
    """The batched-serving benchmark as one JSON-ready document; one set of rows per
    ``quantize`` mode (``Scorer(quantize=...)``), a W8A16 row with its largest probability
    difference from fp32 and the serving weights' bytes."""
    started, load_before = time.perf_counter(), os.getloadavg()
    rng = np.random.default_rng(seed)
    catalog = Catalog(rng)
    spec = fit_spec(rng, catalog)
    base = ModelConfig()
    cases = []
    for n in ns:
        torch.manual_seed(seed)
        model = UniRecModel(replace(base, history_len=n), spec)
        scorers = {mode: Scorer(model, device=device, max_batch=max(batches), quantize=mode)
                   for mode in quantize}
        plain = Scorer(model, device=device, max_batch=max(batches))
        for n_cands in counts:
            requests = [make_request(rng, catalog, n, n_cands, base.d_model)
                        for _ in range(max(batches))]
            fp32 = score_many_call(plain, requests)()
            for mode, scorer in scorers.items():
                extra: dict[str, Any] = {"quantize": mode,
                                         "serving_weight_bytes": weight_bytes(scorer.serving)}
                if mode != "none":
                    extra["max_abs_diff_vs_fp32"] = max_abs_diff(
                        score_many_call(scorer, requests)(), fp32)
                for row in run_batched_case(scorer, requests, batches, settings):
                    log.info("n=%d C=%d B=%d %s: p50 %.2f ms, %.1f impressions/s, "
                             "%.1f candidates/s", n, n_cands, row["batch"], mode, row["p50_ms"],
                             row["impressions_per_s"], row["candidates_per_s"])
                    cases.append({"n": n, "candidates": n_cands, **extra, **row})
    return {
        **environment(device),
        "mode": "batched",
        "config": {**base.to_dict(), "history_len": list(ns)},
        "settings": {**asdict(settings), "seed": seed},
        "cases": cases,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_avg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
    }


# -- the run --------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    env: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["precision"] = "bf16 autocast"
    else:
        env["device_name"] = cpu_model()
        env["cpu_model"] = cpu_model()
        env["precision"] = "fp32"
    env["torch_threads"] = torch.get_num_threads()
    env["cpu_count"] = os.cpu_count()
    return env


def target_check(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The project's done-when target: the cache is >= 8x faster than the reference at C=512."""
    rows = [
        {
            "n": c["n"],
            "speedup_p50": c["speedup_p50"],
            "speedup_min": c["speedup_min"],
            "model_only_speedup_p50": c["model_only"]["speedup_p50"],
            "met": c["speedup_p50"] >= TARGET_SPEEDUP,
        }
        for c in cases
        if c["candidates"] == TARGET_CANDIDATES
    ]
    return {
        "candidates": TARGET_CANDIDATES,
        "min_speedup_p50": TARGET_SPEEDUP,
        "cases": rows,
        "met": all(r["met"] for r in rows) if rows else None,
    }


def run(
    device: torch.device,
    ns: Sequence[int],
    counts: Sequence[int],
    settings: Settings,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole benchmark as one JSON-ready document."""
    started, load_before = time.perf_counter(), os.getloadavg()
    rng = np.random.default_rng(seed)
    catalog = Catalog(rng)
    spec = fit_spec(rng, catalog)
    base = ModelConfig()
    cases = []
    for n in ns:
        torch.manual_seed(seed)
        model = UniRecModel(replace(base, history_len=n), spec)
        scorer = Scorer(model, device=device)
        for n_cands in counts:
            request = make_request(rng, catalog, n, n_cands, base.d_model)
            case_load = os.getloadavg()[0]
            case = {"n": n, "candidates": n_cands, **run_case(scorer, request, settings)}
            case["load_avg_1m"] = {"before": case_load, "after": os.getloadavg()[0]}
            log.info(
                "n=%d C=%d: cached p50 %.2f ms, reference p50 %.2f ms, speedup %.2fx "
                "(model only %.2fx), max |diff| %.2e",
                n,
                n_cands,
                case["cached"]["p50_ms"],
                case["reference"]["p50_ms"],
                case["speedup_p50"],
                case["model_only"]["speedup_p50"],
                case["max_abs_diff"],
            )
            cases.append(case)
    return {
        **environment(device),
        "config": {**base.to_dict(), "history_len": list(ns)},
        "feature_spec": {
            k: v for k, v in spec.to_dict().items() if k not in ("num_mean", "num_std")
        },
        "settings": {
            "warmup": settings.warmup,
            "budget_s": settings.budget_s,
            "min_reps": settings.min_reps,
            "max_reps": settings.max_reps,
            "quick": settings.quick,
            "seed": seed,
        },
        "cases": cases,
        "target": target_check(cases),
        "wall_s": round(time.perf_counter() - started, 1),
        # other processes on the machine make the timings noisy: judge them with this
        "load_avg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: n=64 unless --n, 1 warm-up + 2 calls"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=None,
        help=f"history lengths (default {HISTORY_LENGTHS}; --quick: {QUICK_N})",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=list(CANDIDATE_COUNTS),
        help=f"candidate counts (default {CANDIDATE_COUNTS})",
    )
    parser.add_argument("--warmup", type=int, default=Settings.warmup)
    parser.add_argument(
        "--budget",
        type=float,
        default=Settings.budget_s,
        help="seconds of timed repetitions per measurement",
    )
    parser.add_argument("--min-reps", type=int, default=Settings.min_reps)
    parser.add_argument("--max-reps", type=int, default=Settings.max_reps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batched mode: impressions per score_many call (e.g. 1 16 64)",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=QUANTIZATION_MODES,
        default=["none"],
        help="batched mode: scorer modes to measure, e.g. none w8a16 (one set of rows each)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = list(QUICK_N if args.quick else HISTORY_LENGTHS)
    if min(args.n) < 1 or min(args.candidates) < 1 or min(args.batch or [1]) < 1:
        parser.error("--n, --candidates and --batch must be positive")
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        parser.error("need 1 <= --min-reps <= --max-reps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    settings = (
        Settings.quick_settings()
        if args.quick
        else Settings(args.warmup, args.budget, args.min_reps, args.max_reps)
    )
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log.info("scoring benchmark on %s, n=%s, C=%s", device, args.n, args.candidates)
    if args.batch:
        result = run_batched(device, args.n, args.candidates, sorted(set(args.batch)), settings,
                             args.seed, args.quantize)
    else:
        result = run(device, args.n, args.candidates, settings, args.seed)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
