"""The end of a search: a table of all trials, the chosen config and checkpoint, and plots.

Every score shown is a trial's LAST evaluation, of the checkpoint it ends with: picking a
trial's best evaluation on the same val images would report an optimistic number. Trials
(hyperparameters) are ranked and chosen by that final score on val; the peak over a
trial's evaluations appears only as a labelled extra column (docs/method.md, "Model selection").

results/<search>/trials.csv, trials.md   every trial, sorted by its final metric (best first)
results/<search>/best_config.yaml        the chosen trial's full resolved training config
results/<search>/best_checkpoint.txt     where the chosen trial's last checkpoint is stored
results/<search>/metric_vs_lambda.png    the final metric against λ per neighbourhood variant (paper Fig. 3)
results/<search>/best_iou.png            the chosen trial's per-class IoU at its last evaluation
"""

from __future__ import annotations

# what one search leaves in results/<search>/ (search.json is written by run.py)
SUMMARY_FILES = ("trials.csv", "trials.md", "best_config.yaml", "best_checkpoint.txt", "metric_vs_lambda.png",
                 "best_iou.png", "search.json")
# outcomes that are results (eligible as best); failed, diverged, interrupted (cut by a signal) and pending are not
OK_OUTCOMES = ("completed", "stopped_early")

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from weakseg.data.classes import VOC_CLASSES
from weakseg.io import atomic_write_text, atomic_write_with
from weakseg.report import format_percent


@dataclass
class TrialRow:
    trial_id: str
    outcome: str  # completed | stopped_early | failed | diverged | interrupted | pending
    iterations: int
    final: float  # the metric at the trial's last evaluation: what is ranked and reported (nan: none)
    peak: float  # best value over its evaluations: information only, chosen on val so optimistic
    params: dict[str, Any]
    per_class: dict[str, float] = field(default_factory=dict)  # IoU at the last evaluation
    checkpoint: str = ""  # the trial's last checkpoint (storage path or URI), the one `final` scores
    error: str = ""


@dataclass
class Summary:
    rows: list[TrialRow]
    best: TrialRow | None
    files: dict[str, Path]


def rows_from_results(grid: Any, metric: str, mode: str, full_iterations: int) -> list[TrialRow]:
    """One row per trial of a Ray Tune ResultGrid."""
    rows = []
    for r in grid:
        metrics = r.metrics or {}
        df = r.metrics_dataframe
        final, peak, per_class, iters = math.nan, math.nan, {}, int(metrics.get("iteration", 0) or 0)
        if df is not None and metric in df.columns and df[metric].notna().any():
            scored = df[df[metric].notna()]
            if "iteration" in scored.columns:
                scored = scored.sort_values("iteration", kind="stable")
            row = scored.iloc[-1]  # the last evaluation
            final = float(row[metric])
            peak = float(scored[metric].max() if mode == "max" else scored[metric].min())
            per_class = {c: float(row[f"val/iou/{c}"]) for c in VOC_CLASSES if f"val/iou/{c}" in df.columns
                         and not _nan(row[f"val/iou/{c}"])}
            iters = int(df["iteration"].max()) if "iteration" in df.columns else iters
        if metrics.get("diverged"):
            err, outcome = str(metrics.get("error", "loss became non-finite")), "diverged"
        elif r.error is not None:
            text = str(r.error).strip().splitlines()
            err = text[-1] if text else type(r.error).__name__
            outcome = "diverged" if "TrainingDiverged" in str(r.error) or "non-finite" in str(r.error) else "failed"
        else:
            err = ""
            outcome = "completed" if iters >= full_iterations else ("stopped_early" if iters > 0 else "pending")
        ckpt = r.checkpoint.path if r.checkpoint is not None else ""  # the latest: the one `final` scores
        rows.append(
            TrialRow(
                trial_id=str(metrics.get("trial_id") or Path(r.path).name),
                outcome=outcome,
                iterations=iters,
                final=final,
                peak=peak,
                params={k: v for k, v in (r.config or {}).items()},
                per_class=per_class,
                checkpoint=ckpt,
                error=err,
            )
        )
    return rows


def _nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """By final score, best first; trials without one last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (math.isnan(r.final), sign * (0.0 if math.isnan(r.final) else r.final),
                                       r.trial_id))


def chosen_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial a search picks: the best final score among trials that completed or were stopped
    early by the scheduler (never a failed, diverged or interrupted one)."""
    return next((r for r in sort_rows(rows, mode) if not math.isnan(r.final)
                 and r.outcome in OK_OUTCOMES), None)


def write_summary(
    rows: list[TrialRow],
    out: Path,
    *,
    metric: str,
    mode: str,
    best_config: Mapping[str, Any] | None,
    title: str,
    incomplete: str | None = None,
) -> Summary:
    """Write the tables, the chosen trial's config and the plots; returns what was written."""
    rows = sort_rows(rows, mode)
    best = chosen_trial(rows, mode)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    param_keys = sorted({k for r in rows for k in r.params})

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "trial_id", "outcome", "iterations", f"final {metric}",
                f"peak {metric} (picked on val, info only)", *param_keys, "checkpoint", "error"])
    for i, r in enumerate(rows, 1):
        w.writerow([i, r.trial_id, r.outcome, r.iterations, _num(r.final), _num(r.peak),
                    *[r.params.get(k, "") for k in param_keys], r.checkpoint, r.error])
    files["trials.csv"] = out / "trials.csv"
    atomic_write_text(files["trials.csv"], buf.getvalue())

    md = [f"# {title}", ""] + ([f"**Incomplete**: {incomplete}.", ""] if incomplete else [])
    md += [f"{len(rows)} trials, sorted by `{metric}` at each trial's last evaluation ({mode}); the chosen "
          "trial's last checkpoint is the reported model. The peak column is the best of a trial's "
          "evaluations, picked on the same val images: information, not a result.", ""]
    head = ["#", "trial", "outcome", "iters", f"final {metric}", "peak (info)", *param_keys]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "|".join(["---"] * len(head)) + "|")
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.trial_id, r.outcome, str(r.iterations), format_percent(r.final), format_percent(r.peak),
                 *[_fmt(r.params.get(k, "–")) for k in param_keys]]
        md.append("| " + " | ".join(cells) + " |")
    if best is not None:
        md += ["", f"Chosen: trial `{best.trial_id}`, final {metric} = {format_percent(best.final)}; "
                   f"last checkpoint `{best.checkpoint}`."]
    failed = [r for r in rows if r.outcome in ("failed", "diverged")]
    if failed:
        md += ["", "Failed trials:", ""] + [f"- `{r.trial_id}` ({r.outcome}): {r.error}" for r in failed]
    files["trials.md"] = out / "trials.md"
    atomic_write_text(files["trials.md"], "\n".join(md) + "\n")

    if best is not None:
        if best_config is not None:
            files["best_config.yaml"] = out / "best_config.yaml"
            atomic_write_text(files["best_config.yaml"], yaml.safe_dump(dict(best_config), sort_keys=False))
        files["best_checkpoint.txt"] = out / "best_checkpoint.txt"
        atomic_write_text(files["best_checkpoint.txt"], best.checkpoint + "\n")
        if best.per_class:
            files["best_iou.png"] = out / "best_iou.png"
            _plot_best_iou(best, files["best_iou.png"])
    if any("loss.lam" in r.params for r in rows):
        files["metric_vs_lambda.png"] = out / "metric_vs_lambda.png"
        _plot_vs_lambda(rows, metric, files["metric_vs_lambda.png"])
    return Summary(rows, best, files)


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot_vs_lambda(rows: list[TrialRow], metric: str, path: Path) -> None:
    """The metric against λ, one line per combination of the other categorical parameters (e.g. variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_keys = sorted({k for r in rows for k, v in r.params.items() if k != "loss.lam" and isinstance(v, str)})

    def group(r: TrialRow) -> str:
        return ", ".join(f"{k.split('.')[-1]} = {r.params.get(k, '–')}" for k in group_keys) or "all trials"

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g in sorted({group(r) for r in rows}):
        pts = sorted((float(r.params["loss.lam"]), r.final) for r in rows
                     if "loss.lam" in r.params and group(r) == g and not math.isnan(r.final))
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys], marker="o", label=g)
    ax.set_xlabel("λ (weight of the neighbourhood loss)")
    ax.set_ylabel(f"{metric} at the last evaluation (%)")
    ax.set_title(f"{metric} against λ (cf. paper Fig. 3)")
    if any(float(r.params.get("loss.lam", 1)) <= 0 for r in rows):
        ax.set_xscale("symlog", linthresh=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _plot_best_iou(best: TrialRow, path: Path) -> None:
    from weakseg.report import plot_iou_bars

    import numpy as np

    iou = np.array([best.per_class.get(c, math.nan) for c in VOC_CLASSES])
    plot_iou_bars(iou, list(VOC_CLASSES), path)
