"""Second stage: pseudo labels from a weak model, and training on them (supervision=pseudo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.cli import main
from weakseg.config import load_config
from weakseg.data.voc import VOCSegmentation, read_annotation_labels


@pytest.fixture(scope="module")
def weak_ckpt(tmp_path_factory, synth_root: Path) -> Path:
    from conftest import TINY
    from weakseg.engine import fit

    run = tmp_path_factory.mktemp("weakrun")
    cfg = load_config("demo", TINY + [f"data.root={synth_root}", "optim.iterations=4", "train.eval_every=4",
                                      "loss.variant=none"])
    fit(cfg, run)
    return run / "checkpoints" / "last.pt"


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_pseudo_labels_restricted_to_image_classes_with_uncertain_ignored(weak_ckpt, synth_root, tmp_path, capsys):
    voc = synth_root / "VOCdevkit" / "VOC2012"
    # one mean-field step: an early model's refined maps are still uncertain in places
    base = ["pseudo-labels", str(weak_ckpt), "--device", "cpu", "--crf-set", "iterations=1"]
    assert main(base + ["--out", str(tmp_path / "all"), "--threshold", "0"]) == 0
    assert main(base + ["--out", str(tmp_path / "sure"), "--threshold", "0.9"]) == 0
    assert "supervision=pseudo" in capsys.readouterr().out
    every, sure = pngs(tmp_path / "all"), pngs(tmp_path / "sure")
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(every) == sorted(ids)
    from weakseg.data.classes import VOC_CLASSES

    seen_ignored = 0
    for i in ids:
        allowed = {0} | {VOC_CLASSES.index(n) for n in read_annotation_labels(voc / "Annotations" / f"{i}.xml")}
        h, w = np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg")).shape[:2]
        assert every[i].shape == (h, w)
        assert set(np.unique(every[i]).tolist()) <= allowed  # threshold 0: no pixel ignored, only the image's classes
        kept = sure[i] != 255
        seen_ignored += int((~kept).sum())
        assert np.array_equal(sure[i][kept], every[i][kept])  # a higher threshold only ignores more
    assert seen_ignored > 0
    m = json.loads((tmp_path / "sure" / "pseudo.json").read_text())
    assert m["images"] == len(ids) and 0 < m["ignored_share"] < 1
    # not into someone's folder; replacing earlier pseudo labels needs --force
    assert main(base + ["--out", str(voc)]) == 2
    assert main(base + ["--out", str(tmp_path / "all")]) == 2
    assert main(base + ["--out", str(tmp_path / "all"), "--force", "--limit", "2"]) == 0
    assert len(pngs(tmp_path / "all")) == 2


def test_training_on_pseudo_labels_reads_them(weak_ckpt, synth_root, tmp_path):
    from conftest import TINY
    from weakseg.data import build
    from weakseg.engine import fit

    out = tmp_path / "pl"
    assert main(["pseudo-labels", str(weak_ckpt), "--device", "cpu", "--out", str(out), "--no-crf"]) == 0
    cfg = load_config("demo", TINY + [f"data.root={synth_root}", "supervision=pseudo", f"data.pseudo_root={out}",
                                      "optim.iterations=3", "train.eval_every=3", "data.train_mode=scale_crop"])
    ds = VOCSegmentation(synth_root, "train", with_masks=True, mask_root=out)
    item = ds[0]
    assert np.array_equal(item["mask"].numpy(), np.array(Image.open(out / f"{item['id']}.png")))
    assert build.train_dataset(cfg).mask_paths[0].parent == out
    state = fit(cfg, tmp_path / "run")
    assert state.iteration == 3
    with pytest.raises(Exception, match="data.pseudo_root"):
        load_config("demo", ["supervision=pseudo"])
