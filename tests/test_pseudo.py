"""Second stage: pseudo labels from a weak model, and training on them (supervision=pseudo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.cli import main
from weakseg.config import load_config
from weakseg.data.voc import VOCSegmentation, read_annotation_labels
from test_space import write  # a space file at tmp_path/spaces/space.yaml


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


# ------------------------------------------------------------------- the second stage as a search stage

SPACE = """\
name: stage2
base: demo
fixed:
  data.root: {root}
params:
  loss.lam: {{uniform: [0.0, 1.0]}}
settings:
  samples: 2
  pseudo_labels: {{checkpoint: {ckpt}, threshold: 0.5, crf: false}}
"""


def test_search_space_with_pseudo_labels_trains_every_trial_on_them(weak_ckpt, synth_root, tmp_path):
    from weakseg.search.space import load_space

    space = load_space(write(tmp_path, SPACE.format(root=synth_root, ckpt=weak_ckpt)))
    root = tmp_path / "results" / "stage2" / "pseudo_labels"  # results_dir defaults to ../results
    assert space.pseudo_root == root
    assert space.settings.pseudo_labels.checkpoint == str(weak_ckpt) and space.settings.pseudo_labels.crf is False
    cfg = space.trial_config({"loss.lam": 0.5})
    assert (cfg.supervision, cfg.data.pseudo_root, cfg.loss.lam) == ("pseudo", str(root), 0.5)
    # a relative checkpoint is read from the space file's folder; --results-dir moves the labels with it
    (tmp_path / "ckpts").mkdir()
    shutil.copy(weak_ckpt, tmp_path / "ckpts" / "w.pt")
    moved = load_space(write(tmp_path, SPACE.format(root=synth_root, ckpt="../ckpts/w.pt")),
                       {"results_dir": str(tmp_path / "elsewhere")})
    assert moved.settings.pseudo_labels.checkpoint == str(tmp_path / "ckpts" / "w.pt")
    assert moved.base_config.data.pseudo_root == str(tmp_path / "elsewhere" / "stage2" / "pseudo_labels")


@pytest.mark.parametrize("old,new,pattern", [
    ("threshold: 0.5", "threshold: 1.5", r"space.yaml:9: settings.pseudo_labels.threshold: must be a number in \[0, 1\)"),
    ("crf: false", "crf: maybe", r"space.yaml:9: settings.pseudo_labels.crf: expected true or false, got 'maybe'"),
    ("crf: false", "crff: false",
     r"space.yaml:9: settings.pseudo_labels.crff: unknown key \(did you mean 'crf'\?\); allowed: checkpoint, threshold, crf"),
    ("CKPT", "/nonexistent/x.pt", r"space.yaml:9: settings.pseudo_labels.checkpoint: no such file"),
    ("{checkpoint: CKPT, ", "{", r"space.yaml:9: settings.pseudo_labels.checkpoint: required: the weak model's"),
    ("  data.root:", "  supervision: full\n  data.root:", r"space.yaml:4: fixed.supervision: is set by settings.pseudo_labels"),
    ("params:\n", "params:\n  data.pseudo_root: {choice: [a, b]}\n",
     r"space.yaml:6: params.data.pseudo_root: is set by settings.pseudo_labels"),
    ("  data.root:", "  data.dataset: imagenet\n  data.root:",
     r"space.yaml:10: settings.pseudo_labels: labels the VOC-layout training images"),
])
def test_bad_pseudo_label_settings_name_line_and_key(weak_ckpt, synth_root, tmp_path, old, new, pattern):
    from weakseg.errors import UserError
    from weakseg.search.space import load_space

    text = SPACE.format(root=synth_root, ckpt="CKPT")
    assert old in text
    with pytest.raises(UserError, match=pattern):
        load_space(write(tmp_path, text.replace(old, new, 1).replace("CKPT", str(weak_ckpt))))


def test_ensure_pseudo_labels_reuses_matching_labels_and_refuses_others_on_resume(weak_ckpt, synth_root, tmp_path):
    import hashlib

    from weakseg.errors import UserError
    from weakseg.pseudo import ensure_pseudo_labels

    out, root = tmp_path / "pl", synth_root
    m = ensure_pseudo_labels(weak_ckpt, out, data_root=root, threshold=0.5, crf=None, replace=True)
    assert m["checkpoint_sha256"] == hashlib.sha256(weak_ckpt.read_bytes()).hexdigest()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = ensure_pseudo_labels(weak_ckpt, out, data_root=root, threshold=0.5, crf=None, replace=False)
    assert again == m and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # reused, not rewritten
    with pytest.raises(UserError, match="another threshold than settings.pseudo_labels"):
        ensure_pseudo_labels(weak_ckpt, out, data_root=root, threshold=0.9, crf=None, replace=False)
    assert ensure_pseudo_labels(weak_ckpt, out, data_root=root, threshold=0.9, crf=None, replace=True)["threshold"] == 0.9


@pytest.mark.slow
def test_tiny_search_on_pseudo_labels(weak_ckpt, synth_root, tmp_path):
    """`weakseg search` with settings.pseudo_labels: labels written once into the results folder, trials on them."""
    import hashlib
    import subprocess
    import sys

    import yaml
    from test_search import make_space, runs_of, search_env

    path = make_space(tmp_path, synth_root, "stage2", samples=2, iterations=2, eval_every=2, concurrent=1)
    space = yaml.safe_load(path.read_text())
    space["settings"]["pseudo_labels"] = {"checkpoint": str(weak_ckpt), "threshold": 0.5, "crf": False}
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(path)], capture_output=True, text=True,
                       timeout=600, env=search_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    labels = tmp_path / "results" / "stage2" / "pseudo_labels"
    manifest = json.loads((labels / "pseudo.json").read_text())
    train_ids = (synth_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in labels.glob("*.png")) == sorted(train_ids)
    assert manifest["checkpoint_sha256"] == hashlib.sha256(weak_ckpt.read_bytes()).hexdigest()
    assert manifest["threshold"] == 0.5 and manifest["crf"] is None
    _, parents, children = runs_of(tmp_path, "stage2")
    assert len(children) == 2
    for c in children:
        assert c.data.params["supervision"] == "pseudo" and c.data.params["data.pseudo_root"] == str(labels)
    assert parents[0].data.params["settings.pseudo_labels.checkpoint"] == str(weak_ckpt)
