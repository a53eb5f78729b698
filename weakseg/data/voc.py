"""PASCAL VOC 2012 segmentation data (devkit layout), with SBD `train_aug`.

Image-level labels come from the XML annotations: the set of every
`<annotation>/<object>/<name>`, difficult and truncated objects included (a
difficult object is still in the image, and leaving its class out would tell
the model it is absent). Person-layout `<part>` names (head, hand, foot) are
not objects and are ignored. Alternatively labels come from a text file
(`labels_file`, see `read_labels_file`). Labels never come from the masks:
with `with_masks=False` no mask file is touched, so weak training cannot leak
pixel supervision.

Everything a typo can break is checked when the dataset is built (split file,
ids, every file's existence, every annotation), so a bad data set fails before
training starts rather than an hour in.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from weakseg.data.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from weakseg.errors import UserError

Item = dict[str, Any]
CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
VALID_MASK_VALUES = frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}
_MAX_LISTED = 5  # how many culprits an error message names before "and N more"


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


MAX_IMAGE_PIXELS = 40_000_000  # the default of `data.max_pixels`


def read_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W); a missing, truncated, corrupt or oversized file is a UserError.

    The size is checked from the header, before decoding: a 12500x12500 JPEG is 470 MB as RGB and
    several GB once transformed, and Pillow only warns below its own (much larger) bomb limit."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise UserError(f"image file {path} is {im.width}x{im.height} = {im.width * im.height} pixels, "
                                f"above the limit of {max_pixels} (data.max_pixels)")
            im.load()  # decode now: a truncated file fails here, not later
            rgb = im.convert("RGB")  # grey, CMYK and palette images exist in the wild
    except FileNotFoundError:
        raise UserError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"image file {path} is corrupt or truncated: {e}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def _check_mask_values(mask: np.ndarray, path: Path) -> None:
    values = np.unique(mask)
    bad = [int(v) for v in values if int(v) not in VALID_MASK_VALUES]
    if bad:
        raise UserError(
            f"mask {path} has values {_listing(bad)} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX} (void)"
        )


def read_mask(path: Path) -> torch.Tensor:
    """A class mask as int64 (H, W) with values 0..20 and 255 (void).

    PNG masks must be palette-indexed ("P", as VOC's SegmentationClass) or
    single-channel ("L", as SegmentationClassAug); an RGB colour mask is
    rejected (its colours are not class indices). SBD `.mat` files
    (`GTcls.Segmentation`) are read with scipy.
    """
    if path.suffix == ".mat":
        arr = _read_sbd_mat(path)
    else:
        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                arr = np.array(im)
        except FileNotFoundError:
            raise UserError(f"mask file {path} does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"mask file {path} is corrupt or truncated: {e}") from None
        if mode not in ("P", "L"):
            raise UserError(
                f"mask file {path} has image mode {mode!r}; expected a palette ('P') or grey ('L') PNG "
                "whose pixel values are class indices"
            )
    _check_mask_values(arr, path)
    return torch.from_numpy(arr.astype(np.int64))  # (H, W)


def _read_sbd_mat(path: Path) -> np.ndarray:
    import scipy.io  # scipy is only needed for SBD's .mat masks

    try:
        mat = scipy.io.loadmat(str(path), struct_as_record=False, squeeze_me=True)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except FileNotFoundError:
        raise UserError(f"SBD mask file {path} does not exist") from None
    except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        raise UserError(f"SBD mask file {path} is not a readable GTcls.Segmentation .mat: {e}") from None
    if seg.ndim != 2:
        raise UserError(f"SBD mask file {path}: GTcls.Segmentation has shape {seg.shape}, expected 2-D")
    return seg


def read_annotation_labels(path: Path) -> list[str]:
    """The class names of every `<object>` of a VOC XML annotation, in file order (repeats kept).

    Entity and DTD declarations are rejected (no entity expansion from local
    files either); an annotation without objects is a UserError: for weak
    training such an image teaches nothing and is almost always a data bug.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"annotation file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"annotation file {path} cannot be read: {e}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise UserError(f"annotation file {path} declares a DTD or entities; refusing to parse it")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise UserError(f"annotation file {path} is not valid XML: {e}") from None
    if root.tag != "annotation":
        raise UserError(f"annotation file {path}: root element is <{root.tag}>, expected <annotation>")
    names = []
    for obj in root.findall("object"):
        el = obj.find("name")
        name = (el.text or "").strip() if el is not None else ""
        if not name:
            raise UserError(f"annotation file {path}: an <object> has no <name>")
        if name not in CLASS_INDEX or name == "background":
            raise UserError(
                f"annotation file {path}: unknown class name {name!r}; expected one of {VOC_CLASSES[1:]}"
            )
        names.append(name)
    if not names:
        raise UserError(f"annotation file {path} has no <object>: no image-level label for this image")
    return names


def labels_vector(names: Iterable[str]) -> torch.Tensor:
    """float32 (21,) multi-hot of class names, background always set."""
    y = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    y[0] = 1.0
    for n in names:
        y[CLASS_INDEX[n]] = 1.0
    return y


# ---------------------------------------------------------------------------
# Ids and split files
# ---------------------------------------------------------------------------

_BAD_ID = re.compile(r"[/\\\x00\s]")


def check_id(image_id: str, source: str, line: int) -> None:
    """Reject ids that are not plain file stems: they would address files outside the data root.

    `source` and `line` name where the id came from (for the message).
    """
    where = f"{source}, line {line}"
    if not image_id:
        raise UserError(f"{where}: empty id")
    if "\x00" in image_id:
        raise UserError(f"{where}: id {image_id!r} contains a NUL byte")
    if _BAD_ID.search(image_id):
        raise UserError(
            f"{where}: id {image_id!r} contains a path separator or whitespace; "
            "expected one plain id per line such as 2008_000123"
        )
    if ".." in image_id or image_id in (".",) or os.path.isabs(image_id) or re.match(r"^[A-Za-z]:", image_id):
        raise UserError(f"{where}: id {image_id!r} is a path, not an id (it resolves outside the data root)")
    if not image_id.isprintable():
        raise UserError(f"{where}: id {image_id!r} contains control characters")


def read_split_file(path: Path) -> list[str]:
    """The ids of a split file (one per line; blank lines skipped), validated, in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"split file {path} cannot be read: {e}") from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        image_id = raw.strip()
        if not image_id:
            continue
        check_id(image_id, str(path), lineno)
        if image_id in seen:
            raise UserError(f"{path}, line {lineno}: id {image_id!r} repeats line {seen[image_id]}")
        seen[image_id] = lineno
        ids.append(image_id)
    if not ids:
        raise UserError(f"split file {path} lists no ids")
    return ids


def read_labels_file(path: Path) -> dict[str, list[str]]:
    """Image-level labels from a text file: `id<TAB>class,class,...` per line.

    Blank lines and lines starting with `#` are skipped; class names are VOC
    names (`background` may be listed and is implied anyway); at least one
    object class per id. Ids are checked like split-file ids. The file may
    cover more ids than a split uses.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"labels file {path} cannot be read: {e}") from None
    out: dict[str, list[str]] = {}
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise UserError(
                f"{path}, line {lineno}: expected 'id<TAB>class,class,...', got {raw!r}"
            )
        image_id, classes = parts[0].strip(), parts[1].strip()
        check_id(image_id, str(path), lineno)
        if image_id in lines:
            raise UserError(f"{path}, line {lineno}: id {image_id!r} repeats line {lines[image_id]}")
        names = [c.strip() for c in classes.split(",") if c.strip()]
        for n in names:
            if n not in CLASS_INDEX:
                raise UserError(
                    f"{path}, line {lineno}: unknown class name {n!r} for id {image_id!r}; "
                    f"expected one of {VOC_CLASSES[1:]}"
                )
        names = [n for n in names if n != "background"]
        if not names:
            raise UserError(f"{path}, line {lineno}: id {image_id!r} has no object class")
        lines[image_id] = lineno
        out[image_id] = names
    return out


# ---------------------------------------------------------------------------
# Roots
# ---------------------------------------------------------------------------


def resolve_voc_root(root: Path) -> Path:
    """The `VOC2012` directory from it, its `VOCdevkit` parent, or the directory holding `VOCdevkit`."""
    root = Path(root).expanduser()
    candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
    for c in candidates:
        if (c / "JPEGImages").is_dir() and (c / "ImageSets").is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"VOC root {root}: no VOC2012 directory (with JPEGImages/ and ImageSets/) found; tried {tried}"
    )


def resolve_sbd_root(root: Path) -> Path:
    """SBD's `dataset` directory (train.txt, val.txt, img/, cls/) from it or its parents."""
    root = Path(root).expanduser()
    candidates = [root / "benchmark_RELEASE" / "dataset", root / "dataset", root]
    for c in candidates:
        if (c / "train.txt").is_file() and (c / "cls").is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise UserError(f"SBD root {root}: no SBD 'dataset' directory (with train.txt and cls/) found; tried {tried}")


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 segmentation split as item dicts (see `weakseg.data.transforms`).

    Args:
        root: the `VOC2012` dir, its `VOCdevkit` parent, or the dir holding `VOCdevkit`.
        split: a name in `ImageSets/Segmentation/` (`train`, `val`, `trainval`,
            `test`), or `train_aug` (SBD-augmented train, see below).
        with_masks: load and return `"mask"`; False for weak training, which
            then never opens a mask file.
        transform: `item -> item`, applied last.
        labels_file: image-level labels from this file instead of the XMLs
            (format: `read_labels_file`).
        sbd_root: SBD (`benchmark_RELEASE/dataset` or a parent) to build
            `train_aug` and to read its masks from `cls/<id>.mat`.
        with_labels: False skips labels altogether (for the VOC test set,
            whose annotations list no objects): `"labels"` is then background
            only and must not be used for training.
        mask_root: read masks as `<mask_root>/<id>.png` only (pseudo labels,
            see `weakseg.pseudo`).

    `train_aug`: `ImageSets/Segmentation/train_aug.txt` when it exists, else
    (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted; labels from the VOC
    XMLs, which exist for every SBD image. Masks are looked up in
    `SegmentationClass/`, then `SegmentationClassAug/`, then SBD `cls/*.mat`.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        *,
        with_masks: bool,
        transform: Callable[[Item], Item] | None = None,
        labels_file: Path | None = None,
        sbd_root: Path | None = None,
        with_labels: bool = True,
        max_pixels: int = MAX_IMAGE_PIXELS,
        mask_root: Path | None = None,
    ) -> None:
        self.max_pixels = max_pixels
        self.root = resolve_voc_root(root)
        self.split = split
        self.with_masks = bool(with_masks)
        self.transform = transform
        self.sbd_root = resolve_sbd_root(sbd_root) if sbd_root is not None else None
        self.mask_root = Path(mask_root) if mask_root is not None else None
        if not split or not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or ".." in split:
            raise UserError(f"VOC root {self.root}: bad split name {split!r}")
        self.ids = self._read_ids(split)
        if not self.ids:
            raise UserError(f"split {split!r} (VOC root {self.root}) has no ids")

        self.image_paths = [self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        _require_files(self.image_paths, "image", self.root, split)
        self.mask_paths: list[Path] | None = self._find_masks() if self.with_masks else None

        if not with_labels:
            self.labels = torch.zeros(len(self.ids), NUM_CLASSES)
            self.labels[:, 0] = 1.0
        elif labels_file is not None:
            table = read_labels_file(Path(labels_file))
            missing = [i for i in self.ids if i not in table]
            if missing:
                raise UserError(
                    f"labels file {labels_file} has no line for {len(missing)} id(s) of split "
                    f"{split!r} ({self.root}): {_listing(missing)}"
                )
            self.labels = torch.stack([labels_vector(table[i]) for i in self.ids])
        else:
            xmls = [self.root / "Annotations" / f"{i}.xml" for i in self.ids]
            _require_files(xmls, "annotation", self.root, split)
            # Parsed once, kept in memory: ~1 s for 10k files, and every bad file fails now.
            self.labels = torch.stack([labels_vector(read_annotation_labels(p)) for p in xmls])

    def _read_ids(self, split: str) -> list[str]:
        seg = self.root / "ImageSets" / "Segmentation"
        path = seg / f"{split}.txt"
        if split != "train_aug" or path.is_file():
            if not path.is_file():
                have = sorted(p.stem for p in seg.glob("*.txt")) if seg.is_dir() else []
                raise UserError(
                    f"split {split!r}: split file {path} does not exist (VOC root {self.root}); "
                    f"available splits: {have}"
                )
            return read_split_file(path)
        if self.sbd_root is None:
            raise UserError(
                f"split 'train_aug': {path} does not exist and no SBD root was given "
                "(sbd_root: SBD's benchmark_RELEASE/dataset) to build it from"
            )
        sbd = set(read_split_file(self.sbd_root / "train.txt"))
        sbd_val = self.sbd_root / "val.txt"
        if sbd_val.is_file():
            sbd |= set(read_split_file(sbd_val))
        voc_train = set(read_split_file(seg / "train.txt"))
        voc_val = set(read_split_file(seg / "val.txt"))
        return sorted((sbd | voc_train) - voc_val)

    def _find_masks(self) -> list[Path]:
        dirs = [self.root / "SegmentationClass", self.root / "SegmentationClassAug"]
        if self.mask_root is not None:  # pseudo labels: only there
            dirs = [self.mask_root]
        paths, missing = [], []
        for i in self.ids:
            tried = [d / f"{i}.png" for d in dirs]
            if self.sbd_root is not None:
                tried.append(self.sbd_root / "cls" / f"{i}.mat")
            found = next((p for p in tried if p.is_file()), None)
            if found is None:
                missing.append(tried[0])
            paths.append(found)
        if missing:
            raise UserError(
                f"split {self.split!r} (VOC root {self.root}): {len(missing)} mask file(s) missing: "
                f"{_listing(missing)}" + ("" if self.sbd_root else " (no SBD root given for cls/*.mat masks)")
            )
        return paths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Item:
        image = read_image(self.image_paths[index], self.max_pixels)
        item: Item = {"image": image, "labels": self.labels[index].clone(), "id": self.ids[index]}
        if self.mask_paths is not None:
            path = self.mask_paths[index]
            mask = read_mask(path)
            if tuple(mask.shape) != tuple(image.shape[-2:]):
                raise UserError(
                    f"mask {path} is {tuple(mask.shape)} (H, W) but image "
                    f"{self.image_paths[index]} is {tuple(image.shape[-2:])}"
                )
            item["mask"] = mask
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return (f"VOCSegmentation(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"with_masks={self.with_masks})")


def _require_files(paths: Sequence[Path], kind: str, root: Path, split: str) -> None:
    """One stat per file; all missing ones are reported together."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"split {split!r} (VOC root {root}): {len(missing)} {kind} file(s) missing: {_listing(missing)}"
        )
