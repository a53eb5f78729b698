"""Synthetic VOC-layout generator: layout, formats, determinism, label/mask agreement."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.data import synthetic
from weakseg.data.classes import VOC_CLASSES, voc_colormap
from weakseg.data.synthetic import DEFAULT_CLASSES, make_synthetic
from weakseg.errors import UserError

SMALL = dict(n_train=8, n_val=4, n_test=3, size=64)


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", seed=0, **SMALL)


def split_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def xml_objects(path: Path) -> list[dict]:
    root = ET.parse(path).getroot()
    out = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        out.append({
            "name": obj.findtext("name"),
            "difficult": obj.findtext("difficult"),
            "truncated": obj.findtext("truncated"),
            "pose": obj.findtext("pose"),
            "bbox": [int(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")],
        })
    return out


def test_layout_is_the_voc_devkit(synth_small: Path):
    voc = synth_small
    assert voc.parts[-2:] == ("VOCdevkit", "VOC2012")
    out = voc.parent.parent
    assert sorted(p.name for p in out.iterdir()) == ["VOCdevkit", "synthetic.json"]
    assert sorted(p.name for p in voc.iterdir()) == ["Annotations", "ImageSets", "JPEGImages", "SegmentationClass"]
    seg = voc / "ImageSets" / "Segmentation"
    assert sorted(p.name for p in seg.iterdir()) == ["test.txt", "train.txt", "trainval.txt", "val.txt"]
    train, val, test = (split_ids(voc, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8, 4, 3)
    for ids in (train, val, test):
        assert ids == sorted(ids)
        for i in ids:  # VOC-style ids: 2008_000123
            year, num = i.split("_")
            assert 2007 <= int(year) <= 2012 and len(num) == 6 and num.isdigit()
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert split_ids(voc, "trainval") == sorted(train + val)
    every = set(train + val + test)
    assert {p.name for p in (voc / "JPEGImages").iterdir()} == {f"{i}.jpg" for i in every}
    assert {p.name for p in (voc / "Annotations").iterdir()} == {f"{i}.xml" for i in every}
    # The real test set has no masks: nor does this one without test_masks.
    assert {p.name for p in (voc / "SegmentationClass").iterdir()} == {f"{i}.png" for i in train + val}
    manifest = json.loads((out / "synthetic.json").read_text())
    assert manifest["seed"] == 0 and manifest["classes"] == list(DEFAULT_CLASSES)


def test_file_formats(synth_small: Path):
    voc = synth_small
    shapes = []
    cmap = voc_colormap()
    for i in split_ids(voc, "trainval"):
        with Image.open(voc / "JPEGImages" / f"{i}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        assert max(w, h) == 64 and min(w, h) >= 40
        shapes.append((h, w))
        with Image.open(voc / "SegmentationClass" / f"{i}.png") as png:
            assert png.format == "PNG" and png.mode == "P"
            pal = np.array(png.getpalette()[: 21 * 3]).reshape(21, 3)
            mask = np.array(png)
        np.testing.assert_array_equal(pal, cmap[:21])
        assert mask.shape == (h, w)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255}
        assert 0 in values and 255 in values  # background and a void band
        root = ET.parse(voc / "Annotations" / f"{i}.xml").getroot()
        assert root.tag == "annotation"
        assert root.findtext("filename") == f"{i}.jpg"
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (w, h)
        assert root.findtext("size/depth") == "3" and root.findtext("segmented") == "1"
    assert any(h % 16 or w % 16 for h, w in shapes)  # not all multiples of 16
    assert len(set(shapes)) > 1  # aspect ratios vary
    assert any(h > w for h, w in shapes) or any(w > h for h, w in shapes)


def test_labels_are_exactly_the_classes_in_the_mask(synth_small: Path):
    voc = synth_small
    for i in split_ids(voc, "trainval"):
        objs = xml_objects(voc / "Annotations" / f"{i}.xml")
        assert 1 <= len(objs) <= 3
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{i}.png"))
        in_mask = {VOC_CLASSES[c] for c in np.unique(mask) if c not in (0, 255)}
        assert {o["name"] for o in objs} == in_mask
        for o in objs:
            assert o["name"] in DEFAULT_CLASSES
            assert o["difficult"] == "0" and o["truncated"] in ("0", "1")
            assert o["pose"] in ("Unspecified", "Left", "Right", "Frontal", "Rear")
        # Every pixel of a class lies inside the union of that class's boxes (1-based, inclusive).
        for name in in_mask:
            ys, xs = np.nonzero(mask == VOC_CLASSES.index(name))
            inside = np.zeros(len(ys), bool)
            for o in objs:
                if o["name"] == name:
                    x0, y0, x1, y1 = o["bbox"]
                    inside |= (xs + 1 >= x0) & (xs + 1 <= x1) & (ys + 1 >= y0) & (ys + 1 <= y1)
            assert inside.all()


def test_void_band_lies_on_class_boundaries(synth_small: Path):
    voc = synth_small
    for i in split_ids(voc, "train")[:4]:
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")).astype(int)
        h, w = mask.shape
        void = mask == 255
        # Thin, like VOC's: every void pixel has a labelled pixel within 2 px.
        for y, x in zip(*np.nonzero(void)):
            win = mask[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
            assert (win != 255).any()
        # And no two different classes touch without void between them.
        for dy, dx in ((0, 1), (1, 0)):
            a, b = mask[: h - dy, : w - dx], mask[dy:, dx:]
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any()


def test_colour_alone_does_not_segment(tmp_path: Path):
    # An optimistic colour-lookup classifier (majority class per RGB bin, fitted
    # on the very pixels it is scored on) must do badly: colours overlap
    # between classes and with the background.
    voc = make_synthetic(tmp_path / "d", n_train=30, n_val=0, n_test=0, size=64, seed=3)
    xs, ys = [], []
    for i in split_ids(voc, "train"):
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{i}.png"))
        img = np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg")).astype(int)
        keep = mask != 255
        xs.append(img[keep])
        ys.append(mask[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    bins = (x[:, 0] // 32) * 64 + (x[:, 1] // 32) * 8 + x[:, 2] // 32
    counts = np.zeros((512, 21), int)
    np.add.at(counts, (bins, y), 1)
    pred = counts.argmax(1)[bins]
    ious = [((pred == c) & (y == c)).sum() / ((pred == c) | (y == c)).sum() for c in np.unique(y)]
    assert np.mean(ious) < 0.5


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, synth_small: Path):
    again = make_synthetic(tmp_path / "again", seed=0, **SMALL)
    first = all_files(synth_small.parent.parent)
    second = all_files(again.parent.parent)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = all_files(make_synthetic(tmp_path / "other", seed=1, **SMALL).parent.parent)
    jpgs = lambda d: sorted(v for k, v in d.items() if k.endswith(".jpg"))  # noqa: E731
    assert not set(jpgs(first)) & set(jpgs(other))


def test_classes_and_test_masks(tmp_path: Path):
    voc = make_synthetic(tmp_path / "d", n_train=6, n_val=2, n_test=3, size=48, seed=5,
                         classes=["dog", "sheep"], test_masks=True)
    names = set()
    for i in split_ids(voc, "trainval") + split_ids(voc, "test"):
        names |= {o["name"] for o in xml_objects(voc / "Annotations" / f"{i}.xml")}
    assert names and names <= {"dog", "sheep"}
    test_ids = split_ids(voc, "test")
    assert all((voc / "SegmentationClass" / f"{i}.png").is_file() for i in test_ids)


def test_every_voc_class_renders():
    for name in VOC_CLASSES[1:]:
        rng = np.random.default_rng(0)
        image, mask, objs = synthetic.render_image(rng, 64, [name])
        assert image.dtype == np.uint8 and image.shape[:2] == mask.shape
        assert {o.name for o in objs} == {name}
        assert (mask == VOC_CLASSES.index(name)).sum() > 0


def test_unknown_class_and_bad_sizes_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="'unicorn'"):
        make_synthetic(tmp_path / "a", classes=["cat", "unicorn"])
    with pytest.raises(UserError, match="size"):
        make_synthetic(tmp_path / "b", size=8)
    with pytest.raises(UserError, match="n_train"):
        make_synthetic(tmp_path / "c", n_train=-1)
    assert not any(tmp_path.iterdir())  # nothing written


def test_refuses_to_overwrite_unless_asked(tmp_path: Path):
    out = tmp_path / "data"
    make_synthetic(out, n_train=2, n_val=1, n_test=0, size=32, seed=0)
    with pytest.raises(UserError, match=str(out)):
        make_synthetic(out, n_train=2, n_val=1, n_test=0, size=32, seed=1)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 0
    make_synthetic(out, n_train=2, n_val=1, n_test=0, size=32, seed=1, overwrite=True)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left
    # A non-empty directory that make_synthetic did not write is never deleted.
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="synthetic.json"):
        make_synthetic(other, n_train=1, n_val=0, n_test=0, size=32, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    # An empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_synthetic(empty, n_train=1, n_val=0, n_test=0, size=32).is_dir()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_image

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(synthetic, "render_image", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_synthetic(tmp_path / "data", n_train=5, n_val=0, n_test=0, size=32)
    assert list(tmp_path.iterdir()) == []


def test_labels_match_mask_over_many_renders():
    # Heavy occlusion and truncation are rare per image; over many images an
    # object hidden (or voided) away would show up as a label with no pixels.
    classes = VOC_CLASSES[1:]
    for k in range(150):
        rng = np.random.default_rng([42, k])
        _, mask, objs = synthetic.render_image(rng, 48, classes)
        in_mask = {VOC_CLASSES[c] for c in np.unique(mask) if c not in (0, 255)}
        assert {o.name for o in objs} == in_mask
        # ... and not just a stray pixel: at least 1/150 of the image each.
        for name in in_mask:
            assert (mask == VOC_CLASSES.index(name)).sum() >= mask.size // 150


def test_make_synthetic_into_a_file_is_a_clear_error(tmp_path: Path, capsys):
    from weakseg.cli import main

    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert main(["make-synthetic", str(out), "--train", "2", "--val", "1", "--test", "1", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not a directory" in err and "Traceback" not in err
    assert out.read_text() == "keep me"


def test_first_use_survives_a_rival_that_generates_the_same_set_first(tmp_path: Path, monkeypatch):
    """Two trials asking for the missing synthetic set at once: the one that renames second still succeeds.

    The rival's whole generation is slipped in just before this call's rename, deterministically.
    """
    from weakseg.config import load_config
    from weakseg.data import build

    cfg = load_config("demo", [f"data.root={tmp_path / 'synthetic'}", "data.synthetic_train=4", "data.synthetic_val=2",
                               "data.synthetic_test=2", "data.synthetic_size=48"]).data
    real_swap = synthetic._swap_into_place

    def rival_first(tmp: Path, out: Path, overwrite: bool) -> None:
        monkeypatch.setattr(synthetic, "_swap_into_place", real_swap)
        make_synthetic(out, n_train=4, n_val=2, n_test=2, size=48, seed=cfg.synthetic_seed)
        real_swap(tmp, out, overwrite)

    monkeypatch.setattr(synthetic, "_swap_into_place", rival_first)
    assert build.ensure_synthetic(cfg) == tmp_path / "synthetic"
    assert len(list((tmp_path / "synthetic" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # the loser's temp folder is gone
