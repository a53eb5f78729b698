"""Evaluation artifacts: the per-class table in the paper's Table 1 layout, and figures.

Everything is written atomically (a temporary file in the target directory,
then `os.replace`), so an interrupted evaluation never leaves a truncated
table or PNG for MLflow or a reader to pick up. Figures use matplotlib's Agg
canvas directly (no pyplot, no global backend switch) and PIL.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from weakseg.data.classes import voc_colormap
from weakseg.errors import UserError
from weakseg.io import atomic_write_with

if TYPE_CHECKING:  # metrics and engine import torch: the CLI imports this module for its formatting alone
    from weakseg.engine import EvalResult
    from weakseg.metrics import BoundaryResult, SegMetrics

__all__ = [
    "PAPER_TABLE1_OURS",
    "class_table",
    "format_class_table",
    "write_class_table",
    "plot_confusion",
    "plot_iou_bars",
    "save_overlays",
    "write_eval_artifacts",
    "write_tables",
    "eval_files",
    "EVAL_FILES",
    "format_percent",
    "MEAN_ROW",
    "OVERLAY_HEADER",
    "OVERLAY_GAP",
]

# Paper Table 1, column "Ours": per-class IoU (%) on VOC 2012 val, in Table 1
# order, keyed by VOC class name (the paper writes "bike" and "plant").
PAPER_TABLE1_OURS: dict[str, float] = {
    "background": 85.4,
    "aeroplane": 68.4,
    "bicycle": 28.3,
    "bird": 63.6,
    "boat": 42.9,
    "bottle": 54.4,
    "bus": 62.7,
    "car": 62.9,
    "cat": 67.5,
    "chair": 10.6,
    "cow": 46.3,
    "diningtable": 37.2,
    "dog": 48.7,
    "horse": 53.8,
    "motorbike": 57.3,
    "person": 64.7,
    "pottedplant": 44.3,
    "sheep": 58.2,
    "sofa": 35.8,
    "train": 43.6,
    "tvmonitor": 47.4,
    "mean": 51.6,
}

MEAN_ROW = "mean"
DASH = "\u2013"  # "–", for undefined values, as in printed tables

# The files of one evaluation folder (a run's eval/, `weakseg evaluate`'s output): the one spelling of
# their names for the writers here and the readers (search trials, MLflow logging).
CLASSES_MD = "classes.md"
CLASSES_CSV = "classes.csv"
CONFUSION_PNG = "confusion.png"
IOU_PNG = "iou.png"
OVERLAYS_PNG = "overlays.png"
EVAL_FILES = (CLASSES_MD, CLASSES_CSV, CONFUSION_PNG, IOU_PNG, OVERLAYS_PNG)

# Column key -> header. Values in rows are percentages.
_COLUMNS: dict[str, str] = {
    "iou": "IoU (%)",
    "boundary_iou": "Boundary IoU (%)",
    "reference": "Reference (%)",
    "delta": "\u0394 (pp)",
}


def _write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write_with(Path(path), write)
    return Path(path)


# ---------------------------------------------------------------------------
# Per-class table
# ---------------------------------------------------------------------------


def _as_pct(x: float) -> float:
    return float(x) * 100.0  # NaN stays NaN


def format_percent(x: float | None, width: int = 0) -> str:
    """A fraction as "12.3%", "–" where undefined; `width` pads both for aligned console columns."""
    if x is None or math.isnan(float(x)):
        return f"{DASH:>{width - 1}}  " if width else DASH
    return f"{_as_pct(x):{width}.1f}%" if width else f"{_as_pct(x):.1f}%"


def _reference_value(reference: Mapping[str, float], key: str) -> float:
    if key not in reference:
        raise UserError(f"reference table has no entry for class {key!r}")
    try:
        return float(reference[key])
    except (TypeError, ValueError) as e:
        raise UserError(f"reference value for {key!r} is not a number: {reference[key]!r}") from e


def class_table(
    metrics: SegMetrics,
    boundary: BoundaryResult | None = None,
    reference: Mapping[str, float] | None = None,
) -> list[dict]:
    """Rows `{"class", "iou", ["boundary_iou"], ["reference", "delta"]}` in Table 1 order, then a mean row.

    Values are percentages (IoU × 100, NaN where undefined). `reference` maps
    class names (and "mean") to percentages, e.g. `PAPER_TABLE1_OURS`;
    `delta` = iou − reference in percentage points. The mean row holds
    `metrics.miou`, `boundary.miou` and `reference["mean"]` (the paper's
    printed mean), not means recomputed from the rows.
    """
    names = metrics.class_names
    if boundary is not None and tuple(boundary.class_names) != tuple(names):
        raise ValueError("boundary metrics and segmentation metrics have different class names")
    rows: list[dict] = []
    values = [(n, metrics.iou[i], None if boundary is None else boundary.iou[i]) for i, n in enumerate(names)]
    values.append((MEAN_ROW, metrics.miou, None if boundary is None else boundary.miou))
    for name, iou, biou in values:
        row: dict = {"class": name, "iou": _as_pct(iou)}
        if boundary is not None:
            row["boundary_iou"] = _as_pct(biou)
        if reference is not None:
            ref = _reference_value(reference, name)
            row["reference"] = ref
            row["delta"] = row["iou"] - ref
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping]) -> list[str]:
    if not rows:
        raise ValueError("empty class table")
    keys = set().union(*(r.keys() for r in rows))
    return [k for k in _COLUMNS if k in keys]


def _fmt(x, digits: int, signed: bool = False) -> str:
    if x is None or math.isnan(float(x)):
        return DASH
    return f"{float(x):+.{digits}f}" if signed else f"{float(x):.{digits}f}"


def format_class_table(rows: Sequence[Mapping]) -> str:
    """The rows as a Markdown table, one decimal like the paper's Table 1; "–" for undefined."""
    cols = _columns(rows)
    header = ["class"] + [_COLUMNS[c] for c in cols]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|",
    ]
    for r in rows:
        cells = [str(r["class"])] + [_fmt(r.get(c), 1, signed=(c == "delta")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_class_table(
    rows: Sequence[Mapping],
    csv_path: str | os.PathLike | None,
    md_path: str | os.PathLike | None,
) -> None:
    """Write the rows as CSV (full precision, empty cell for undefined) and/or Markdown."""
    cols = _columns(rows)
    if csv_path is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["class"] + cols)
        for r in rows:
            vals = [r.get(c) for c in cols]
            w.writerow([r["class"]] + ["" if v is None or math.isnan(float(v)) else f"{float(v):.4f}" for v in vals])
        _write_text(csv_path, buf.getvalue())
    if md_path is not None:
        _write_text(md_path, format_class_table(rows))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _save_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the Agg canvas; no global backend is touched

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=dpi)

    atomic_write_with(Path(path), write)
    return Path(path)


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, dpi: int = 100
) -> Path:
    """Row-normalised confusion matrix (rows = ground truth) as a PNG heat map.

    Each row shows where a class's pixels went, so rare classes are as
    readable as background; rows of classes absent from the ground truth are
    left blank.
    """
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    C = len(class_names)
    if m.shape != (C, C):
        raise ValueError(f"matrix shape {m.shape} does not match {C} class names")
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.full_like(m, np.nan), where=rows > 0)  # (C, C)
    size = max(4.0, 0.4 * C + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(norm), vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(C), labels=class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(C), labels=class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save_figure(fig, path, dpi)


def plot_iou_bars(
    iou: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    reference: Mapping[str, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Per-class IoU bars in %; `iou` as fractions (`SegMetrics.iou`), `reference` in % by class name.

    Undefined (NaN) classes get no bar and a "–" label.
    """
    from matplotlib.figure import Figure

    vals = np.asarray(iou, dtype=np.float64) * 100.0  # (C,)
    C = len(class_names)
    if vals.shape != (C,):
        raise ValueError(f"iou shape {vals.shape} does not match {C} class names")
    x = np.arange(C)
    width = 0.4 if reference is not None else 0.8
    fig = Figure(figsize=(max(6.0, 0.45 * C + 1.5), 4.0))
    ax = fig.add_subplot()
    shown = np.nan_to_num(vals, nan=0.0)
    offset = -width / 2 if reference is not None else 0.0
    ax.bar(x + offset, shown, width, label="this run")
    if reference is not None:
        ref = np.array([_reference_value(reference, n) for n in class_names])
        ax.bar(x + width / 2, ref, width, label="reference", alpha=0.7)
        ax.legend(fontsize=8)
    for i in np.flatnonzero(np.isnan(vals)):
        ax.text(x[i] + offset, 1.0, DASH, ha="center", va="bottom")
    ax.set_xticks(x, labels=class_names, rotation=90, fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    finite = vals[~np.isnan(vals)]
    ax.set_title(f"per-class IoU (mIoU {finite.mean():.1f}%)" if finite.size else "per-class IoU")
    fig.tight_layout()
    return _save_figure(fig, path, dpi)


def _colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 VOC colours (255 = void gets the devkit's cream)."""
    cmap = voc_colormap(256)
    lab = np.asarray(labels)
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError("labels must lie in [0, 255] to be coloured with the VOC palette")
    return cmap[lab.astype(np.int64)]


def _blend(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    colour = _colorize(labels).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


OVERLAY_HEADER = 18  # px of column titles above the grid
OVERLAY_GAP = 4  # px between cells


def save_overlays(
    items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    path: str | os.PathLike,
    max_items: int = 8,
    alpha: float = 0.6,
) -> Path:
    """A PNG grid, one row per item: image | prediction over image | ground truth over image.

    Items are (image (H, W, 3) uint8, pred (H, W), gt (H, W) or None); only the
    first `max_items` are used. Cells are (max H) × (max W) of those items,
    images placed top-left on grey; void (255) is drawn in the VOC void colour
    and a missing ground truth leaves its cell grey. The PNG is
    `OVERLAY_HEADER + n·Hmax + (n−1)·OVERLAY_GAP` high and
    `3·Wmax + 2·OVERLAY_GAP` wide.
    """
    from PIL import Image, ImageDraw

    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    cells: list[list[np.ndarray | None]] = []
    for k, item in enumerate(items):
        if k >= max_items:
            break
        image, pred, gt = item
        image = _as_numpy(image)
        pred = _as_numpy(pred)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"overlay item {k}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if pred.shape != image.shape[:2]:
            raise ValueError(f"overlay item {k}: pred shape {pred.shape} != image size {image.shape[:2]}")
        row = [image, _blend(image, pred, alpha), None]
        if gt is not None:
            gt = _as_numpy(gt)
            if gt.shape != image.shape[:2]:
                raise ValueError(f"overlay item {k}: gt shape {gt.shape} != image size {image.shape[:2]}")
            row[2] = _blend(image, gt, alpha)
        cells.append(row)
    if not cells:
        raise ValueError("save_overlays needs at least one item")
    hmax = max(r[0].shape[0] for r in cells)
    wmax = max(r[0].shape[1] for r in cells)
    n = len(cells)
    H = OVERLAY_HEADER + n * hmax + (n - 1) * OVERLAY_GAP
    W = 3 * wmax + 2 * OVERLAY_GAP
    canvas = np.full((H, W, 3), 128, dtype=np.uint8)  # (H, W, 3) grey
    canvas[:OVERLAY_HEADER] = 255
    for i, row in enumerate(cells):
        y = OVERLAY_HEADER + i * (hmax + OVERLAY_GAP)
        for j, cell in enumerate(row):
            if cell is None:
                continue
            x = j * (wmax + OVERLAY_GAP)
            canvas[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, title in enumerate(("image", "prediction", "ground truth")):
        draw.text((j * (wmax + OVERLAY_GAP) + 2, 3), title, fill=(0, 0, 0))

    def write(tmp: Path) -> None:
        img.save(tmp, format="PNG")

    atomic_write_with(Path(path), write)
    return Path(path)



# ---------------------------------------------------------------------------
# One evaluation's folder
# ---------------------------------------------------------------------------


def eval_files(out: Path) -> dict[str, Path]:
    """Every file an evaluation folder may hold, by name (not all are written by every evaluation)."""
    return {name: Path(out) / name for name in EVAL_FILES}


def write_tables(rows: Sequence[Mapping], out: Path) -> dict[str, Path]:
    """The per-class table as classes.csv and classes.md in `out`."""
    files = eval_files(out)
    write_class_table(rows, files[CLASSES_CSV], files[CLASSES_MD])
    return {CLASSES_MD: files[CLASSES_MD], CLASSES_CSV: files[CLASSES_CSV]}


def write_eval_artifacts(
    result: "EvalResult",
    class_names: Sequence[str],
    out: Path,
    *,
    reference: Mapping[str, float] | None = None,
    iou_bars: bool = False,
) -> dict[str, Path]:
    """An evaluation's tables and figures in `out`; the files written, by name.

    The IoU bar chart (`iou_bars`) is drawn for `weakseg evaluate`, not at each training evaluation.
    """
    files = write_tables(class_table(result.metrics, result.boundary, reference=reference), out)
    files[CONFUSION_PNG] = plot_confusion(result.metrics.matrix, class_names, Path(out) / CONFUSION_PNG)
    if iou_bars:
        files[IOU_PNG] = plot_iou_bars(result.metrics.iou, class_names, Path(out) / IOU_PNG, reference=reference)
    if result.overlays:
        files[OVERLAYS_PNG] = save_overlays(result.overlays, Path(out) / OVERLAYS_PNG)
    return files
