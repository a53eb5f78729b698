"""A content digest of the data a run trains and evaluates on, for lineage (the MLflow dataset input).

The digest covers, per split, the ordered id list, every listed file's name and size
(images, masks) and the image-level labels the run reads. File contents are not read:
a full VOC is gigabytes, and a changed image almost always changes its size too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakseg.config import Config


@dataclass(frozen=True)
class DataFingerprint:
    name: str  # e.g. "synthetic:train+val"
    digest: str  # sha256 hex, first 16 characters
    source: str  # the data root, as a file URI
    images: dict[str, int]  # split -> number of images


def _files(ds: Any) -> list[Path]:
    if hasattr(ds, "image_paths"):  # VOCSegmentation
        return [*ds.image_paths, *(p for p in (getattr(ds, "mask_paths", None) or []) if p is not None)]
    return [p for p, _ in getattr(ds, "samples", [])]  # ImageNetSubset


def _update(h: Any, split: str, ds: Any, root: Path) -> int:
    h.update(f"split {split}\n".encode())
    files = _files(ds)
    for i in getattr(ds, "ids", []):
        h.update(f"id {i}\n".encode())
    for p in files:
        rel = p.relative_to(root) if p.is_relative_to(root) else p
        h.update(f"file {rel.as_posix()} {p.stat().st_size}\n".encode())
    labels = getattr(ds, "labels", None)
    if labels is not None:
        h.update(labels.numpy().tobytes())
    return len(getattr(ds, "ids", None) or files)


def fingerprint(cfg: Config) -> DataFingerprint:
    """Digest of the training split and the evaluation split `cfg` names (builds both data sets)."""
    from weakseg.data import build

    d = cfg.data
    root = build.ensure_synthetic(d).resolve() if d.dataset != "imagenet" else Path(d.train_root or ".").resolve()
    h = hashlib.sha256()
    images = {d.train_split if d.dataset != "imagenet" else "imagenet": _update(h, d.train_split, build.train_dataset(cfg), root)}
    val = build.eval_dataset(cfg)
    images[d.val_split] = _update(h, d.val_split, val, Path(val.root))
    return DataFingerprint(
        name=f"{d.dataset}:{'+'.join(images)}", digest=h.hexdigest()[:16], source=root.as_uri(), images=images
    )
