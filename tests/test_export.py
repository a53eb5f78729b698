"""`weakseg export-voc`: the VOC server's comp6 tarball, re-opened and checked id by id."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.checkpoint import save_checkpoint
from weakseg.cli import main
from weakseg.config import load_config
from weakseg.errors import UserError
from weakseg.export import verify_predictions, write_prediction
from weakseg.model import SegNet, upsample_logits

PREFIX = "results/VOC2012/Segmentation/comp6_test_cls/"
# Colours of a few classes in the VOC devkit's colour map (VOClabelcolormap.m), written out by hand.
KNOWN_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                 8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_root: Path) -> Path:
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.decoder_channels=16", "model.skip_channels=4", f"data.root={synth_root}"])
    model = SegNet("tiny", 21, 16, 4)
    with torch.no_grad():  # a classifier bias that makes several classes win somewhere
        model.classifier.bias.copy_(torch.linspace(-1, 1, 21))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, cfg=cfg, model=model, iteration=0)
    return path


def test_export_is_what_the_server_wants(tmp_path: Path, checkpoint: Path, synth_root: Path, capsys):
    out = tmp_path / "sub.tar.gz"
    assert main(["export-voc", str(checkpoint), "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    assert "host.robots.ox.ac.uk" in capsys.readouterr().out

    voc = synth_root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    with tarfile.open(out, "r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert names == sorted(f"{PREFIX}{i}.png" for i in ids)  # exact layout, nothing else
        tar.extractall(tmp_path / "x", filter="data")

    model = SegNet("tiny", 21, 16, 4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    for i in ids:
        png = Image.open(tmp_path / "x" / f"{PREFIX}{i}.png")
        jpg = Image.open(voc / "JPEGImages" / f"{i}.jpg")
        assert png.mode == "P" and png.size == jpg.size
        pal = png.getpalette()
        for c, rgb in KNOWN_COLOURS.items():
            assert tuple(pal[3 * c : 3 * c + 3]) == rgb
        values = np.asarray(png)
        assert values.min() >= 0 and values.max() <= 20
        # the labels are the model's: argmax of the logits upsampled to the image's own size
        image = torch.from_numpy(np.array(jpg.convert("RGB"))).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            logits = model(image)
        expected = upsample_logits(logits, tuple(image.shape[-2:])).argmax(1)[0]  # tested in test_model.py
        agree = (torch.from_numpy(values.astype(np.int64)) == expected).float().mean()
        assert agree > 0.999  # identical up to float ties


def test_export_refuses_to_overwrite_and_force_replaces(tmp_path: Path, checkpoint: Path, capsys):
    out = tmp_path / "sub.tar.gz"
    out.write_bytes(b"keep me")
    assert main(["export-voc", str(checkpoint), "--out", str(out), "--workers", "0"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export-voc", str(checkpoint), "--out", str(out), "--workers", "0", "--force"]) == 0
    assert tarfile.is_tarfile(out)


def test_missing_image_stops_before_anything_is_written(tmp_path: Path, checkpoint: Path, synth_root: Path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    victim = (voc / "ImageSets" / "Segmentation" / "test.txt").read_text().split()[2]
    (voc / "JPEGImages" / f"{victim}.jpg").unlink()
    out = tmp_path / "sub.tar.gz"
    assert main(["export-voc", str(checkpoint), "--data", str(root), "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert victim in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".sub.tar.gz*"))


def test_verify_catches_missing_wrong_size_and_bad_values(tmp_path: Path):
    folder = tmp_path / "p"
    folder.mkdir()
    write_prediction(folder / "a.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(UserError, match="1 prediction\\(s\\) missing.*'b'"):
        verify_predictions(folder, {"a": (4, 6), "b": (4, 6)})
    with pytest.raises(UserError, match="a.png is 6x4, its image is 5x4"):
        verify_predictions(folder, {"a": (4, 5)})
    bad = np.zeros((4, 6), np.uint8)
    bad[0, 0] = 21
    write_prediction(folder / "a.png", bad)
    with pytest.raises(UserError, match="outside 0–20"):
        verify_predictions(folder, {"a": (4, 6)})
    Image.fromarray(np.zeros((4, 6), np.uint8), mode="L").save(folder / "a.png")
    with pytest.raises(UserError, match="mode L"):
        verify_predictions(folder, {"a": (4, 6)})


def test_export_from_a_search_and_from_an_mlflow_run(tmp_path: Path, checkpoint: Path, capsys):
    """--best reads results/<search>/search.json; --mlflow-run reads the run's weakseg.checkpoint tag."""
    trial_ckpt = tmp_path / "ray" / "trial_0" / "checkpoint_000003"
    trial_ckpt.mkdir(parents=True)
    (trial_ckpt / "checkpoint.pt").write_bytes(checkpoint.read_bytes())
    results = tmp_path / "results" / "s"
    results.mkdir(parents=True)
    (results / "search.json").write_text(json.dumps({"name": "s", "best_checkpoint": str(trial_ckpt)}))
    out = tmp_path / "best.tar.gz"
    assert main(["export-voc", "--best", str(results), "--out", str(out), "--workers", "0"]) == 0
    assert tarfile.is_tarfile(out)

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"), tags={"weakseg.checkpoint": str(trial_ckpt)})
    out2 = tmp_path / "run.tar.gz"
    assert main(["export-voc", "--mlflow-run", run.info.run_id, "--tracking-uri", uri, "--out", str(out2),
                 "--workers", "0"]) == 0
    assert tarfile.is_tarfile(out2)
    capsys.readouterr()
    assert main(["export-voc", "--out", str(tmp_path / "none.tar.gz")]) == 2
    assert "exactly one source" in capsys.readouterr().err


def test_export_with_dense_crf(tmp_path: Path, checkpoint: Path):
    out = tmp_path / "crf.tar.gz"
    assert main(["export-voc", str(checkpoint), "--out", str(out), "--workers", "0", "--crf",
                 "--crf-workers", "0"]) == 0
    with tarfile.open(out, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.isfile())
        png = Image.open(tar.extractfile(member))
        assert png.mode == "P" and np.asarray(png).max() <= 20


@pytest.mark.parametrize("fault", ["skip one id", "wrong size"])
def test_export_checks_its_pngs_against_the_split_list_and_the_jpegs(tmp_path: Path, checkpoint: Path,
                                                                      synth_root: Path, monkeypatch, capsys, fault):
    """A prediction lost or mis-sized on the way to disk is caught before anything is packed."""
    import weakseg.export as export

    real = export.write_prediction
    victim = (synth_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()[2]

    def faulty(path: Path, pred: np.ndarray) -> None:
        if path.stem != victim:
            real(path, pred)
        elif fault == "wrong size":
            real(path, pred[:-1])

    monkeypatch.setattr(export, "write_prediction", faulty)
    out = tmp_path / "sub.tar.gz"
    assert main(["export-voc", str(checkpoint), "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert victim in err and ("missing" in err if fault == "skip one id" else "its image is" in err)
    assert not out.exists() and not list(tmp_path.iterdir())
