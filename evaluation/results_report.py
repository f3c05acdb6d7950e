"""The suite's report: a Markdown table (mean +- std over seeds), a PNG and the JSON record.

Claims are judged mechanically from the seeds: a difference counts as real when it exceeds
twice its standard error (``SIGNIFICANCE``); otherwise it is "within noise". The online peers
(River, ``record["peers"]``) get their own table next to the prequential one and enter no
claim; a record without that section (an older one) renders without it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

SIGNIFICANCE = 2.0
METRICS = ("auc", "gauc", "logloss")

# (claim, better row, worse row); "better" is what the papers predict.
CLAIMS = (
    ("unified interaction beats compress-first (SASRec + DCNv2)", "unirec", "sasrec-dcnv2"),
    ("unified backbone beats target attention (DIN)", "unirec", "din"),
    ("unified backbone beats no sequence (DeepFM)", "unirec", "deepfm"),
    ("S<->F cross-source blocks help", "unirec", "unirec -S<->F"),
    ("delayed compression beats compression at the input", "unirec", "unirec input-compression"),
    ("the GRU user state helps", "unirec", "unirec -state"),
    ("core-behaviour selection helps", "unirec", "unirec -core"),
    ("learned-query compression beats the pyramid", "unirec", "unirec pyramid"),
)
KEEPS_QUALITY = ("UG-Sep keeps quality (vs U->G open)", "unirec", "unirec -UG-Sep")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and its standard error."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a - b) over paired seeds and its standard error."""
    mean, std = mean_std([x - y for x, y in zip(a, b, strict=True)])
    return mean, std / math.sqrt(len(a))


def verdict(delta: float, se: float, keeps: bool = False) -> str:
    if keeps:
        return "held" if delta >= -SIGNIFICANCE * se else "did not hold"
    if delta > SIGNIFICANCE * se:
        return "held"
    return "reversed" if delta < -SIGNIFICANCE * se else "within noise"


def _metric(record: dict[str, Any], name: str, metric: str = "auc") -> list[float] | None:
    for row in record["variants"]:
        if row["name"] == name:
            return [run[metric] for run in row["runs"]]
    return None


def claims(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim's AUC difference (predicted better - worse), its standard error, the verdict
    on it, and the GAUC difference. Online fine-tuning is judged on the mean chunk AUC,
    paired by seed (both arms start from the same trained model)."""
    out = []
    for (claim, better, worse), keeps in [(c, False) for c in CLAIMS] + [(KEEPS_QUALITY, True)]:
        a, b = _metric(record, better), _metric(record, worse)
        if a and b:
            delta, se = difference(a, b)
            gauc_delta = mean_std(_metric(record, better, "gauc"))[0] - mean_std(
                _metric(record, worse, "gauc"))[0]
            out.append({"claim": claim, "compare": f"{better} vs {worse}", "delta_auc": delta,
                        "se": se, "verdict": verdict(delta, se, keeps),
                        "delta_gauc": gauc_delta})
    for name, runs in record["prequential"].items():
        delta, se = paired_difference(chunk_means(runs, "fine_tuned"),
                                      chunk_means(runs, "frozen"))
        gauc_delta = mean_std([r["fine_tuned"]["gauc"] - r["frozen"]["gauc"] for r in runs])[0]
        out.append({"claim": f"online fine-tuning helps ({name})",
                    "compare": "fine-tuned vs frozen, mean chunk AUC", "delta_auc": delta,
                    "se": se, "verdict": verdict(delta, se), "delta_gauc": gauc_delta})
    return out


def chunk_means(runs: list[dict[str, Any]], arm: str) -> list[float]:
    """Per seed, the mean over chunks of one prequential arm's chunk AUC. Each chunk is
    scored by one model version, so unlike the AUC pooled over the period it does not
    mix the calibrations of successive versions."""
    return [_finite_mean(tuple(r[f"{arm}_auc"])) for r in runs]


def _averaging(budget: dict[str, Any]) -> str:
    """How the budget's runs average their weights (``TrainConfig.weight_average``)."""
    decay = budget.get("weight_average")
    if decay is None:
        return "the last weights (no average)"
    return f"weights averaged over the steps (decay {decay:g})"


def _affinity(budget: dict[str, Any]) -> str:
    """The candidates' affinity window when the budget sets one (a record made before
    ``Budget.affinity_len`` has none)."""
    window = budget.get("affinity_len")
    return f" (the candidates' affinity over the newest {window})" if window else ""


def _item_rates(budget: dict[str, Any]) -> str:
    """Whether the budget's candidates read their training label rate (``model.item_rates``;
    a record made before it existed had none)."""
    smoothing = budget.get("item_rate_smoothing") or 0
    if not smoothing:
        return "no item rates"
    return f"candidates' training label rates (smoothing {smoothing:g})"


def _online_settings(online: dict[str, Any] | None) -> str:
    """``OnlineConfig``'s training settings as a phrase (a record made before they were kept
    names them only)."""
    if online is None:
        return "its learning rate, batch size and weight decay"
    rows = online.get("embedding_lr")
    return (f"lr {online['lr']:g}"
            + ("" if rows is None else f", the embedding table's rows {rows:g}")
            + f", batches of {online['batch_size']}, weight decay {online['weight_decay']:g}")


def _arms_differ(record: dict[str, Any]) -> str:
    """How the prequential arms differ (a record made before the learner counted labels
    into the item-rate table has no ``count_item_labels``)."""
    if (record.get("online_config") or {}).get("count_item_labels"):
        return ("they differ in the weights and in the labels the fine-tuned arm counts into "
                "its item-rate table after each chunk, as the worker's learner does")
    return "only the weights differ"


def _steps(row: dict[str, Any]) -> str:
    """The runs' best steps (mean over seeds; an older record has one ``steps`` per row)."""
    steps = [r["steps"] for r in row["runs"] if "steps" in r]
    return f"{np.mean(steps):.0f}" if steps else str(row.get("steps", "-"))


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def markdown(record: dict[str, Any], png_name: str) -> str:
    budget = record["budget"]
    lines = [
        f"# Evaluation suite: {record['dataset']}",
        "",
        f"Produced by `unirec eval-suite` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; device: "
        f"{record['device']}; wall time {record['wall_seconds'] / 60:.1f} min.",
        "",
        f"- events: {record['events']} (time-ordered split: train {record['split']['train']}, "
        f"validation {record['split']['validation']}, test {record['split']['test']})",
        f"- budget per run: at most {budget['steps']} AdamW steps of batch "
        f"{budget['batch_size']}, stopped early on validation (AUC every "
        f"{budget.get('eval_every', '-')} steps, patience {budget.get('patience', '-')}; the "
        f"best validation weights are scored), {_averaging(budget)}, {_item_rates(budget)}, "
        f"history length {budget['history_len']}{_affinity(budget)}, UniRec d_model "
        f"{budget['d_model']} "
        f"(baselines' d_model matched on parameter count), {budget['seeds']} seeds (0..)",
        f"- hyperparameters: {record['hyperparameters']}",
        "",
        "## Test metrics (mean ± std over seeds)",
        "",
        "| variant | what it tests | d | params (non-embedding) | best step | lr | dropout "
        "| AUC | GAUC | LogLoss | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["variants"]:
        runs = row["runs"]
        cells = [_cell([r[m] for r in runs]) for m in METRICS]
        non_embedding = row["parameters"] - row["embedding_parameters"]
        seconds = np.mean([r["seconds"] for r in runs])
        lines.append(
            f"| {row['name']} | {row['claim'] or 'the model'} | {row['d_model']} | "
            f"{row['parameters']:,} ({non_embedding:,}) | {_steps(row)} | {row['lr']:g} | "
            f"{row['dropout']:g} | {' | '.join(cells)} | {seconds:.0f} |"
        )
    lines += ["", "## Prequential (test-then-train) over the test period", "",
              f"{budget['chunks']} chunks in time order; each is scored, then learned from "
              "with `train_step` at the worker's online learner settings (`OnlineConfig`: "
              f"{_online_settings(record.get('online_config'))}, the same for every model). "
              f"Both arms see the same histories and GRU states; {_arms_differ(record)}. "
              "AUC/GAUC pool the whole period, whose fine-tuned scores come "
              "from successive model versions; the mean chunk AUC compares versions only "
              "within a chunk.", "",
              "| model | mean chunk AUC frozen | mean chunk AUC fine-tuned | AUC frozen "
              "| AUC fine-tuned | GAUC frozen | GAUC fine-tuned | online steps |",
              "|---|---|---|---|---|---|---|---|"]
    for name, runs in record["prequential"].items():
        cells = [_cell(chunk_means(runs, arm)) for arm in ("frozen", "fine_tuned")]
        cells += [_cell([r[arm][m] for r in runs]) for m in ("auc", "gauc")
                  for arm in ("frozen", "fine_tuned")]
        lines.append(f"| {name} | {' | '.join(cells)} | {runs[0]['online_steps']} |")
    if "peers" in record:
        lines += peer_lines(record)
    if record.get("changes"):
        lines += ["", "## What changed, and what each change bought", "",
                  record["changes"].strip()]
    lines += ["", "## Claims (AUC difference, predicted-better minus predicted-worse)", "",
              f"A difference counts when it exceeds {SIGNIFICANCE:g} standard errors.", "",
              "| claim | comparison | Δ AUC | s.e. | verdict | Δ GAUC |",
              "|---|---|---|---|---|---|"]
    for c in claims(record):
        lines.append(f"| {c['claim']} | {c['compare']} | {c['delta_auc']:+.4f} | "
                     f"{c['se']:.4f} | {c['verdict']} | {c['delta_gauc']:+.4f} |")
    lines += ["", f"![AUC per variant and prequential AUC over time]({png_name})", ""]
    return "\n".join(lines)


def peer_lines(record: dict[str, Any]) -> list[str]:
    """The "Online peers (River)" section: our prequential arms and each River pipeline on
    the same test events (the skip note when the peers did not run)."""
    peers = record["peers"]
    lines = ["", "## Online peers (River) over the test period", ""]
    if peers["status"] != "ran":
        return [*lines, f"Skipped: {peers['note']}."]
    features = peers["config"]["features"]
    lines += [
        f"The same {peers['scored']['test']} test events in time order, each scored before it "
        "is learned from. The River pipelines learn after every event (warm-up: every "
        "training and validation event; our models were trained on the training part only); "
        "our fine-tuned arms learn after every chunk. River "
        f"{peers['river']}. Features: one-hot user, item, item and context fields (numeric "
        "ones in quantile bins), profile fields, and running label rates of the earlier "
        f"events (smoothed with m = {features['smoothing']:g}, with log(1 + count)) for the "
        f"user, the item and user x {', '.join(peers['cross_fields']) or '(no field)'}. "
        "Each pipeline's hyperparameters are chosen by validation AUC (warm-up on train, "
        "test-then-train over validation); the best peer is the one with the higher "
        "validation AUC. Ours: mean ± std over seeds; River: one run.", "",
        "| model | learns | AUC | GAUC | LogLoss | mean chunk AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in record["prequential"].items():
        for arm, learns in (("frozen", "never"), ("fine_tuned", "after each chunk")):
            cells = [_cell([r[arm][m] for r in runs]) for m in METRICS]
            cells.append(_cell(chunk_means(runs, arm)))
            lines.append(f"| {name} {arm.replace('_', '-')} | {learns} | {' | '.join(cells)} |")
    for key, pipeline in peers["pipelines"].items():
        label = f"{pipeline['name']} ({pipeline['describe']})"
        if key == peers["best"]:
            label = f"**{label}, best peer**"
        cells = [f"{pipeline['test'][m]:.4f}" for m in METRICS]
        cells.append(f"{_finite_mean(tuple(pipeline['chunk_auc'])):.4f}")
        lines.append(f"| {label} | after each event | {' | '.join(cells)} |")
    lines += ["", "Validation AUC of each candidate tried:", ""]
    for pipeline in peers["pipelines"].values():
        tried = ", ".join(f"lr {c['lr']:g}{' k ' + str(c['n_factors']) if c['n_factors'] else ''}"
                          f" {'scaled' if c['scale'] else 'raw'}: {c['auc']:.4f}"
                          for c in pipeline["validation"])
        edge = " (the chosen learning rate is at the edge of the grid)" if pipeline[
            "at_edge"] else ""
        lines.append(f"- {pipeline['name']}: {tried}{edge}")
    return lines


def _finite_mean(values: tuple[float, ...]) -> float:
    """The mean of the finite values (a chunk with one class has no AUC), NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def plot(record: dict[str, Any], path: Path) -> None:
    """Left: test AUC per variant with std error bars. Middle: prequential AUC per chunk.
    Right: the four models' validation learning curves (seed 0)."""
    fig = Figure(figsize=(20, 5))
    left, right, curves = fig.subplots(1, 3)
    names = [row["name"] for row in record["variants"]]
    stats = [mean_std([r["auc"] for r in row["runs"]]) for row in record["variants"]]
    left.barh(names, [m for m, _ in stats], xerr=[s for _, s in stats], capsize=3)
    bounds = [v for m, s in stats for v in (m - s, m + s) if math.isfinite(v)]
    if bounds:
        left.set_xlim(max(0.0, min(bounds) - 0.02), max(bounds) + 0.01)
    left.invert_yaxis()
    left.set_xlabel("test AUC (mean ± std over seeds)")
    for name, runs in record["prequential"].items():
        days = [datetime.fromtimestamp(t, UTC) for t in runs[0]["chunk_end_ts"]]
        for arm, style in (("fine_tuned", "-"), ("frozen", "--")):
            curve = [_finite_mean(values) for values in zip(*(r[f"{arm}_auc"] for r in runs),
                                                            strict=True)]
            right.plot(days, curve, style, marker="o", label=f"{name} {arm.replace('_', '-')}")
    peers = record.get("peers", {})
    if peers.get("status") == "ran":
        best = peers["pipelines"][peers["best"]]
        days = [datetime.fromtimestamp(t, UTC) for t in best["chunk_end_ts"]]
        right.plot(days, best["chunk_auc"], ":", marker="x", label=f"{best['name']} (best peer)")
    right.set_ylabel("AUC of the chunk")
    right.set_title("prequential AUC over the test period")
    right.legend(fontsize=7)
    for row in record["variants"]:
        curve = row["runs"][0].get("curve") if row["name"] in record["prequential"] else None
        if curve:
            curves.plot([p["step"] for p in curve], [p["val_auc"] for p in curve], marker=".",
                        label=f"{row['name']} (best step {row['runs'][0]['steps']})")
    curves.set_xlabel("training step")
    curves.set_ylabel("validation AUC")
    curves.set_title("learning curves (seed 0)")
    curves.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(record: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<dataset>.md``, ``.png`` and ``.json`` under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{record['dataset']}.{ext}" for ext in ("md", "png", "json")}
    plot(record, paths["png"])
    paths["md"].write_text(markdown(record, paths["png"].name))
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    return paths
