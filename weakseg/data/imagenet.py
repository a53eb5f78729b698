"""The paper's training set: ImageNet images of the 20 VOC classes, one class per image.

Layout: one folder per class under `root`, named either by the VOC class
(`cat/`) or by a WordNet id (`n02123045/`, as ImageNet ships them) that a
mapping file maps to a VOC class. The default mapping is the shipped
`imagenet_voc_synsets.tsv` (ILSVRC-2012 synsets under the VOC classes; its
header says how it was built and which classes are thin). Each image's labels
are background + its folder's class (paper §4.1: ImageNet images are taken to
hold one object class).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from weakseg.data.classes import NUM_CLASSES, VOC_CLASSES
from weakseg.data.voc import MAX_IMAGE_PIXELS, read_image
from weakseg.errors import UserError

Item = dict[str, Any]
DEFAULT_MAPPING = Path(__file__).with_name("imagenet_voc_synsets.tsv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared lower-cased: .JPEG is ImageNet's
_WNID = re.compile(r"n\d{8}")
_OBJECT_CLASSES = VOC_CLASSES[1:]


def read_mapping(path: Path) -> dict[str, str]:
    """wnid -> VOC class from a TSV (`wnid<TAB>voc_class[<TAB>anything]`, `#` comments)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"mapping file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"mapping file {path} cannot be read: {e}") from None
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2:
            raise UserError(f"{path}, line {lineno}: expected 'wnid<TAB>voc_class', got {raw!r}")
        wnid, cls = parts[0], parts[1]
        if not _WNID.fullmatch(wnid):
            raise UserError(f"{path}, line {lineno}: {wnid!r} is not a WordNet id like n02123045")
        if cls not in _OBJECT_CLASSES:
            raise UserError(
                f"{path}, line {lineno}: unknown VOC class {cls!r} for {wnid}; expected one of {_OBJECT_CLASSES}"
            )
        if wnid in out and out[wnid] != cls:
            raise UserError(
                f"{path}, line {lineno}: {wnid} maps to {cls!r} but line {first[wnid]} maps it to {out[wnid]!r}"
            )
        out[wnid] = cls
        first.setdefault(wnid, lineno)
    return out


class ImageNetSubset(Dataset):
    """ImageNet class folders as weakly labelled item dicts (no masks).

    Args:
        root: directory with one sub-folder per class (VOC name or wnid).
        transform: `item -> item`, applied last.
        mapping: wnid -> VOC class TSV; default: the shipped ILSVRC-2012 mapping.
        strict: folders that map to no VOC class are an error instead of being
            skipped with one warning.

    Item ids are `<folder>/<file stem>` (stems alone can repeat across folders).
    """

    def __init__(
        self,
        root: Path,
        *,
        transform: Callable[[Item], Item] | None = None,
        mapping: Path | None = None,
        strict: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.max_pixels = max_pixels
        self.root = Path(root).expanduser().resolve()
        self.transform = transform
        self.mapping_path = Path(mapping) if mapping is not None else DEFAULT_MAPPING
        wnid_to_class = read_mapping(self.mapping_path)
        if not self.root.is_dir():
            raise UserError(f"ImageNet root {self.root} is not a directory")

        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        unmapped = []
        self.folder_class: dict[str, str] = {}
        for name in folders:
            if name in _OBJECT_CLASSES:
                self.folder_class[name] = name
            elif name in wnid_to_class:
                self.folder_class[name] = wnid_to_class[name]
            else:
                unmapped.append(name)
        if unmapped:
            msg = (
                f"ImageNet root {self.root}: {len(unmapped)} folder(s) map to no VOC class "
                f"(not a VOC class name nor a wnid in {self.mapping_path}): {', '.join(unmapped)}"
            )
            if strict:
                raise UserError(msg)
            warnings.warn(msg + "; skipped", UserWarning, stacklevel=2)

        self.samples: list[tuple[Path, int]] = []
        self.ids: list[str] = []
        for name, cls in self.folder_class.items():
            files = sorted(
                e.name for e in os.scandir(self.root / name)
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
            for f in files:
                self.samples.append((self.root / name / f, VOC_CLASSES.index(cls)))
                self.ids.append(f"{name}/{os.path.splitext(f)[0]}")
        if not self.samples:
            raise UserError(
                f"ImageNet root {self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in any mapped class folder"
            )
        self.labels = torch.zeros(len(self.samples), NUM_CLASSES)  # (N, 21)
        self.labels[:, 0] = 1.0
        self.labels[torch.arange(len(self.samples)), torch.tensor([c for _, c in self.samples])] = 1.0

    def class_counts(self) -> dict[str, int]:
        """Images per VOC class (classes with none included), to spot thin classes."""
        counts = self.labels[:, 1:].sum(0).long().tolist()
        return dict(zip(_OBJECT_CLASSES, counts))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, _ = self.samples[index]
        item: Item = {"image": read_image(path, self.max_pixels), "labels": self.labels[index].clone(), "id": self.ids[index]}
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return f"ImageNetSubset(root={str(self.root)!r}, n={len(self)}, folders={len(self.folder_class)})"
