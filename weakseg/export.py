"""`weakseg export-voc`: the PASCAL VOC 2012 evaluation server's segmentation submission.

The server wants a .tar.gz holding

    results/VOC2012/Segmentation/comp6_test_cls/<id>.png

for every id of the test split: comp6 is the competition for methods trained on
data beyond VOC (the paper trains on ImageNet). Each PNG is single-channel,
palette-indexed with the VOC colour map, values 0–20 only, and exactly the size
of its image. Every file is checked before packing; the archive is written to
a temporary file and renamed, and an existing archive is kept unless `force`.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from weakseg.crf import CRFParams
from weakseg.data.classes import NUM_CLASSES, voc_colormap, voc_palette
from weakseg.errors import UserError
from weakseg.io import atomic_path

COMPETITION = "comp6"  # trained on data other than (or beyond) VOC 2012
RESULTS_SUBDIR = Path("results") / "VOC2012" / "Segmentation" / f"{COMPETITION}_test_cls"
SERVER = "http://host.robots.ox.ac.uk:8080/"


def write_prediction(path: Path, pred: np.ndarray) -> None:
    """One palette PNG: mode "P", VOC colour map, class indices as pixel values."""
    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path, format="PNG")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding it."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"export: cannot read the size of {path} ({e})") from None


def verify_predictions(folder: Path, expected: dict[str, tuple[int, int]]) -> None:
    """Every id present, nothing else, each PNG palette-indexed, VOC colours, values 0–20, its image's size."""
    found = {p.stem for p in folder.glob("*.png")}
    missing = sorted(set(expected) - found)
    if missing:
        raise UserError(f"export: {len(missing)} prediction(s) missing in {folder}, e.g. {missing[:3]}")
    extra = sorted(found - set(expected))
    if extra:
        raise UserError(f"export: {folder} holds predictions for ids not in the split, e.g. {extra[:3]}")
    cmap = voc_colormap(NUM_CLASSES)
    for image_id, (h, w) in expected.items():
        path = folder / f"{image_id}.png"
        with Image.open(path) as im:
            if im.mode != "P":
                raise UserError(f"export: {path} is mode {im.mode}, the server needs palette mode 'P'")
            if im.size != (w, h):
                raise UserError(f"export: {path} is {im.size[0]}x{im.size[1]}, its image is {w}x{h}")
            pal = np.array(im.getpalette()[: 3 * NUM_CLASSES], dtype=np.uint8).reshape(-1, 3)
            if not np.array_equal(pal, cmap):
                raise UserError(f"export: {path} does not use the VOC colour map")
            values = np.unique(np.asarray(im))
        if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
            raise UserError(f"export: {path} has values {values[values >= NUM_CLASSES][:5].tolist()} outside 0–20")


def pack(stage: Path, out: Path, force: bool) -> None:
    """tar.gz of stage/results/..., written atomically; an existing archive is kept unless `force`."""
    if out.exists() and not force:
        raise UserError(f"export: {out} already exists (pass --force to replace it)")
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted((stage / RESULTS_SUBDIR).glob("*.png")):
                tar.add(path, arcname=str(RESULTS_SUBDIR / path.name))


def export_voc(
    checkpoint: Path,
    out: Path,
    *,
    data_root: Path | None = None,
    split: str = "test",
    crf: CRFParams | None = None,
    crf_workers: int = 2,
    device: str = "auto",
    force: bool = False,
    workers: int = 2,
    limit: int = 0,
) -> Path:
    """Predict every image of `split` with `checkpoint` and write the server's tarball to `out`."""
    from weakseg.checkpoint import load_model
    from weakseg.data import build
    from weakseg.data.voc import VOCSegmentation
    from weakseg.engine import amp_dtype, predict_probs, resolve_device

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"export: {out} already exists (pass --force to replace it)")
    dev = resolve_device(device)
    model, cfg, _ = load_model(Path(checkpoint), dev)
    root = Path(data_root) if data_root is not None else build.voc_root(cfg.data)
    voc = VOCSegmentation(root, split, with_masks=False, with_labels=False)
    ds = build.limit(voc, limit)
    # What the server will check, from the split list and the JPEG headers, not from the predictions
    expected = {i: image_size(path) for i, path in zip(voc.ids[: len(ds)], voc.image_paths)}
    loader = build.eval_loader(ds, build.LoaderOptions(workers=workers, pin_memory=dev.type == "cuda"))
    amp = amp_dtype(cfg, dev)

    def predictions() -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
        for batch in loader:
            image = batch["image"].to(dev, non_blocking=True)
            yield batch["id"][0], batch["image"][0], predict_probs(model, image, amp)[0]

    with tempfile.TemporaryDirectory(prefix="weakseg-export-", dir=out.parent if out.parent.exists() else None) as t:
        stage = Path(t)
        folder = stage / RESULTS_SUBDIR
        folder.mkdir(parents=True)
        stream = predictions()
        if crf is not None:
            from weakseg.crf import refine_stream

            stream = refine_stream(stream, crf, crf_workers)
        for n, (image_id, image, probs) in enumerate(stream, 1):
            pred = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()  # (H, W) at the image's own size
            write_prediction(folder / f"{image_id}.png", pred)
            if n % 200 == 0:
                print(f"export: {n}/{len(ds)} images", file=sys.stderr, flush=True)
        verify_predictions(folder, expected)
        out.parent.mkdir(parents=True, exist_ok=True)
        pack(stage, out, force)
    return out


def read_archive(path: Path, into: Path) -> Path:
    """Unpack a submission (for checks): returns the comp6 folder."""
    with tarfile.open(path, "r:gz") as tar:
        tar.extractall(into, filter="data")
    return into / RESULTS_SUBDIR


def upload_instructions(path: Path, split: str) -> str:
    """What was written (its predictions counted in the archive) and where to submit it."""
    with tarfile.open(path, "r:gz") as tar:
        n = sum(1 for m in tar.getmembers() if m.name.endswith(".png"))
    return (
        f"wrote {path} ({n} predictions of VOC 2012 {split}, {COMPETITION}: trained on data beyond VOC)\n"
        f"submit it at {SERVER} (log in, 'Submit results', challenge VOC2012, Segmentation, {COMPETITION})"
    )
