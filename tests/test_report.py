"""Per-class tables (parsed back) and figures (opened with PIL); an evaluation's folder; atomic writes."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.data.classes import VOC_CLASSES
from weakseg.errors import UserError
from weakseg.io import atomic_write_with as atomic_write
from weakseg.metrics import BoundaryMetrics, SegMetrics
from weakseg.report import (
    OVERLAY_GAP,
    OVERLAY_HEADER,
    PAPER_TABLE1_OURS,
    class_table,
    format_percent,
    format_class_table,
    plot_confusion,
    plot_iou_bars,
    save_overlays,
    write_class_table,
    write_eval_artifacts,
)

C = len(VOC_CLASSES)


def _hand_matrix():
    """A 21-class matrix whose IoUs are easy to state: class c has c + 2 correct
    pixels and c % 3 pixels mistaken for class 0; class 7 never occurs."""
    m = np.zeros((C, C), dtype=np.int64)
    for c in range(C):
        if c == 7:
            continue
        m[c, c] = c + 2
        m[c, 0] += c % 3
    return m


def _hand_iou(m):
    out = []
    for c in range(C):
        tp = m[c, c]
        union = sum(m[c, :]) + sum(m[:, c]) - tp
        out.append(tp / union if union else math.nan)
    return out


def _parse_markdown(text):
    lines = [ln for ln in text.strip().splitlines()]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace(":", "").replace("-", "").strip()) <= {""}
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def _no_temp_files(directory: Path, expected: set[str]):
    assert {p.name for p in directory.iterdir()} == expected


def test_paper_reference_column():
    assert list(PAPER_TABLE1_OURS) == list(VOC_CLASSES) + ["mean"]
    # Spot checks copied by hand from paper.md Table 1, column "Ours".
    assert PAPER_TABLE1_OURS["background"] == 85.4
    assert PAPER_TABLE1_OURS["bicycle"] == 28.3  # "bike"
    assert PAPER_TABLE1_OURS["chair"] == 10.6
    assert PAPER_TABLE1_OURS["pottedplant"] == 44.3  # "plant"
    assert PAPER_TABLE1_OURS["tvmonitor"] == 47.4
    assert PAPER_TABLE1_OURS["mean"] == 51.6
    # The printed mean is the mean of the 21 printed class values, to one decimal.
    assert round(sum(v for k, v in PAPER_TABLE1_OURS.items() if k != "mean") / C, 1) == 51.6


def test_markdown_and_csv_round_trip(tmp_path):
    m = _hand_matrix()
    metrics = SegMetrics.from_matrix(m)
    iou = _hand_iou(m)
    rows = class_table(metrics, reference=PAPER_TABLE1_OURS)
    write_class_table(rows, tmp_path / "t" / "iou.csv", tmp_path / "t" / "iou.md")
    _no_temp_files(tmp_path / "t", {"iou.csv", "iou.md"})

    header, md = _parse_markdown((tmp_path / "t" / "iou.md").read_text(encoding="utf-8"))
    assert header[0] == "class" and len(header) == 4
    assert [r[0] for r in md] == list(VOC_CLASSES) + ["mean"]
    for c, r in enumerate(md[:-1]):
        if math.isnan(iou[c]):
            assert r[1] == "\u2013" and r[3] == "\u2013"
        else:
            assert float(r[1]) == round(iou[c] * 100, 1)
            assert float(r[3]) == round(iou[c] * 100 - PAPER_TABLE1_OURS[VOC_CLASSES[c]], 1)
        assert float(r[2]) == PAPER_TABLE1_OURS[VOC_CLASSES[c]]
    mean = np.nanmean(iou)
    assert float(md[-1][1]) == round(mean * 100, 1)
    assert float(md[-1][2]) == 51.6

    with open(tmp_path / "t" / "iou.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["class", "iou", "reference", "delta"]
    assert [r[0] for r in table[1:]] == list(VOC_CLASSES) + ["mean"]
    for c, r in enumerate(table[1:-1]):
        if math.isnan(iou[c]):
            assert r[1] == ""
        else:
            assert float(r[1]) == pytest.approx(iou[c] * 100, abs=1e-4)
    assert float(table[-1][1]) == pytest.approx(mean * 100, abs=1e-4)


def test_boundary_column_and_missing_reference_key(tmp_path):
    m = _hand_matrix()
    bm = BoundaryMetrics()
    t = np.zeros((20, 20), dtype=np.int64)
    t[5:15, 5:15] = 3
    bm.update(t, t)
    rows = class_table(SegMetrics.from_matrix(m), boundary=bm.compute())
    text = format_class_table(rows)
    header, md = _parse_markdown(text)
    assert header == ["class", "IoU (%)", "Boundary IoU (%)"]
    assert md[0][2] == "100.0" and md[3][2] == "100.0" and md[1][2] == "\u2013"
    assert md[-1][2] == "100.0"
    with pytest.raises(UserError, match="cat"):
        class_table(SegMetrics.from_matrix(m), reference={k: 1.0 for k in VOC_CLASSES if k != "cat"})


def test_figures_open_with_pil(tmp_path):
    m = _hand_matrix()
    iou = SegMetrics.from_matrix(m).iou
    p1 = plot_confusion(m, VOC_CLASSES, tmp_path / "fig" / "confusion.png")
    p2 = plot_iou_bars(iou, VOC_CLASSES, tmp_path / "fig" / "iou.png", reference=PAPER_TABLE1_OURS)
    for p in (p1, p2):
        with Image.open(p) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert w > 200 and h > 200
            # Not a blank canvas.
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 5
    _no_temp_files(tmp_path / "fig", {"confusion.png", "iou.png"})
    with pytest.raises(ValueError):
        plot_confusion(m[:3, :3], VOC_CLASSES, tmp_path / "bad.png")


def test_overlay_grid_layout_and_colours(tmp_path):
    img1 = np.full((20, 30, 3), 100, dtype=np.uint8)
    pred1 = np.zeros((20, 30), dtype=np.int64)
    pred1[:, 15:] = 1
    gt1 = np.full((20, 30), 255, dtype=np.int64)
    gt1[:10] = 1
    img2 = np.full((25, 16, 3), 50, dtype=np.uint8)
    pred2 = np.full((25, 16), 15, dtype=np.int64)
    extra = (img1, pred1, gt1)
    path = save_overlays([(img1, pred1, gt1), (img2, pred2, None), extra], tmp_path / "o" / "ov.png", max_items=2)
    _no_temp_files(tmp_path / "o", {"ov.png"})
    with Image.open(path) as im:
        assert im.size == (3 * 30 + 2 * OVERLAY_GAP, OVERLAY_HEADER + 2 * 25 + OVERLAY_GAP)
        a = np.asarray(im.convert("RGB")).astype(int)
    y0, y1 = OVERLAY_HEADER, OVERLAY_HEADER + 25 + OVERLAY_GAP
    x1, x2 = 30 + OVERLAY_GAP, 2 * (30 + OVERLAY_GAP)
    assert list(a[y0 + 5, 5]) == [100, 100, 100]  # the image itself
    # VOC colours: background (0,0,0), aeroplane (128,0,0), person (192,128,128),
    # void (224,224,192); blended 0.4 image + 0.6 colour, rounded.
    assert list(a[y0 + 5, x1 + 2]) == [40, 40, 40]
    assert list(a[y0 + 5, x1 + 20]) == [117, 40, 40]
    assert list(a[y0 + 2, x2 + 2]) == [117, 40, 40]
    assert list(a[y0 + 15, x2 + 2]) == [174, 174, 155]
    assert list(a[y1 + 3, 3]) == [50, 50, 50]
    assert list(a[y1 + 3, x1 + 3]) == [135, 97, 97]
    assert list(a[y1 + 3, x2 + 3]) == [128, 128, 128]  # no ground truth: grey
    assert list(a[y0 + 22, 3]) == [128, 128, 128]  # padding below the shorter image
    with pytest.raises(ValueError, match="item 0"):
        save_overlays([(img1, pred2, None)], tmp_path / "bad.png")


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    _no_temp_files(tmp_path, {"keep.txt"})
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_eval_folder_holds_exactly_the_files_returned(tmp_path):
    from types import SimpleNamespace

    metrics = SegMetrics.from_matrix(_hand_matrix(), VOC_CLASSES)
    img = np.zeros((4, 5, 3), np.uint8)
    plain = SimpleNamespace(metrics=metrics, boundary=None, overlays=[])
    files = write_eval_artifacts(plain, VOC_CLASSES, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["classes.csv", "classes.md", "confusion.png"]
    assert {n: p.name for n, p in files.items()} == {n: n for n in ("classes.md", "classes.csv", "confusion.png")}
    full = SimpleNamespace(metrics=metrics, boundary=None, overlays=[(img, np.zeros((4, 5), np.int64), None)])
    files = write_eval_artifacts(full, VOC_CLASSES, tmp_path / "b", reference=PAPER_TABLE1_OURS, iou_bars=True)
    names = ["classes.csv", "classes.md", "confusion.png", "iou.png", "overlays.png"]
    assert sorted(os.listdir(tmp_path / "b")) == names and sorted(files) == names
    with open(files["classes.csv"], newline="") as f:
        assert next(csv.reader(f)) == ["class", "iou", "reference", "delta"]


def test_format_percent_both_layouts():
    assert format_percent(0.1234) == "12.3%" and format_percent(math.nan) == "\u2013"
    assert format_percent(0.05, width=5) == "  5.0%" and format_percent(None, width=5) == "   \u2013  "
    assert len(format_percent(None, width=5)) == len(format_percent(1.0, width=5)) == 6
