"""Train the synthetic-data baselines and write results/synthetic_baselines.md.

    .venv/bin/python scripts/synthetic_baselines.py [--jobs 2] [--iterations 3000] [--out runs/baselines]

Every run is `weakseg train demo` (tiny backbone, random init, the synthetic VOC-layout
set at 128 px, CPU) with the overrides listed in RUNS; the table reports the last val
evaluation (the peak over evaluations only as information: it is picked on the same val
images, so it is optimistic) and the per-class IoU of the last one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_EVERY = 500
COMMON = ["data.workers=0", "train.device=cpu", "train.progress=off", f"train.eval_every={EVAL_EVERY}"]
# `mean` runs use its default gradient mode (loss.grad: auto = both); `exp` runs name theirs.
LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
RUNS: list[tuple[str, list[str]]] = [
    ("full supervision (upper bound)", ["supervision=full"]),
    ("weak, λ = 0 (prior only)", ["loss.lam=0"]),
    *[(f"weak, mean, λ = {lam}", ["loss.variant=mean", f"loss.lam={lam}"]) for lam in LAMBDAS],
    *[(f"weak, exp, λ = {lam}, grad both", ["loss.variant=exp", f"loss.lam={lam}", "loss.grad=both"])
      for lam in LAMBDAS],
    *[(f"weak, exp, λ = {lam}, grad detach", ["loss.variant=exp", f"loss.lam={lam}", "loss.grad=detach"])
      for lam in (0.1, 0.3, 1.0, 3.0)],
    *[(f"weak, exp, λ = {lam}, grad free_energy", ["loss.variant=exp", f"loss.lam={lam}", "loss.grad=free_energy"])
      for lam in (0.1, 0.3, 1.0, 3.0)],
    ("weak, mean, λ = 0.3, grad detach", ["loss.variant=mean", "loss.lam=0.3", "loss.grad=detach"]),
]


def slug(sets: list[str]) -> str:
    """A run folder's name: its overrides, e.g. loss.variant-exp_loss.lam-0.3."""
    return "_".join(x.replace("=", "-") for x in sets)

# repeated with train.seed = 1 .. --seeds - 1 (another initialisation and data order): how much of the
# differences above is seed noise
SEED_RUNS = ("weak, λ = 0 (prior only)", "weak, mean, λ = 1.0", "weak, exp, λ = 0.1, grad both",
             "weak, exp, λ = 0.1, grad detach", "weak, exp, λ = 0.1, grad free_energy")


# `--rows key`: the rows that decide the method's questions (prior alone, each variant at its
# default gradient mode and best λ, the free energy), each with its seeds
KEY_RUNS = ("full supervision (upper bound)", "weak, λ = 0 (prior only)", "weak, mean, λ = 1.0",
            "weak, exp, λ = 0.1, grad detach", "weak, exp, λ = 0.1, grad free_energy",
            "weak, exp, λ = 0.3, grad free_energy")


def schedule(args: argparse.Namespace) -> list[str]:
    return [f"optim.iterations={args.iterations}", f"optim.lr_step={args.iterations // 3}"]


def run_one(label: str, sets: list[str], args: argparse.Namespace) -> dict:
    """Train one run (resuming an interrupted one); its wall time adds up over resumes in wall_seconds.txt."""
    out = Path(args.out).resolve() / slug(sets)  # named by what it runs: reusable whatever RUNS holds
    items = COMMON + [f"data.root={args.data}"] + schedule(args) + sets
    rows, spent = train_resumable(out, items, args.iterations, label)
    return {"label": label, "sets": sets, "seconds": spent, "rows": rows}


def train_resumable(out: Path, items: list[str], iterations: int, label: str, config: str = "demo"
                    ) -> tuple[list[dict], float]:
    """`weakseg train CONFIG --set ITEMS --out OUT`, resumed if interrupted, skipped if done: (metrics rows, wall s).

    The wall time adds up over resumes in OUT/wall_seconds.txt; each run gets one thread.
    """
    out.mkdir(parents=True, exist_ok=True)
    clock = out / "wall_seconds.txt"
    spent = float(clock.read_text()) if clock.is_file() else 0.0
    rows = list(csv.DictReader((out / "metrics.csv").open())) if (out / "metrics.csv").is_file() else []
    if not rows or int(float(rows[-1]["iteration"])) < iterations:
        cmd = [sys.executable, "-m", "weakseg", "train", config, *[x for s in items for x in ("--set", s)],
               "--out", str(out)]
        if (out / "checkpoints" / "last.pt").exists():
            cmd.append("--resume")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        spent += time.time() - t0
        clock.write_text(f"{spent:.1f}\n")
        if r.returncode != 0:
            raise SystemExit(f"{label}: failed\n{r.stderr[-2000:]}")
        rows = list(csv.DictReader((out / "metrics.csv").open()))
    print(f"{label}: val mIoU {pct(rows[-1]['val/miou'])} after {spent / 60:.1f} min", flush=True)
    return rows, spent


def pct(x: str | float) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if v != v else f"{100 * v:.1f}"


def findings(results: list[dict]) -> list[str]:
    """The paper's two claims, read off the table: the neighbourhood loss helps; very large λ collapses."""
    last = {r["label"]: r["rows"][-1] for r in results}
    miou = {k: float(v["val/miou"]) for k, v in last.items()}
    base = next(k for k in miou if "λ = 0 " in k)
    weak = {k: v for k, v in miou.items() if k.startswith("weak") and k != base}
    best = max(weak, key=weak.get)
    out = ["Read off the last evaluations (mIoU points):", "",
           f"- best run with the neighbourhood loss, {best}: {pct(weak[best])} against {pct(miou[base])} "
           f"for the prior alone ({100 * (weak[best] - miou[base]):+.1f})."]
    for variant in ("mean", "exp"):
        runs = {k: v for k, v in weak.items() if f", {variant}," in k
                and (variant == "mean" and "grad" not in k or "grad both" in k)}
        if not runs or max(float(re.search(r"λ = ([0-9.]+)", k).group(1)) for k in runs) < 10:
            continue  # the collapse at large λ needs the λ ≥ 10 rows (`--rows all`)
        top = max(runs, key=lambda k: float(re.search(r"λ = ([0-9.]+)", k).group(1)))
        row = last[top]
        objects = [float(v) for c, v in row.items() if c.startswith("val/iou/") and c != "val/iou/background"
                   and v not in ("", "nan")]
        out.append(f"- {top}: mIoU {pct(runs[top])}, background IoU {pct(row['val/iou/background'])}, "
                   f"mean object IoU {pct(sum(objects) / max(len(objects), 1))}.")
    return out


def display(path: str) -> str:
    """A path as the command line would give it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, CPU only"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"))
    p.add_argument("--out", default=str(REPO / "runs" / "baselines"))
    p.add_argument("--md", default=str(REPO / "results" / "synthetic_baselines.md"))
    p.add_argument("--seeds", type=int, default=3, help="seeds of the SEED_RUNS (1: the main table only)")
    p.add_argument("--rows", choices=("all", "key"), default="all",
                   help="all: every row of RUNS; key: only KEY_RUNS (the method's questions, ~2 h on 2 cores)")
    args = p.parse_args()
    global RUNS, SEED_RUNS
    if args.rows == "key":
        RUNS = [r for r in RUNS if r[0] in KEY_RUNS]
        SEED_RUNS = tuple(r for r in SEED_RUNS if r in KEY_RUNS)
    # generate the data once, before the runs start (two runs would otherwise both generate it)
    sys.path.insert(0, str(REPO))
    from weakseg.config import load_config
    from weakseg.data import build
    from weakseg.io import atomic_write_text

    cfg = load_config("demo", [f"data.root={args.data}"])
    build.ensure_synthetic(cfg.data)
    by_label = dict(RUNS)
    repeats = [(label, seed) for label in SEED_RUNS for seed in range(1, args.seeds)]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, label, sets, args) for label, sets in RUNS]
        seeded = {key: pool.submit(run_one, f"{key[0]}, seed {key[1]}", by_label[key[0]] + [f"train.seed={key[1]}"],
                                   args) for key in repeats}
        results = [f.result() for f in futures]
        seeded = {key: f.result() for key, f in seeded.items()}

    classes = [c for c in results[0]["rows"][-1] if c.startswith("val/iou/")
               and any(r["rows"][-1].get(c, "nan") != "nan" for r in results)]
    lines = [
        "# Synthetic-data baselines",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Each run: `weakseg train demo` "
        f"(tiny backbone, random init, {cfg.data.synthetic_size}-px synthetic VOC-layout images, "
        f"{cfg.data.crop_size}-px crops, batch {cfg.optim.batch_size}) for {args.iterations} "
        f"iterations, lr halved every {args.iterations // 3}, evaluated on the {cfg.data.synthetic_val} val images "
        f"every {EVAL_EVERY}; "
        f"{args.jobs} runs at a time, one thread each. Generated by `scripts/synthetic_baselines.py`.",
        "",
        f"Command of each run (from the repository root; `--out runs/baselines/<overrides>`): "
        f"`OMP_NUM_THREADS=1 weakseg train demo --set data.root={display(args.data)} "
        + " ".join(f"--set {s}" for s in COMMON + schedule(args))
        + " --set <overrides>`. Regenerate with "
        f"`.venv/bin/python scripts/synthetic_baselines.py --jobs {args.jobs} --iterations {args.iterations} "
        f"--rows {args.rows}`. Each run takes 5–8 min of one core on this machine when it has the core to "
        "itself (the runs' own clocks, in `OUT/wall_seconds.txt`, are not reported: these ran beside other "
        "work and some were interrupted and resumed; `benchmarks/` measures speed).",
        "",
        "| run | overrides | val mIoU (last) | peak val mIoU (picked on val, info only) | boundary IoU (last) "
        "| trimap acc 4 px (last) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        last = r["rows"][-1]
        best = max(float(x["val/miou"]) for x in r["rows"])
        lines.append(
            f"| {r['label']} | `{' '.join(r['sets'])}` | {pct(last['val/miou'])} | {pct(best)} | "
            f"{pct(last.get('val/boundary_iou'))} | {pct(last.get('val/trimap_acc/4px'))} |"
        )
    lines += ["", *findings(results)]
    if repeats:
        seeds = range(args.seeds)
        lines += ["", f"Seed noise: val mIoU (last) of a few runs trained again with `train.seed` = "
                      f"{', '.join(map(str, seeds[1:]))} (seed 0 is the table above):", "",
                  "| run | " + " | ".join(f"seed {k}" for k in seeds) + " | mean | range |",
                  "|---|" + "---:|" * (len(seeds) + 2)]
        main_runs = {r["label"]: r for r in results}
        for label in SEED_RUNS:
            vals = [float(main_runs[label]["rows"][-1]["val/miou"])]
            vals += [float(seeded[(label, k)]["rows"][-1]["val/miou"]) for k in seeds[1:]]
            lines.append(f"| {label} | " + " | ".join(pct(v) for v in vals)
                         + f" | {pct(sum(vals) / len(vals))} | {pct(max(vals) - min(vals))} |")
    lines += ["", "Per-class IoU (%) at the last evaluation:", ""]
    names = [c.split("/")[-1] for c in classes]
    lines.append("| run | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for r in results:
        last = r["rows"][-1]
        lines.append(f"| {r['label']} | " + " | ".join(pct(last.get(c)) for c in classes) + " |")
    atomic_write_text(Path(args.md), "\n".join(lines) + "\n")
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
