"""Train the difficulty sweep and write results/difficulty.md.

    .venv/bin/python scripts/difficulty_sweep.py [--jobs 2] [--iterations 3000] [--seeds 3] \
        [--presets default,small,clutter] [--rows full,lam0,paper,recipe,recipe_lam0]

For each synthetic-data preset (`data.synthetic_preset`: today's set, small objects, heavy
clutter) and each row below, `--seeds` runs (train.seed 0, 1, ...) of the same budget: demo net,
random init, `--iterations` iterations, lr halved every third of them, val evaluated every 500.
The table reports the last evaluation (never the best one, which is picked on val). Runs are
named by their overrides and resumed where they stopped; their wall time adds up over resumes.
Each preset's data is generated once, before the runs, in its own folder (a folder holding
another difficulty is refused).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also when imported by tests

import synthetic_baselines as sb  # noqa: E402

REPO = sb.REPO
PRESETS = ("default", "small", "clutter")
# The shipped recipe's loss.object_fraction per preset: the mean share of the image one present class
# covers, measured on each preset's masks (results/weak_recipe_notes.md) -- the dataset statistic a user
# gives c_fg_mode=size. weakseg/configs/demo_weak.yaml holds the default preset's.
OBJECT_FRACTION = {"default": 0.15, "small": 0.07, "clutter": 0.145}
# key -> (label, training config, overrides). The recipe rows also get loss.cls_only_iters = a third of the
# run and their preset's loss.object_fraction (recipe_sets).
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "full": ("full supervision", "demo", ["supervision=full"]),
    "full_recipe": ("full supervision, the recipe's net and optimizer", "demo_weak", ["supervision=full"]),
    "lam0": ("weak, λ = 0 (the paper's prior alone)", "demo", ["loss.lam=0"]),
    "paper": ("weak, exp, λ = 0.3 (the paper's best, main's defaults)", "demo", ["loss.variant=exp", "loss.lam=0.3"]),
    "recipe": ("shipped recipe (demo_weak)", "demo_weak", []),
    "recipe_lam0": ("shipped recipe, λ = 0 (no neighbourhood loss)", "demo_weak", ["loss.lam=0"]),
}
WEAK = ("lam0", "paper", "recipe", "recipe_lam0")
FULL = ("full", "full_recipe")  # the weak rows' ratio is to the better of these (by mean over seeds)
# the neighbourhood loss's gain: (with, without) pairs, compared seed by seed
GAINS = (("paper", "lam0"), ("recipe", "recipe_lam0"))
# the acceptance: the shipped recipe reaches this share of full supervision
TARGETS = {"default": 0.6, "small": 0.5}


def row_sets(row: str, preset: str, iterations: int) -> list[str]:
    """The overrides that make `row` at `preset` (besides data, schedule and seed)."""
    sets = list(ROWS[row][2])
    if ROWS[row][1] == "demo_weak" and row not in FULL:
        sets += [f"loss.cls_only_iters={iterations // 3}", f"loss.object_fraction={OBJECT_FRACTION[preset]}"]
    return sets


def run_dir(out: Path, preset: str, row: str, seed: int, iterations: int) -> Path:
    """A run's folder, named by its config and overrides: out/<preset>/<config>_<overrides>."""
    return out / preset / f"{ROWS[row][1]}_{sb.slug(row_sets(row, preset, iterations) + [f'train.seed={seed}'])}"


def common_sets(preset: str, data: Path, iterations: int, extra: list[str]) -> list[str]:
    return sb.COMMON + [f"data.root={data / preset}", f"data.synthetic_preset={preset}",
                        f"optim.iterations={iterations}", f"optim.lr_step={max(iterations // 3, 1)}", *extra]


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The evaluations of a run's metrics.csv (rows with a val mIoU)."""
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("val/miou", "") != ""]


def load_results(out: Path, presets: list[str], rows: list[str], seeds: int, iterations: int) -> dict:
    """(preset, row, seed) -> {"rows": evaluations, "seconds": wall time} for the runs that reached `iterations`
    (one still training, or stopped, is left out)."""
    found = {}
    for preset in presets:
        for row in rows:
            for seed in range(seeds):
                d = run_dir(out, preset, row, seed, iterations)
                evals = read_metrics(d / "metrics.csv") if (d / "metrics.csv").is_file() else []
                if evals and int(float(evals[-1]["iteration"])) >= iterations:  # finished runs only
                    clock = d / "wall_seconds.txt"
                    found[(preset, row, seed)] = {
                        "rows": evals,
                        "seconds": float(clock.read_text()) if clock.is_file() else math.nan}
    return found


def last(result: dict, key: str) -> float:
    v = result["rows"][-1].get(key, "")
    return float(v) if v not in ("", None) else math.nan


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean (min–max)' of the finite values, times `scale`; '–' when there are none."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "–"
    def f(x: float) -> str:
        return f"{round(scale * x, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.0" for a rounding error below zero

    mean = f(statistics.fmean(vals))
    return mean if len(vals) == 1 else f"{mean} ({f(min(vals))}–{f(max(vals))})"


def collapsed_at(result: dict) -> list[int]:
    """The iterations of the evaluations that reported val/collapsed = 1."""
    return [int(float(r["iteration"])) for r in result["rows"] if r.get("val/collapsed", "") not in ("", "nan")
            and float(r["val/collapsed"]) >= 0.5]


def report(results: dict, presets: list[str], rows: list[str], seeds: int) -> list[str]:
    """The markdown tables and findings of the sweep (without the header)."""
    lines: list[str] = []
    alarms = [f"- **COLLAPSED: {preset}, {ROWS[row][0]}, seed {seed}: val/collapsed = 1 at iteration(s) "
              f"{', '.join(map(str, at))}**"
              for (preset, row, seed), r in sorted(results.items()) if (at := collapsed_at(r))]
    if alarms:
        lines += ["## Runs the collapse check flagged", "", *alarms, ""]
    for preset in presets:
        have = {row: [results[(preset, row, s)] for s in range(seeds) if (preset, row, s) in results] for row in rows}
        if not any(have.values()):
            continue
        fulls = {row: {s: last(results[(preset, row, s)], "val/miou") for s in range(seeds)
                       if (preset, row, s) in results} for row in FULL if row in rows}
        fulls = {row: f for row, f in fulls.items() if f}
        # the reference: the full-supervision row with the higher mean (the stricter bar for the weak rows)
        ref = max(fulls, key=lambda row: statistics.fmean(fulls[row].values())) if fulls else None
        full = fulls.get(ref, {})
        lines += [f"## Preset `{preset}`", "",
                  "| run | seeds | val mIoU | object IoU | image AUC | × full supervision | collapsed seeds "
                  "| wall time (min) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            runs = have[row]
            if not runs:
                continue
            ratio = "–"
            if row not in FULL:
                weak = {s: last(results[(preset, row, s)], "val/miou") for s in range(seeds)
                        if (preset, row, s) in results}
                paired = [weak[s] / full[s] for s in weak if s in full and full[s] > 0]
                if paired and full:
                    mean_ratio = statistics.fmean(weak.values()) / statistics.fmean(full.values())
                    ratio = f"{mean_ratio:.2f}"
                    if len(paired) > 1:
                        ratio += f" ({min(paired):.2f}–{max(paired):.2f})"
            lines.append(
                f"| {ROWS[row][0]} | {len(runs)} | {spread([last(r, 'val/miou') for r in runs])} | "
                f"{spread([last(r, 'val/object_iou') for r in runs])} | "
                f"{spread([last(r, 'val/image_auc') for r in runs], 1.0, 2)} | {ratio} | "
                f"{sum(bool(collapsed_at(r)) for r in runs)} | "
                f"{spread([r['seconds'] / 60 for r in runs], 1.0)} |")
        lines.append("")
        if len(fulls) > 1:
            lines.append(f"- × full supervision: relative to {ROWS[ref][0]}, the full-supervision row with the "
                         "higher mean.")
        for with_, without in GAINS:
            if with_ not in rows or without not in rows:
                continue
            diffs = [last(results[(preset, with_, s)], "val/miou") - last(results[(preset, without, s)], "val/miou")
                     for s in range(seeds) if (preset, with_, s) in results and (preset, without, s) in results]
            if diffs:
                lines.append(f"- The neighbourhood loss's gain, {ROWS[with_][0]} minus {ROWS[without][0]}, seed by "
                             f"seed: {spread(diffs)} mIoU points over {len(diffs)} seed(s).")
        if preset in TARGETS and "recipe" in rows and full:
            weak = [last(results[(preset, "recipe", s)], "val/miou") for s in range(seeds)
                    if (preset, "recipe", s) in results]
            if weak:
                r = statistics.fmean(weak) / statistics.fmean(full.values())
                verdict = "meets" if r >= TARGETS[preset] else "does NOT meet"
                lines.append(f"- Acceptance: the shipped recipe reaches {r:.2f} × full supervision: {verdict} the "
                             f"target of {TARGETS[preset]} × at this preset.")
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=3, help="train.seed 0 .. N-1 for every row")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated subset of " + ", ".join(PRESETS))
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    p.add_argument("--data", default=str(REPO / "data" / "difficulty"), help="one data folder per preset below it")
    p.add_argument("--out", default=str(REPO / "runs" / "difficulty"))
    p.add_argument("--md", default=str(REPO / "results" / "difficulty.md"))
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the data generation and every run (e.g. data.synthetic_train=40); "
                        "not part of the run folders' names: change --out and --data with it")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table from the runs already in --out (a row may have fewer seeds)")
    args = p.parse_args()
    presets, rows = args.presets.split(","), args.rows.split(",")
    for name, given, allowed in (("--presets", presets, PRESETS), ("--rows", rows, tuple(ROWS))):
        bad = [x for x in given if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    if args.seeds < 1 or args.iterations < 1:
        p.error("--seeds and --iterations must be >= 1")
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    sys.path.insert(0, str(REPO))
    from weakseg.config import load_config
    from weakseg.data import build
    from weakseg.io import atomic_write_text

    for preset in presets if not args.report_only else []:  # once, before the runs (two would both generate it)
        cfg = load_config("demo", common_sets(preset, data, args.iterations, args.extra))
        build.ensure_synthetic(cfg.data)
    jobs = [(preset, row, seed) for preset in presets for row in rows for seed in range(args.seeds)
            if not args.report_only]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(
            sb.train_resumable, run_dir(out, preset, row, seed, args.iterations),
            common_sets(preset, data, args.iterations, args.extra) + row_sets(row, preset, args.iterations)
            + [f"train.seed={seed}"], args.iterations, f"{preset}, {ROWS[row][0]}, seed {seed}", ROWS[row][1])
            for preset, row, seed in jobs]
        for f in futures:
            f.result()
    results = load_results(out, presets, rows, args.seeds, args.iterations)
    command = (f"`.venv/bin/python scripts/difficulty_sweep.py --jobs {args.jobs} --iterations {args.iterations} "
               f"--seeds {args.seeds} --presets {args.presets} --rows {args.rows}"
               + "".join(f" --set {x}" for x in args.extra) + (" --report-only" if args.report_only else "") + "`")
    lines = [
        "# Weak training across data difficulty",
        "",
        f"Machine: {sb.machine()}. Date: {time.strftime('%Y-%m-%d')}. Generated by {command}.",
        "",
        f"Every run: `weakseg train CONFIG` (demo net, random init, the synthetic VOC-layout set of its preset) "
        f"for {args.iterations} iterations, lr halved every {max(args.iterations // 3, 1)}, val evaluated every "
        f"{sb.EVAL_EVERY}; "
        + ("trained by earlier calls of this script (subsets of rows and presets, two or three runs at a time)"
           if args.report_only else f"{args.jobs} run(s) at a time")
        + f", one thread each; train.seed 0..{args.seeds - 1} (the seeds column: how many finished). "
        "Common overrides: `" + " ".join(f"--set {s}" for s in sb.COMMON) + " --set data.root=DATA/<preset> "
        "--set data.synthetic_preset=<preset>`. Rows (their run folders are named by the overrides):",
        "",
        *[f"- {ROWS[r][0]}: `weakseg train {ROWS[r][1]}` "
          + " ".join(f"`--set {s}`" for s in row_sets(r, presets[0], args.iterations)
                     if not s.startswith("loss.object_fraction"))
          + (f" `--set loss.object_fraction=<preset's object size: "
             f"{', '.join(f'{k} {v}' for k, v in OBJECT_FRACTION.items())}>`"
             if ROWS[r][1] == "demo_weak" and r not in FULL else "")
          for r in rows],
        "",
        "Values: the last evaluation, mean over seeds (min–max over seeds) in %; image AUC: mean over classes of "
        "the AUC of max-pooled p(c) against the val image labels. × full supervision: the ratio of the mean "
        "mIoUs (min–max of the seed-by-seed ratios). Wall times are of a shared machine: compare them only "
        "within a row.",
        "",
        *report(results, presets, rows, args.seeds),
    ]
    atomic_write_text(Path(args.md), "\n".join(lines) + "\n")
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
