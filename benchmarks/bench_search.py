"""Search platform overhead: wall time of `weakseg search` over the trials' own training time.

    python benchmarks/bench_search.py [--quick] [--trials 4] [--iterations 20] [--concurrent 1]

Runs the CLI, `python -m weakseg search SPACE.yaml`, in a subprocess on a
space of short trials (tiny model, a small synthetic set, λ and the variant
sampled by TPE, no early stopping), with HOME and RAY_TMPDIR pointing to
fresh short temporary folders (Ray's AF_UNIX socket paths must stay under 108
bytes). Then reads each trial's own time (`time_total_s` of its last result
in the Ray experiment folder) and, as a reference without any platform, runs
the same trial configurations through `engine.fit` one after the other in
this process. With one trial at a time (the default), wall / Σ trial time is
the platform's cost factor for these short trials; what carries over to real
(hour-long) trials is the split of the rest into a fixed cost per search
(imports, `ray.init`, the MLflow parent run: wall − `search_seconds`) and a
cost per trial inside `tuner.fit` (scheduling, checkpoint persistence, the
driver's MLflow logging: (`search_seconds` − Σ) / trials).
Everything runs on the CPU; everything written goes to the temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import base_parser, median, print_machine, setup_device, table

# what `weakseg search` imports before it starts Ray
IMPORTS = "import torch, ray, ray.tune, mlflow, optuna, weakseg.search.run, weakseg.engine"
TRIAL = {  # the tests' seconds-long trial (tests/conftest.py TINY)
    "model.backbone": "tiny", "model.pretrained": "none", "model.decoder_channels": 16, "model.skip_channels": 4,
    "data.dataset": "synthetic", "data.workers": 0, "data.crop_size": 64, "data.val_limit": 4,
    "optim.batch_size": 4, "train.device": "cpu", "train.overlays": 1, "train.progress": "off",
}


def write_space(tmp: Path, data_root: Path, trials: int, iterations: int, concurrent: int) -> Path:
    space = {
        "name": "bench",
        "base": "demo",
        "fixed": {**TRIAL, "data.root": str(data_root), "optim.iterations": iterations,
                  "train.eval_every": max(1, iterations // 2), "train.log_every": max(1, iterations // 4)},
        "params": {"loss.variant": {"choice": ["exp", "mean"]}, "loss.lam": {"uniform": [0.0, 1.0]}},
        "settings": {
            "samples": trials, "scheduler": "none", "max_concurrent": concurrent,
            "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0,
            "storage_path": str(tmp / "ray"), "results_dir": str(tmp / "results"),
        },
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def search_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(tmp / "home")  # Ray's token file and caches stay in the temporary folder
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wsr", dir="/tmp")  # short: AF_UNIX paths < 108 bytes
    env.pop("RAY_ADDRESS", None)
    return env


def trial_times(experiment: Path) -> list[tuple[dict, float]]:
    """(sampled params, time_total_s of the last result) of every trial in a Ray experiment folder."""
    out = []
    for result in sorted(experiment.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        params = json.loads((result.parent / "params.json").read_text())
        out.append((params, float(lines[-1]["time_total_s"])))
    return out


def direct_fit_seconds(space: Path, params: dict, run_dir: Path) -> float:
    """The same trial configuration trained by `engine.fit` in this process, no platform."""
    from weakseg.config import build_config, mapping_settings
    from weakseg.engine import fit
    from weakseg.search.space import load_space

    base = load_space(space).base_config.flat()
    cfg = build_config(mapping_settings({**base, **params}, "bench", None))
    start = time.perf_counter()
    fit(cfg, run_dir)
    return time.perf_counter() - start


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per trial (default 20)")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time (settings.max_concurrent)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    if args.device != "cpu":
        raise SystemExit("bench_search runs its trials on the CPU (tiny model); --device is not used")
    device = setup_device(args)
    iterations = args.iterations or (6 if args.quick else 20)
    trials = 2 if args.quick else args.trials
    print_machine(device)

    tmp = Path(tempfile.mkdtemp(prefix="wsb", dir="/tmp"))
    env = search_env(tmp)
    try:
        from weakseg.data.synthetic import make_synthetic

        data = tmp / "data"
        make_synthetic(data, n_train=16, n_val=4, n_test=1, size=64, seed=3)
        space = write_space(tmp, data, trials, iterations, args.concurrent)

        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, env=env, check=True)
        imports = time.perf_counter() - start

        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                           env=env, timeout=900)
        wall = time.perf_counter() - start
        if r.returncode != 0:
            print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"weakseg search failed with exit code {r.returncode}")
        summary = json.loads((tmp / "results" / "bench" / "search.json").read_text())
        per_trial = trial_times(tmp / "ray" / "bench")
        if len(per_trial) != trials:
            raise SystemExit(f"expected {trials} trials in {tmp / 'ray' / 'bench'}, found {len(per_trial)}")
        ray_sum = sum(t for _, t in per_trial)
        direct = [direct_fit_seconds(space, p, tmp / "direct" / str(i)) for i, (p, _) in enumerate(per_trial)]
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"{trials} trials of {iterations} iterations (tiny model, batch 4 at 64×64, eval on 4 images every "
          f"{max(1, iterations // 2)}), {args.concurrent} at a time, no early stopping:")
    fit_s = summary["search_seconds"]
    rows = [
        ["wall time of `weakseg search` (subprocess)", f"{wall:.1f} s"],
        ["  before tuner.fit: imports, ray.init, MLflow parent run", f"{wall - fit_s:.1f} s"],
        ["    of which Python start + imports of the stack", f"{imports:.1f} s"],
        ["  tuner.fit + summary (search.json `search_seconds`)", f"{fit_s:.1f} s"],
        ["Σ trials' own time (Ray `time_total_s`)", f"{ray_sum:.1f} s"],
        ["  per trial, median", f"{median([t for _, t in per_trial]):.2f} s"],
        ["same configurations via engine.fit, no platform, Σ", f"{sum(direct):.1f} s"],
        ["platform time over trial time (wall / Σ time_total_s)", f"{wall / ray_sum:.2f}"],
        ["platform cost per trial inside tuner.fit ((search_seconds − Σ) / trials)",
         f"{(fit_s - ray_sum) / trials:.1f} s"],
        ["fixed cost per search (wall − search_seconds)", f"{wall - fit_s:.1f} s"],
    ]
    print(table(["quantity", "value"], rows))
    if args.concurrent > 1:
        print("(trials overlapped: wall / Σ understates the overhead by up to the concurrency)")


if __name__ == "__main__":
    main()
