"""VOC 2012 dataset: labels from hand-written XML, roots, train_aug, masks, and every bad input."""

from __future__ import annotations

import builtins
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from weakseg.data.classes import VOC_CLASSES, voc_palette
from weakseg.data.synthetic import make_synthetic
from weakseg.data.voc import VOCSegmentation, read_annotation_labels, read_labels_file
from weakseg.errors import UserError


def onehot(*names: str) -> torch.Tensor:
    y = torch.zeros(21)
    y[0] = 1
    for n in names:
        y[VOC_CLASSES.index(n)] = 1
    return y


def xml(*objects: str, extra: str = "") -> str:
    """A VOC annotation; each object is raw XML inside <object>."""
    body = "".join(f"<object>{o}</object>" for o in objects)
    return (f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>"
            f"<size><width>6</width><height>4</height><depth>3</depth></size>{extra}{body}</annotation>")


def obj(name: str, difficult: int = 0, truncated: int = 0, parts: str = "") -> str:
    return (f"<name>{name}</name><pose>Unspecified</pose><truncated>{truncated}</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax>"
            f"<ymax>3</ymax></bndbox>{parts}")


class Tree:
    """A hand-built VOCdevkit/VOC2012 tree under `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.voc = base / "VOCdevkit" / "VOC2012"
        for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
            (self.voc / d).mkdir(parents=True, exist_ok=True)

    def add(self, image_id: str, annotation: str | None, mask: np.ndarray | None = None,
            size: tuple[int, int] = (4, 6), seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
        Image.fromarray(img).save(self.voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if annotation is not None:
            (self.voc / "Annotations" / f"{image_id}.xml").write_text(annotation)
        if mask is not None:
            self.write_mask(image_id, mask)
        return img

    def write_mask(self, image_id: str, mask: np.ndarray) -> None:
        png = Image.fromarray(mask.astype(np.uint8))
        png.putpalette(voc_palette())
        png.save(self.voc / "SegmentationClass" / f"{image_id}.png")

    def split(self, name: str, text: str) -> Path:
        path = self.voc / "ImageSets" / "Segmentation" / f"{name}.txt"
        path.write_text(text)
        return path


@pytest.fixture()
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path)
    m = np.zeros((4, 6), np.uint8)
    m[1:3, 1:3] = 15
    m[0, 5] = 255
    # several objects, a repeated class, a difficult one, a truncated one, person parts
    t.add("2007_000001", xml(obj("person", parts="<part><name>head</name></part><part><name>hand</name></part>"),
                              obj("dog"), obj("dog", truncated=1), obj("bottle", difficult=1)), m)
    t.add("2007_000002", xml(obj("  cat\n")), np.full((4, 6), 8, np.uint8), seed=1)
    t.add("2008_000003", xml(obj("tvmonitor"), extra="<segmented>1</segmented>"), np.zeros((4, 6), np.uint8), seed=2)
    t.split("train", "2007_000001\n2007_000002\n\n")
    t.split("val", "2008_000003\n")
    return t


def test_labels_from_hand_written_xml(tree: Tree):
    ds = VOCSegmentation(tree.base, "train", with_masks=False)
    assert ds.ids == ["2007_000001", "2007_000002"]
    # difficult and truncated objects count; <part> names (head, hand) are not objects
    assert torch.equal(ds.labels[0], onehot("person", "dog", "bottle"))
    assert torch.equal(ds.labels[1], onehot("cat"))
    item = ds[0]
    assert set(item) == {"image", "labels", "id"}
    assert item["id"] == "2007_000001" and item["labels"].dtype == torch.float32
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 4, 6)
    expected = np.array(Image.open(tree.voc / "JPEGImages" / "2007_000001.jpg").convert("RGB"))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    assert read_annotation_labels(tree.voc / "Annotations" / "2007_000001.xml") == ["person", "dog", "dog", "bottle"]


def test_root_may_be_any_of_three_levels(tree: Tree):
    for root in (tree.base, tree.base / "VOCdevkit", tree.voc):
        ds = VOCSegmentation(root, "val", with_masks=False)
        assert ds.root == tree.voc.resolve() and ds.ids == ["2008_000003"]
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base / "nowhere", "val", with_masks=False)
    assert "nowhere" in str(e.value) and "VOC2012" in str(e.value)


def test_masks_are_read_as_class_indices(tree: Tree):
    ds = VOCSegmentation(tree.voc, "train", with_masks=True)
    item = ds[0]
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (4, 6)
    expected = np.zeros((4, 6), np.int64)
    expected[1:3, 1:3] = 15
    expected[0, 5] = 255
    np.testing.assert_array_equal(item["mask"].numpy(), expected)
    # A grey ("L") PNG, as SegmentationClassAug has, is read the same way.
    Image.fromarray(expected.astype(np.uint8)).save(tree.voc / "SegmentationClass" / "2007_000001.png")
    np.testing.assert_array_equal(VOCSegmentation(tree.voc, "train", with_masks=True)[0]["mask"].numpy(), expected)


def test_transform_is_applied(tree: Tree):
    def t(item):
        item = dict(item)
        item["image"] = item["image"][:, :2, :3]
        item["seen"] = True
        return item

    item = VOCSegmentation(tree.voc, "val", with_masks=False, transform=t)[0]
    assert item["seen"] and item["image"].shape == (3, 2, 3)


def test_synthetic_labels_equal_mask_classes(tmp_path: Path):
    voc = make_synthetic(tmp_path / "s", n_train=6, n_val=3, n_test=2, size=48, seed=2)
    for split in ("train", "val"):
        ds = VOCSegmentation(tmp_path / "s", split, with_masks=True)
        for k in range(len(ds)):
            item = ds[k]
            png = np.array(Image.open(voc / "SegmentationClass" / f"{item['id']}.png"))
            np.testing.assert_array_equal(item["mask"].numpy(), png)
            expected = torch.zeros(21)
            expected[0] = 1
            expected[[int(c) for c in np.unique(png) if c != 255]] = 1
            assert torch.equal(item["labels"], expected)


def test_weak_dataset_never_opens_a_mask(tmp_path: Path, monkeypatch):
    voc = make_synthetic(tmp_path / "s", n_train=4, n_val=1, n_test=0, size=32, seed=1)
    opened: list[str] = []
    for mod, name in ((builtins, "open"), (io, "open"), (os, "open")):
        real = getattr(mod, name)

        def spy(file, *a, _real=real, **k):
            opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else str(file))
            return _real(file, *a, **k)

        monkeypatch.setattr(mod, name, spy)
    ds = VOCSegmentation(tmp_path / "s", "train", with_masks=False)
    items = [ds[k] for k in range(len(ds))]
    monkeypatch.undo()
    assert all("mask" not in it for it in items)
    assert any("JPEGImages" in p for p in opened)  # the spy does see file opens
    assert not [p for p in opened if "SegmentationClass" in p]
    # And with the masks gone altogether it still works.
    shutil.rmtree(voc / "SegmentationClass")
    ds = VOCSegmentation(tmp_path / "s", "train", with_masks=False)
    assert len([ds[k] for k in range(len(ds))]) == 4
    with pytest.raises(UserError, match="mask file"):
        VOCSegmentation(tmp_path / "s", "train", with_masks=True)


def test_labels_file_replaces_the_xml(tree: Tree, tmp_path: Path):
    lf = tmp_path / "labels.tsv"
    lf.write_text("# id<TAB>classes\n\n2007_000001\tcow,horse\n2007_000002\tbackground,sheep\n2099_000009\tcar\n")
    shutil.rmtree(tree.voc / "Annotations")  # proves the XMLs are not read
    ds = VOCSegmentation(tree.base, "train", with_masks=False, labels_file=lf)
    assert torch.equal(ds.labels[0], onehot("cow", "horse"))
    assert torch.equal(ds[1]["labels"], onehot("sheep"))
    assert read_labels_file(lf)["2099_000009"] == ["car"]


@pytest.mark.parametrize("content, culprit", [
    ("2007_000001\tcow\n", "2007_000002"),                    # an id of the split is missing
    ("2007_000001\tcow\n2007_000002\tunicorn\n", "unicorn"),  # unknown class
    ("2007_000001 cow\n", "line 1"),                          # no tab
    ("2007_000001\tcow\n2007_000001\tdog\n", "line 2"),       # repeated id
    ("2007_000001\tbackground\n", "no object class"),         # background alone
    ("../x\tcow\n", "'../x'"),                                # a path, not an id
])
def test_bad_labels_file(tree: Tree, tmp_path: Path, content: str, culprit: str):
    lf = tmp_path / "labels.tsv"
    lf.write_text(content)
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base, "train", with_masks=False, labels_file=lf)
    assert culprit in str(e.value)
    assert "labels.tsv" in str(e.value)


@pytest.mark.parametrize("bad_id", ["../2007_000001", "2007/000001", "a\\b", "/etc/passwd", "C:evil",
                                    "..", "2007_000001 1", "a\x00b"])
def test_bad_ids_name_the_split_file_and_line(tree: Tree, bad_id: str):
    tree.split("train", f"2007_000001\n{bad_id}\n")
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base, "train", with_masks=False)
    msg = str(e.value)
    assert repr(bad_id) in msg and "train.txt" in msg and "line 2" in msg


def test_repeated_and_missing_ids(tree: Tree):
    tree.split("train", "2007_000001\n2007_000002\n2007_000001\n")
    with pytest.raises(UserError, match=r"line 3.*repeats line 1"):
        VOCSegmentation(tree.base, "train", with_masks=False)
    tree.split("train", "2007_000001\n2007_00002\n")  # a typo
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base, "train", with_masks=False)
    assert "2007_00002.jpg" in str(e.value)
    tree.split("train", "\n\n")
    with pytest.raises(UserError, match="no ids"):
        VOCSegmentation(tree.base, "train", with_masks=False)
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base, "tarin", with_masks=False)
    assert "tarin.txt" in str(e.value) and "'train'" in str(e.value)


def test_missing_annotation_and_mask_fail_at_construction(tree: Tree):
    (tree.voc / "Annotations" / "2007_000002.xml").unlink()
    with pytest.raises(UserError, match="2007_000002.xml"):
        VOCSegmentation(tree.base, "train", with_masks=False)
    (tree.voc / "SegmentationClass" / "2008_000003.png").unlink()
    with pytest.raises(UserError, match="2008_000003.png"):
        VOCSegmentation(tree.base, "val", with_masks=True)
    assert len(VOCSegmentation(tree.base, "val", with_masks=False)) == 1


@pytest.mark.parametrize("annotation, culprit", [
    (xml(), "no <object>"),
    (xml(obj("dog"), obj("unicorn")), "'unicorn'"),
    (xml(obj("background")), "'background'"),
    ("<annotation><object><name>dog</name>", "not valid XML"),
    ("<notvoc><object><name>dog</name></object></notvoc>", "<notvoc>"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "dog">]><annotation><object><name>&e;</name>'
     "</object></annotation>", "DTD"),
])
def test_bad_annotations_name_the_file(tree: Tree, annotation: str, culprit: str):
    (tree.voc / "Annotations" / "2007_000002.xml").write_text(annotation)
    with pytest.raises(UserError) as e:
        VOCSegmentation(tree.base, "train", with_masks=False)
    assert culprit in str(e.value) and "2007_000002.xml" in str(e.value)


def test_corrupt_and_truncated_images_name_the_file(tree: Tree):
    jpg = tree.voc / "JPEGImages" / "2007_000002.jpg"
    good = jpg.read_bytes()
    ds = VOCSegmentation(tree.base, "train", with_masks=False)
    jpg.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="2007_000002.jpg"):
        ds[1]
    jpg.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="2007_000002.jpg"):
        ds[1]
    assert ds[0]["id"] == "2007_000001"


def test_bad_masks_name_the_file(tree: Tree):
    png = tree.voc / "SegmentationClass" / "2007_000002.png"
    ds = VOCSegmentation(tree.base, "train", with_masks=True)
    bad = np.full((4, 6), 8, np.uint8)
    bad[0, 0], bad[1, 1] = 21, 100
    tree.write_mask("2007_000002", bad)
    with pytest.raises(UserError) as e:
        ds[1]
    assert "2007_000002.png" in str(e.value) and "21" in str(e.value) and "100" in str(e.value)
    good = png.read_bytes()
    png.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="2007_000002.png"):
        ds[1]
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png)  # a colour mask
    with pytest.raises(UserError, match=r"2007_000002.png.*'RGB'"):
        ds[1]
    tree.write_mask("2007_000002", np.zeros((5, 6), np.uint8))  # wrong size
    with pytest.raises(UserError, match="2007_000002"):
        ds[1]


def sbd_tree(tmp_path: Path) -> tuple[Tree, Path, dict[str, np.ndarray]]:
    """VOC train {a, b, c}, val {d, e}; SBD train {b, d, f}, val {g, e}."""
    t = Tree(tmp_path / "voc")
    ids = {k: f"2008_00000{n}" for n, k in enumerate("abcdefg", start=1)}
    sbd = tmp_path / "sbd" / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "img").mkdir()
    masks = {}
    for n, (k, i) in enumerate(ids.items()):
        m = np.full((4, 6), n + 1, np.uint8)
        m[0, 0] = 0
        masks[i] = m
        t.add(i, xml(obj(VOC_CLASSES[n + 1])), m if k in "abcde" else None, seed=n)
        sbd_mask = m.copy()
        sbd_mask[3, 5] = 20  # SBD's masks differ: shows which file was read
        scipy.io.savemat(sbd / "cls" / f"{i}.mat",
                         {"GTcls": {"Segmentation": sbd_mask, "Boundaries": np.zeros(1), "CategoriesPresent": 1}})
        masks[f"sbd:{i}"] = sbd_mask
    t.split("train", "".join(f"{ids[k]}\n" for k in "abc"))
    t.split("val", "".join(f"{ids[k]}\n" for k in "de"))
    (sbd / "train.txt").write_text("".join(f"{ids[k]}\n" for k in "bdf"))
    (sbd / "val.txt").write_text("".join(f"{ids[k]}\n" for k in "ge"))
    return t, tmp_path / "sbd", masks


def test_train_aug_from_sbd(tmp_path: Path):
    t, sbd, masks = sbd_tree(tmp_path)
    ids = {k: f"2008_00000{n}" for n, k in enumerate("abcdefg", start=1)}
    expected = sorted(ids[k] for k in "abcfg")  # (SBD train ∪ SBD val ∪ VOC train) − VOC val
    ds = VOCSegmentation(t.base, "train_aug", with_masks=False, sbd_root=sbd)
    assert ds.ids == expected
    assert torch.equal(ds.labels[expected.index(ids["f"])], onehot(VOC_CLASSES[6]))  # from the VOC XML
    full = VOCSegmentation(t.base, "train_aug", with_masks=True, sbd_root=sbd / "benchmark_RELEASE" / "dataset")
    for k in range(len(full)):
        i = full.ids[k]
        key = i if (t.voc / "SegmentationClass" / f"{i}.png").exists() else f"sbd:{i}"
        np.testing.assert_array_equal(full[k]["mask"].numpy(), masks[key])
    assert key.startswith("sbd:")  # the last id (g) has no VOC mask


def test_train_aug_file_wins_and_missing_sources_fail(tmp_path: Path):
    t, sbd, _ = sbd_tree(tmp_path)
    with pytest.raises(UserError, match="train_aug"):
        VOCSegmentation(t.base, "train_aug", with_masks=False)
    t.split("train_aug", "2008_000001\n2008_000007\n")
    ds = VOCSegmentation(t.base, "train_aug", with_masks=False, sbd_root=sbd)
    assert ds.ids == ["2008_000001", "2008_000007"]
    # 2008_000007 has no VOC mask and no SBD root is given: named at construction.
    with pytest.raises(UserError, match="2008_000007"):
        VOCSegmentation(t.base, "train_aug", with_masks=True)
    with pytest.raises(UserError, match="SBD root"):
        VOCSegmentation(t.base, "train", with_masks=False, sbd_root=tmp_path / "nothing")


def test_without_labels_reads_no_annotation(tree: Tree):
    shutil.rmtree(tree.voc / "Annotations")
    ds = VOCSegmentation(tree.base, "val", with_masks=False, with_labels=False)
    assert torch.equal(ds[0]["labels"], onehot())
