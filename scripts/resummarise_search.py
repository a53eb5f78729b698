"""Rewrite a search's summary (trials.md/csv, best_config.yaml, the λ plot) from its trials.csv.

    .venv/bin/python scripts/resummarise_search.py results/lambda_sweep/trials.csv search_spaces/lambda_sweep.yaml

For a summary written under an earlier selection rule: the rows keep every trial's last and peak
value, so the current rule (rank by the last evaluation, `weakseg.search.results`) can be applied
without training again. Trials are deterministic given their config, so a rerun would give the same
table. Per-class IoU is not in trials.csv: no best_iou.png is written (an existing one is removed).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trials_csv", type=Path)
    p.add_argument("space", type=Path, help="the search's space file (for the chosen trial's full config)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from weakseg.config import build_config, mapping_settings
    from weakseg.search.results import TrialRow, write_summary
    from weakseg.search.space import load_space

    space = load_space(args.space)
    with args.trials_csv.open() as f:
        table = list(csv.DictReader(f))
    # columns of the earlier format (best/last) or of today's (final/peak)
    head = list(table[0])
    final_col = next(k for k in head if k.split(" ")[0] in ("last", "final"))
    peak_col = next(k for k in head if k.split(" ")[0] in ("best", "peak"))
    fixed = {"rank", "trial_id", "outcome", "iterations", final_col, peak_col, "checkpoint", "error"}

    def value(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    rows = [TrialRow(trial_id=r["trial_id"], outcome=r["outcome"], iterations=int(r["iterations"]),
                     final=float(r[final_col] or math.nan), peak=float(r[peak_col] or math.nan),
                     params={k: value(v) for k, v in r.items() if k not in fixed},
                     checkpoint=r["checkpoint"], error=r.get("error", "")) for r in table]
    out = args.trials_csv.parent
    (out / "best_iou.png").unlink(missing_ok=True)
    s = space.settings
    ranked = sorted((r for r in rows if not math.isnan(r.final)), key=lambda r: -r.final if s.mode == "max" else r.final)
    best_cfg = build_config(mapping_settings({**space.base_values(), **ranked[0].params}, "best", None)).to_dict()
    summary = write_summary(rows, out, metric=s.metric, mode=s.mode, best_config=best_cfg,
                            title=f"Search `{space.name}`")
    print(f"wrote {', '.join(sorted(summary.files))} in {out}; chosen trial {summary.best.trial_id}")


if __name__ == "__main__":
    main()
