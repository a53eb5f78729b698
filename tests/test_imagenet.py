"""ImageNet subset: class-name and wnid folders, the mapping file, and the shipped TSV."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.data.classes import VOC_CLASSES
from weakseg.data.imagenet import DEFAULT_MAPPING, ImageNetSubset, read_mapping
from weakseg.errors import UserError


def onehot(name: str) -> torch.Tensor:
    y = torch.zeros(21)
    y[0] = 1
    y[VOC_CLASSES.index(name)] = 1
    return y


def write_image(path: Path, seed: int, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    Image.fromarray(img).save(path, format=fmt)
    return img


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "imagenet"
    write_image(r / "cat" / "b.jpg", 0)
    write_image(r / "cat" / "a.JPEG", 1, "JPEG")
    write_image(r / "cat" / "c.png", 2)
    (r / "cat" / "notes.txt").write_text("not an image")
    write_image(r / "n02085620" / "n02085620_1.JPEG", 3, "JPEG")  # Chihuahua -> dog
    write_image(r / "n04552348" / "x.jpeg", 4, "JPEG")  # warplane -> aeroplane
    (r / ".cache").mkdir()
    return r


def test_class_and_wnid_folders(root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every folder maps: no warning
        ds = ImageNetSubset(root)
    assert ds.ids == ["cat/a", "cat/b", "cat/c", "n02085620/n02085620_1", "n04552348/x"]
    expected = [onehot("cat")] * 3 + [onehot("dog"), onehot("aeroplane")]
    assert torch.equal(ds.labels, torch.stack(expected))
    item = ds[2]
    assert set(item) == {"image", "labels", "id"}
    assert item["id"] == "cat/c" and torch.equal(item["labels"], onehot("cat"))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(),
                                  np.array(Image.open(root / "cat" / "c.png").convert("RGB")))
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 5, 7)
    counts = ds.class_counts()
    assert counts["cat"] == 3 and counts["dog"] == 1 and counts["aeroplane"] == 1 and counts["sofa"] == 0


def test_unmapped_folders_warn_once_or_fail_when_strict(root: Path):
    write_image(root / "n01440764" / "t.jpg", 5)  # tench: no VOC class
    write_image(root / "unicorn" / "u.jpg", 6)
    with pytest.warns(UserWarning) as rec:
        ds = ImageNetSubset(root)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "n01440764" in msg and "unicorn" in msg
    assert not any(i.startswith(("n01440764", "unicorn")) for i in ds.ids)
    with pytest.raises(UserError) as e:
        ImageNetSubset(root, strict=True)
    assert "n01440764" in str(e.value) and "unicorn" in str(e.value)


def test_custom_mapping(root: Path, tmp_path: Path):
    write_image(root / "n01440764" / "t.jpg", 5)
    mapping = tmp_path / "map.tsv"
    mapping.write_text("# mine\nn01440764\tboat\textra column ignored\n\nn02085620\tsheep\n")
    with pytest.warns(UserWarning, match="n04552348"):  # warplane is not in this mapping
        ds = ImageNetSubset(root, mapping=mapping, strict=False)
    by_id = dict(zip(ds.ids, ds.labels))
    assert torch.equal(by_id["n01440764/t"], onehot("boat"))
    assert torch.equal(by_id["n02085620/n02085620_1"], onehot("sheep"))  # the file's mapping, not the default
    assert "n04552348/x" not in by_id


def test_transform_applied(root: Path):
    ds = ImageNetSubset(root, transform=lambda it: {**it, "image": it["image"][:, :2]})
    assert ds[0]["image"].shape == (3, 2, 7)


@pytest.mark.parametrize("content, culprit", [
    ("n0123\tcat\n", "line 1"),
    ("n01234567\tunicorn\n", "'unicorn'"),
    ("n01234567 cat\n", "line 1"),
    ("n01234567\tcat\nn01234567\tdog\n", "line 2"),
])
def test_bad_mapping_file(root: Path, tmp_path: Path, content: str, culprit: str):
    mapping = tmp_path / "map.tsv"
    mapping.write_text(content)
    with pytest.raises(UserError) as e:
        ImageNetSubset(root, mapping=mapping)
    assert culprit in str(e.value) and "map.tsv" in str(e.value)


def test_bad_roots_and_images(tmp_path: Path, root: Path):
    with pytest.raises(UserError, match="missing"):
        ImageNetSubset(tmp_path / "missing")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageNetSubset(empty)
    (root / "cat" / "b.jpg").write_bytes(b"garbage")
    ds = ImageNetSubset(root)
    with pytest.raises(UserError, match="b.jpg"):
        ds[ds.ids.index("cat/b")]


def test_shipped_mapping():
    m = read_mapping(DEFAULT_MAPPING)
    assert len(m) == 244
    # Hand-checked against the ILSVRC-2012 synset list: the 118 dog breeds are
    # exactly the contiguous block n02085620 (Chihuahua) .. n02113978 (Mexican hairless).
    dogs = sorted(w for w, c in m.items() if c == "dog")
    assert len(dogs) == 118 and dogs[0] == "n02085620" and dogs[-1] == "n02113978"
    assert sorted(w for w, c in m.items() if c == "cat") == [
        "n02123045", "n02123159", "n02123394", "n02123597", "n02124075"]  # tabby..Egyptian; no wild cats
    assert m["n02690373"] == m["n04552348"] == "aeroplane"  # airliner, warplane
    assert m["n02835271"] == m["n03792782"] == "bicycle"  # tandem, mountain bike
    assert m["n01514668"] == m["n02056570"] == "bird"  # cock, king penguin
    assert m["n03201208"] == "diningtable" and m["n04344873"] == "sofa" and m["n02389026"] == "horse"
    assert "n02125311" not in m and "n02115641" not in m  # cougar, dingo
    assert sum(c == "bird" for c in m.values()) == 59
    assert set(m.values()) == set(VOC_CLASSES[1:])  # every class has at least one synset
