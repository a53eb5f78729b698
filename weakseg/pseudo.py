"""A second stage, as modern weakly supervised segmentation does: pseudo labels from a weak model.

`write_pseudo_labels` runs a trained model on the training images, keeps only
the classes each image is labelled with (background always), refines the
probabilities with the dense CRF, and writes the argmax as a VOC palette PNG
per image, with 255 (ignored by the loss) wherever the refined winner's
probability is below `threshold`. Training with `supervision=pseudo` and
`data.pseudo_root=DIR` then fits a fresh model to these maps with the fully
supervised cross-entropy.

    DIR/<id>.png      label maps at the image's size (0 = background, 255 = uncertain)
    DIR/pseudo.json   checkpoint, split, threshold, CRF settings and label statistics
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from weakseg.crf import CRFParams, refine
from weakseg.data.classes import IGNORE_INDEX, voc_palette
from weakseg.errors import UserError

MANIFEST = "pseudo.json"


def restrict_to_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """probs (C, H, W) with the classes not in the image's labels (C,) zeroed and renormalised (background kept)."""
    keep = (labels > 0.5).to(probs.dtype).clone()
    keep[0] = 1.0
    p = probs * keep[:, None, None]
    return p / p.sum(0, keepdim=True).clamp(min=1e-12)


def label_map(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """(C, H, W) refined probabilities -> uint8 (H, W): argmax over the image's classes, 255 below `threshold`."""
    keep = labels > 0.5
    keep[0] = True
    p = np.where(keep[:, None, None], probs, 0.0)
    pred = p.argmax(0).astype(np.uint8)
    pred[p.max(0) < threshold] = IGNORE_INDEX
    return pred


def write_pseudo_labels(
    checkpoint: Path,
    out: Path,
    *,
    data_root: Path | None = None,
    split: str = "train",
    threshold: float = 0.8,
    crf: CRFParams | None = CRFParams(),
    device: str = "auto",
    force: bool = False,
    limit: int = 0,
) -> dict:
    """Write CRF-refined pseudo label maps of `split` under `out`; return the manifest."""
    from weakseg.checkpoint import load_model
    from weakseg.data import build
    from weakseg.data.transforms import eval_transform
    from weakseg.data.voc import VOCSegmentation
    from weakseg.engine import amp_dtype, predict_probs, resolve_device

    if not 0 <= threshold < 1:
        raise UserError(f"pseudo-labels: --threshold must lie in [0, 1), got {threshold}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MANIFEST).is_file():
            raise UserError(f"pseudo-labels: {out} exists and is not an empty folder nor earlier pseudo labels "
                            f"(no {MANIFEST}); choose a new --out")
        if not force:
            raise UserError(f"pseudo-labels: {out} already holds pseudo labels; pass --force to replace them")
    dev = resolve_device(device)
    model, cfg, _ = load_model(Path(checkpoint), dev)
    root = data_root if data_root is not None else build.ensure_synthetic(cfg.data)
    ds = VOCSegmentation(root, split, with_masks=False, transform=eval_transform(),
                         labels_file=Path(cfg.data.labels_file) if cfg.data.labels_file else None)
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    counts = np.zeros(256, np.int64)
    try:
        os.chmod(tmp, 0o755)
        amp = amp_dtype(cfg, dev)
        for i in range(n):
            item = ds[i]
            probs = predict_probs(model, item["image"][None].to(dev), amp)[0].float().cpu()  # (C, H, W)
            probs = restrict_to_labels(probs, item["labels"])
            p = probs.numpy()
            if crf is not None:
                p = refine(item["image"].permute(1, 2, 0).numpy(), p, crf)
            lab = label_map(p, item["labels"].numpy(), threshold)
            counts += np.bincount(lab.ravel(), minlength=256)
            png = Image.fromarray(lab)
            png.putpalette(voc_palette())
            png.save(tmp / f"{item['id']}.png", format="PNG")
        real = counts[:IGNORE_INDEX].sum()
        manifest = {
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(Path(checkpoint)),
            "data_root": str(Path(root).resolve()), "split": split,
            "images": n, "threshold": threshold, "crf": None if crf is None else vars(crf),
            "ignored_share": float(counts[IGNORE_INDEX] / max(counts.sum(), 1)),
            "foreground_share": float(counts[1:IGNORE_INDEX].sum() / max(real, 1)),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"pseudo labels of {n} {split} images written to {out} ({100 * manifest['ignored_share']:.1f}% ignored, "
          f"{100 * manifest['foreground_share']:.1f}% of the rest foreground)", file=sys.stdout)
    return manifest


def file_sha256(path: Path) -> str:
    """The file's SHA-256: the manifest pins the checkpoint's content, not just its (overwritable) path."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_pseudo_labels(
    checkpoint: Path,
    out: Path,
    *,
    data_root: Path,
    threshold: float,
    crf: CRFParams | None,
    replace: bool,
    device: str = "auto",
) -> dict:
    """Pseudo labels of data_root's train split from `checkpoint` in `out`, written once and reused after.

    Reused when out's manifest names the same checkpoint content, data, threshold and CRF. Otherwise they
    are rewritten if `replace` (a search starting), else refused: a resumed search's trials must not find
    other labels than those they started on.
    """
    want = {"checkpoint_sha256": file_sha256(checkpoint), "data_root": str(Path(data_root).resolve()),
            "split": "train", "threshold": threshold, "crf": None if crf is None else json.loads(json.dumps(vars(crf)))}
    manifest = Path(out) / MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        differs = [k for k, v in want.items() if have.get(k) != v]
        if not differs:
            print(f"pseudo labels: reusing {out} ({have.get('images')} images from {have.get('checkpoint')})",
                  flush=True)
            return have
        if not replace:
            raise UserError(f"pseudo labels in {out} were made with another {', '.join(differs)} than "
                            f"settings.pseudo_labels asks for ({checkpoint}); --restart the search to remake them")
    return write_pseudo_labels(checkpoint, out, data_root=data_root, split="train", threshold=threshold, crf=crf,
                               device=device, force=True)
