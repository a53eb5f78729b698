"""Bad input at the command line: one line on stderr naming the culprit, exit status 2, nothing half-written.

Every case runs a real `weakseg` verb on a damaged copy of the synthetic data set, a damaged checkpoint or
a broken YAML file, and checks the user-facing contract: exit status 2, exactly one stderr line of the form
`weakseg VERB: error: ...` that names the file / key / id / URI at fault, no traceback, and the output
folder absent (or, when it existed, byte-for-byte unchanged). Most cases call `weakseg.cli.main` in-process
(fast); the cases that need the real entry point (a DataLoader worker re-raising, Ray, the search driver)
run `python -m weakseg` as a subprocess.

The library-level checks of the same inputs live in test_config.py, test_space.py, test_voc.py,
test_engine.py; export over an existing archive and export with a missing test image are tested at the
CLI level in test_export.py (test_export_refuses_to_overwrite_and_force_replaces,
test_missing_image_stops_before_anything_is_written); training into an existing run without --resume and
--resume with a changed loss in test_engine.py::test_cli_train_resume_evaluate.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from weakseg.checkpoint import save_checkpoint
from weakseg.cli import main
from weakseg.config import load_config
from weakseg.data.classes import voc_palette
from weakseg.model import SegNet

# conftest's tiny training at the config's default overlays, for two iterations
TINY = [s for s in conftest.TINY if not s.startswith("train.overlays=")] + ["optim.iterations=2", "train.eval_every=2"]


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


# ----------------------------------------------------------------------------------- the contract


def snapshot(paths: list[Path]) -> dict[str, object]:
    """Each path: None if absent, else the sha256 of every file under it (by relative name)."""
    out: dict[str, object] = {}
    for p in paths:
        if not p.exists():
            out[str(p)] = None
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
                           for f in sorted(p.rglob("*"))}
    return out


def check_contract(rc: int, err: str, verb: str, culprits: list[str]) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"weakseg {verb}: error: "), line
    for c in culprits:
        assert c in line, f"{c!r} not named in: {line}"
    return line


# ------------------------------------------------------------------------------------ fixtures


@dataclass
class Ctx:
    tmp: Path
    synth_root: Path
    ckpt: Path

    def data(self) -> Path:
        """A private copy of the synthetic data set, free to damage."""
        root = self.tmp / "data"
        if not root.exists():
            shutil.copytree(self.synth_root, root)
        return root

    def voc(self) -> Path:
        return self.data() / "VOCdevkit" / "VOC2012"

    def split(self, name: str) -> Path:
        return self.voc() / "ImageSets" / "Segmentation" / f"{name}.txt"

    def ids(self, name: str) -> list[str]:
        return self.split(name).read_text().split()

    def file(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def train(self, *extra: str) -> list[str]:
        """`weakseg train demo` on the (possibly damaged) VOC copy, into tmp/run."""
        return ["train", "demo", *sets(*TINY, "data.dataset=voc", f"data.root={self.data()}", *extra),
                "--out", str(self.tmp / "run")]

    def evaluate(self, ckpt: Path | None = None, *extra: str) -> list[str]:
        return ["evaluate", str(ckpt or self.ckpt), "--data", str(self.data()), "--workers", "0",
                "--device", "cpu", "--out", str(self.tmp / "ev"), *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synth_root: Path) -> Path:
    cfg = load_config("demo", TINY + [f"data.root={synth_root}"])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, cfg=cfg, model=SegNet("tiny", 21, 16, 4), iteration=2)
    return path


@pytest.fixture()
def ctx(tmp_path: Path, synth_root: Path, ckpt: Path) -> Ctx:
    return Ctx(tmp_path, synth_root, ckpt)


# --------------------------------------------------------------------------- cases: damage, argv

Case = Callable[[Ctx], tuple[list[str], list[str]]]  # -> argv, substrings the error line must contain


def malformed_yaml(c: Ctx):
    f = c.file("bad.yaml", "base: demo\nloss: {lam: 0.3\noptim:\n  iterations: 2\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], [str(f), "malformed YAML"]


def unknown_key_in_file(c: Ctx):
    f = c.file("bad.yaml", "base: demo\nloss:\n  lamda: 0.5\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], [f"{f}:3", "'loss.lamda'", "did you mean 'loss.lam'"]


def bad_bound_in_file(c: Ctx):
    f = c.file("bad.yaml", "base: demo\nloss:\n  c_bg: 1.5\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], [f"{f}:3", "loss.c_bg", "[0, 1]"]


def wrong_type_in_file(c: Ctx):
    f = c.file("bad.yaml", "base: demo\noptim:\n  batch_size: many\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], [f"{f}:3", "optim.batch_size", "integer"]


def config_file_is_a_list(c: Ctx):
    f = c.file("bad.yaml", "- base: demo\n- loss.lam: 0.5\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], [f"{f}:1", "mapping"]


def missing_config_file(c: Ctx):
    return ["train", str(c.tmp / "nope.yaml"), "--out", str(c.tmp / "run")], [str(c.tmp / "nope.yaml")]


def base_that_does_not_exist(c: Ctx):
    f = c.file("bad.yaml", "base: paperr\n")
    return ["train", str(f), "--out", str(c.tmp / "run")], ["'paperr'", "shipped: demo, demo_weak, paper"]


def set_unknown_key(c: Ctx):
    return c.train("loss.lamda=0.5"), ["--set", "'loss.lamda'", "did you mean 'loss.lam'"]


def set_wrong_type(c: Ctx):
    return c.train("optim.iterations=ten"), ["optim.iterations", "'ten'"]


def set_bad_bound(c: Ctx):
    return c.train("loss.c_fg=-0.1"), ["loss.c_fg", "[0, 1]"]


def set_bad_choice(c: Ctx):
    return c.train("loss.variant=gauss"), ["loss.variant", "'gauss'", "'exp'"]


def set_without_value(c: Ctx):
    return c.train("loss.lam"), ["'loss.lam'", "key=value"]


def cuda_on_a_machine_without_it(c: Ctx):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return c.train("train.device=cuda"), ["train.device=cuda", "CUDA is not available"]


def missing_data_root(c: Ctx):
    nowhere = c.tmp / "no" / "VOCdevkit"
    argv = ["train", "demo", *sets(*TINY, "data.dataset=voc", f"data.root={nowhere}"), "--out", str(c.tmp / "run")]
    return argv, [f"VOC root {nowhere}", "JPEGImages"]


def split_id_without_image(c: Ctx):
    with c.split("train").open("a") as f:
        f.write("2099_000001\n")
    return c.train(), ["'train'", "1 image file(s) missing", "2099_000001.jpg"]


def id_escaping_the_root(c: Ctx):
    n = len(c.ids("train"))
    with c.split("train").open("a") as f:
        f.write("../x\n")
    return c.train(), [str(c.split("train")), f"line {n + 1}", "'../x'", "path separator"]


def annotation_without_objects(c: Ctx):
    victim = c.ids("train")[3]
    xml = c.voc() / "Annotations" / f"{victim}.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("<object>")] + "</annotation>\n")
    return c.train(), [str(xml), "no <object>"]


def annotation_with_unknown_class(c: Ctx):
    victim = c.ids("train")[1]
    xml = c.voc() / "Annotations" / f"{victim}.xml"
    text = xml.read_text()
    start = text.index("<name>") + len("<name>")
    xml.write_text(text[:start] + "dragon" + text[text.index("</name>", start):])
    return c.train(), [str(xml), "'dragon'"]


def annotation_with_entities(c: Ctx):
    victim = c.ids("train")[0]
    xml = c.voc() / "Annotations" / f"{victim}.xml"
    xml.write_text('<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
                   "<annotation><object><name>&x;</name></object></annotation>\n")
    return c.train(), [str(xml), "DTD or entities"]


def labels_file_unknown_class(c: Ctx):
    ids = c.ids("train")
    lines = [f"{i}\tdog" for i in ids]
    lines[2] = f"{ids[2]}\tdog,unicorn"
    f = c.file("labels.tsv", "\n".join(lines) + "\n")
    return c.train(f"data.labels_file={f}"), [str(f), "line 3", "'unicorn'", repr(ids[2])]


def labels_file_missing_an_id(c: Ctx):
    ids = c.ids("train")
    f = c.file("labels.tsv", "".join(f"{i}\tdog\n" for i in ids[1:]))
    return c.train(f"data.labels_file={f}"), [str(f), "1 id(s)", ids[0]]


def empty_split(c: Ctx):
    c.split("train").write_text("\n\n")
    return c.train(), [str(c.split("train")), "lists no ids"]


def unknown_split(c: Ctx):
    return c.train("data.train_split=trian"), ["'trian'", "trian.txt", "available splits", "'train'"]


def corrupt_jpeg(c: Ctx):
    victim = c.ids("val")[1]
    jpg = c.voc() / "JPEGImages" / f"{victim}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # a truncated JPEG: header intact, scan data cut
    return c.evaluate(), [str(jpg), "corrupt or truncated"]


def image_that_is_not_an_image(c: Ctx):
    victim = c.ids("val")[0]
    jpg = c.voc() / "JPEGImages" / f"{victim}.jpg"
    jpg.write_text("<html>404 Not Found</html>\n")
    return c.evaluate(), [str(jpg), "corrupt or truncated"]


def mask_values_out_of_range(c: Ctx):
    victim = c.ids("val")[2]
    png = c.voc() / "SegmentationClass" / f"{victim}.png"
    mask = np.array(Image.open(png))
    mask[0, :3] = 77
    mask[1, 0] = 21
    out = Image.fromarray(mask, mode="P")
    out.putpalette(voc_palette())
    out.save(png)
    return c.evaluate(), [str(png), "21, 77", "outside 0..20 and 255"]


def mask_in_rgb(c: Ctx):
    victim = c.ids("val")[0]
    png = c.voc() / "SegmentationClass" / f"{victim}.png"
    Image.open(png).convert("RGB").save(png)
    return c.evaluate(), [str(png), "'RGB'"]


def mask_missing(c: Ctx):
    victim = c.ids("val")[4]
    png = c.voc() / "SegmentationClass" / f"{victim}.png"
    png.unlink()
    return c.evaluate(), ["'val'", "1 mask file(s) missing", str(png)]


def mask_of_another_size(c: Ctx):
    victim = c.ids("val")[3]
    png = c.voc() / "SegmentationClass" / f"{victim}.png"
    im = Image.open(png)
    im.resize((im.size[0] + 3, im.size[1])).save(png)
    return c.evaluate(), [str(png), f"{victim}.jpg"]


def evaluate_missing_data_root(c: Ctx):
    argv = c.evaluate()
    argv[argv.index("--data") + 1] = str(c.tmp / "nowhere")
    return argv, [f"VOC root {c.tmp / 'nowhere'}"]


def evaluate_unknown_split(c: Ctx):
    return c.evaluate(None, "--split", "vall"), ["'vall'", "vall.txt", "available splits"]


def checkpoint_from_another_model_config(c: Ctx):
    cfg = load_config("demo", TINY + ["model.decoder_channels=32"])
    path = c.tmp / "mixed.pt"
    save_checkpoint(path, cfg=cfg, model=SegNet("tiny", 21, 16, 4), iteration=1)  # weights of a 16-channel decoder
    return c.evaluate(path), [str(path), "does not fit this model config", "shape mismatch"]


def truncated_checkpoint(c: Ctx):
    path = c.tmp / "cut.pt"
    path.write_bytes(c.ckpt.read_bytes()[: c.ckpt.stat().st_size // 3])
    return c.evaluate(path), [str(path), "truncated or not a PyTorch file"]


def empty_checkpoint(c: Ctx):
    path = c.tmp / "empty.pt"
    path.write_bytes(b"")
    return c.evaluate(path), [str(path), "truncated or not a PyTorch file"]


def plain_state_dict_as_checkpoint(c: Ctx):
    path = c.tmp / "weights.pth"
    torch.save(SegNet("tiny", 21, 16, 4).state_dict(), path)
    return c.evaluate(path), [str(path), "not a weakseg checkpoint"]


def missing_checkpoint(c: Ctx):
    return c.evaluate(c.tmp / "nope.pt"), [str(c.tmp / "nope.pt"), "does not exist"]


def checkpoint_from_the_future(c: Ctx):
    path = c.tmp / "future.pt"
    state = torch.load(c.ckpt, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    return c.evaluate(path), [str(path), "format version 99", "upgrade weakseg"]


def crf_set_unknown_parameter(c: Ctx):
    return c.evaluate(None, "--crf", "--crf-set", "sxy=3"), ["--crf-set 'sxy=3'"]


def resume_with_another_model_config(c: Ctx):
    run = c.tmp / "run"
    cfg = load_config("demo", TINY + ["data.dataset=voc", f"data.root={c.data()}"])
    model = SegNet("tiny", 21, 16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    save_checkpoint(run / "checkpoints" / "last.pt", cfg=cfg, model=model, iteration=2, optimizer=opt, scheduler=sched)
    return c.train("model.decoder_channels=32", "optim.iterations=4") + ["--resume"], \
        [str(run), "model.decoder_channels: 16 -> 32"]


def resume_from_truncated_checkpoint(c: Ctx):
    last = c.tmp / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(c.ckpt.read_bytes()[:1000])
    return c.train() + ["--resume"], [str(last), "truncated"]


def resume_without_out(c: Ctx):
    return ["train", "demo", "--resume"], ["--resume needs --out"]


def export_without_source(c: Ctx):
    return ["export-voc", "--out", str(c.tmp / "sub.tar.gz")], ["exactly one source"]


def export_with_two_sources(c: Ctx):
    return ["export-voc", str(c.ckpt), "--best", str(c.tmp), "--out", str(c.tmp / "sub.tar.gz")], ["exactly one source"]


def export_best_of_no_search(c: Ctx):
    return ["export-voc", "--best", str(c.tmp), "--out", str(c.tmp / "sub.tar.gz")], [str(c.tmp), "no search.json"]


def export_mlflow_run_without_uri(c: Ctx):
    return ["export-voc", "--mlflow-run", "0123abcd", "--out", str(c.tmp / "sub.tar.gz")], ["--tracking-uri"]


def export_split_that_is_a_path(c: Ctx):
    return ["export-voc", str(c.ckpt), "--data", str(c.data()), "--split", "../../x", "--workers", "0",
            "--device", "cpu", "--out", str(c.tmp / "sub.tar.gz")], ["bad split name '../../x'"]


def export_with_truncated_checkpoint(c: Ctx):
    path = c.tmp / "cut.pt"
    path.write_bytes(c.ckpt.read_bytes()[:5000])
    return ["export-voc", str(path), "--data", str(c.data()), "--workers", "0", "--out", str(c.tmp / "sub.tar.gz")], \
        [str(path), "truncated"]


SPACE = """\
name: bad
base: demo
fixed:
  data.root: {root}
params:
  loss.lam: {{uniform: [0.0, 1.0]}}
settings:
  samples: 2
  results_dir: {results}
"""


def space(c: Ctx, old: str = "", new: str = "") -> Path:
    text = SPACE.format(root=c.synth_root, results=c.tmp / "results")
    assert old in text
    return c.file("space.yaml", text.replace(old, new, 1) if old else text)


def space_malformed_yaml(c: Ctx):
    f = space(c, "{uniform: [0.0, 1.0]}", "{uniform: [0.0, 1.0]")
    return ["search", str(f)], [str(f), "malformed YAML"]


def space_unknown_top_key(c: Ctx):
    f = space(c, "settings:", "setings:")
    return ["search", str(f)], [f"{f}:7", "setings", "did you mean 'settings'"]


def space_unknown_parameter(c: Ctx):
    f = space(c, "loss.lam:", "loss.lamb:")
    return ["search", str(f)], [f"{f}:6", "params.loss.lamb", "did you mean 'loss.lam'"]


def space_bad_bound(c: Ctx):
    f = space(c, "[0.0, 1.0]", "[1.0, 0.5]")
    return ["search", str(f)], [f"{f}:6", "params.loss.lam.uniform", "low (1.0) must be below high (0.5)"]


def space_bound_outside_the_config_range(c: Ctx):
    f = space(c, "loss.lam: {uniform: [0.0, 1.0]}", "loss.c_bg: {uniform: [0.5, 1.5]}")
    return ["search", str(f)], [f"{f}:6", "params.loss.c_bg", "1.5"]


def space_wrong_type(c: Ctx):
    f = space(c, "samples: 2", "samples: ten")
    return ["search", str(f)], [f"{f}:8", "settings.samples", "'ten'"]


def space_uniform_on_a_choice_key(c: Ctx):
    f = space(c, "loss.lam:", "loss.variant:")
    return ["search", str(f)], [f"{f}:6", "params.loss.variant", "use choice"]


def space_fixed_wrong_type(c: Ctx):
    f = space(c, "fixed:\n", "fixed:\n  optim.batch_size: lots\n")
    return ["search", str(f)], [str(f), "optim.batch_size", "'lots'"]


def space_is_a_list(c: Ctx):
    f = c.file("space.yaml", "- name: x\n- base: demo\n")
    return ["search", str(f)], [f"{f}:1", "must be a mapping"]


def space_missing(c: Ctx):
    return ["search", str(c.tmp / "nope.yaml")], [str(c.tmp / "nope.yaml"), "no such file"]


def space_bad_tracking_uri(c: Ctx):
    f = space(c, "  samples: 2\n", "  samples: 2\n  mlflow: {tracking_uri: 5}\n")
    return ["search", str(f)], [f"{f}:", "settings.mlflow.tracking_uri"]


def space_gpu_fraction_above_one(c: Ctx):
    f = space(c, "  samples: 2\n", "  samples: 2\n  resources: {cpu: 1, gpu: 1.5}\n")
    return ["search", str(f)], [f"{f}:", "settings.resources.gpu", "1.5"]


def space_alias_bomb(c: Ctx):
    """Eight levels of ten aliases: 10^8 strings once expanded (main grew to GBs before failing)."""
    levels = ["  l0: &l0 [exp, exp, exp, exp, exp, exp, exp, exp, exp, exp]"]
    levels += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 8)]
    f = space(c, "settings:\n", "settings:\n" + "\n".join(levels) + "\n")
    return ["search", str(f)], [str(f), "aliases are expanded"]


def space_huge_choice_list(c: Ctx):
    f = space(c, "loss.lam: {uniform: [0.0, 1.0]}", "loss.lam: {choice: [%s]}" % ", ".join(map(str, range(5000))))
    return ["search", str(f)], [f"{f}:6", "params.loss.lam.choice", "5000 values", "at most 1000"]


def space_file_too_large(c: Ctx):
    f = space(c)
    f.write_text(f.read_text() + "#" * (2 << 20) + "\n")
    return ["search", str(f)], [str(f), "bytes", "limited to 1048576"]


def space_duplicate_key(c: Ctx):
    f = space(c, "  samples: 2\n", "  samples: 2\n  samples: 5\n")
    return ["search", str(f)], [f"{f}:9", "duplicate key 'samples'", "first at line 8"]


def space_seed_out_of_range(c: Ctx):
    f = space(c, "  samples: 2\n", "  samples: 2\n  seed: 99999999999999999999\n")
    return ["search", str(f), "--dry-run"], [f"{f}:9", "settings.seed", "4294967295"]


def set_train_seed_out_of_range(c: Ctx):
    return c.train("train.seed=99999999999999999999"), ["train.seed", "4294967295"]


CASES: list[Case] = [
    malformed_yaml, unknown_key_in_file, bad_bound_in_file, wrong_type_in_file, config_file_is_a_list,
    missing_config_file, base_that_does_not_exist, set_unknown_key, set_wrong_type, set_bad_bound, set_bad_choice,
    set_without_value, cuda_on_a_machine_without_it, missing_data_root, split_id_without_image, id_escaping_the_root,
    annotation_without_objects, annotation_with_unknown_class, annotation_with_entities, labels_file_unknown_class,
    labels_file_missing_an_id, empty_split, unknown_split, corrupt_jpeg, image_that_is_not_an_image,
    mask_values_out_of_range, mask_in_rgb, mask_missing, mask_of_another_size, evaluate_missing_data_root,
    evaluate_unknown_split, checkpoint_from_another_model_config, truncated_checkpoint, empty_checkpoint,
    plain_state_dict_as_checkpoint, missing_checkpoint, checkpoint_from_the_future, crf_set_unknown_parameter,
    resume_with_another_model_config, resume_from_truncated_checkpoint, resume_without_out, export_without_source,
    export_with_two_sources, export_best_of_no_search, export_mlflow_run_without_uri, export_split_that_is_a_path,
    export_with_truncated_checkpoint, space_malformed_yaml, space_unknown_top_key, space_unknown_parameter,
    space_bad_bound, space_bound_outside_the_config_range, space_wrong_type, space_uniform_on_a_choice_key,
    space_fixed_wrong_type, space_is_a_list, space_missing, space_bad_tracking_uri, space_gpu_fraction_above_one,
    space_alias_bomb, space_huge_choice_list, space_file_too_large, space_duplicate_key, space_seed_out_of_range,
    set_train_seed_out_of_range,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, ctx: Ctx, capsys):
    argv, culprits = case(ctx)
    outputs = [ctx.tmp / "run", ctx.tmp / "ev", ctx.tmp / "sub.tar.gz", ctx.tmp / "results"]
    before = snapshot(outputs)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    check_contract(rc, err, argv[0], culprits)
    assert snapshot(outputs) == before  # absent stays absent, an existing run is untouched
    assert not list(ctx.tmp.glob(".*.tmp")), "a temporary file was left behind"


def test_an_image_above_the_pixel_limit_is_refused_by_name(ctx: Ctx, capsys):
    """Found at the evaluation that reads it, before it is decoded: one line naming it and the limit."""
    jpg = ctx.voc() / "JPEGImages" / f"{ctx.ids('val')[0]}.jpg"  # every val image is read at the evaluation
    with Image.open(jpg) as im:
        im.resize((200, 150)).save(jpg)  # the only image above 5000 pixels (the others are 64 x <= 64)
    capsys.readouterr()
    rc = main(ctx.train("data.max_pixels=5000"))
    check_contract(rc, capsys.readouterr().err, "train",
                   [str(jpg), "200x150 = 30000 pixels", "limit of 5000", "data.max_pixels"])


def test_a_pickled_object_in_a_checkpoint_is_refused_without_running_it(ctx: Ctx, capsys):
    """A checkpoint is untrusted input: torch.load(weights_only=True) must refuse code, not run it."""
    marker = ctx.tmp / "pwned"
    path = ctx.tmp / "evil.pt"
    torch.save({"format": "weakseg-checkpoint", "payload": _Evil(str(marker))}, path)
    rc = main(ctx.evaluate(path))
    check_contract(rc, capsys.readouterr().err, "evaluate", [str(path), "can't be loaded safely"])
    assert not marker.exists()
    assert not (ctx.tmp / "ev").exists()


class _Evil:
    """Unpickling this object would create a file: the oracle that nothing ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ------------------------------------------------------------------------- the real entry point


def run_weakseg(args: list[str], env: dict[str, str] | None = None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "weakseg", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def search_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(tmp / "home")  # Ray's token file stays inside the test
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wsb", dir="/tmp")  # AF_UNIX paths < 108 bytes
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_subprocess_malformed_yaml(ctx: Ctx):
    argv, culprits = malformed_yaml(ctx)
    r = run_weakseg(argv)
    check_contract(r.returncode, r.stderr, "train", culprits)
    assert not (ctx.tmp / "run").exists()


def test_subprocess_corrupt_jpeg_read_by_a_dataloader_worker(ctx: Ctx):
    """The UserError crosses a DataLoader worker process and still comes out as one line."""
    argv, culprits = corrupt_jpeg(ctx)
    argv[argv.index("--workers") + 1] = "2"
    r = run_weakseg(argv)
    check_contract(r.returncode, r.stderr, "evaluate", culprits)
    assert not (ctx.tmp / "ev").exists()


def test_subprocess_truncated_checkpoint_in_export(ctx: Ctx):
    argv, culprits = export_with_truncated_checkpoint(ctx)
    r = run_weakseg(argv)
    check_contract(r.returncode, r.stderr, "export-voc", culprits)
    assert not list(ctx.tmp.glob("*.tar.gz*")) and not list(ctx.tmp.glob(".sub.tar.gz*"))


def test_resume_of_a_search_that_does_not_exist(ctx: Ctx):
    f = space(ctx)
    r = run_weakseg(["search", str(f), "--resume"], env=search_env(ctx.tmp))
    check_contract(r.returncode, r.stderr, "search", ["--resume", str(ctx.tmp / "results" / "ray" / "bad")])
    assert not (ctx.tmp / "results").exists()


def test_search_name_that_already_exists_without_resume(ctx: Ctx):
    f = space(ctx)
    state = ctx.tmp / "results" / "ray" / "bad" / "tuner.pkl"  # what makes a Ray Tune experiment restorable
    state.parent.mkdir(parents=True)
    state.write_bytes(b"earlier search")
    before = snapshot([ctx.tmp / "results"])
    r = run_weakseg(["search", str(f)], env=search_env(ctx.tmp))
    check_contract(r.returncode, r.stderr, "search", ["'bad'", str(state.parent), "--resume"])
    assert snapshot([ctx.tmp / "results"]) == before


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.slow
def test_unreachable_mlflow_server_fails_before_any_trial(ctx: Ctx):
    uri = f"http://127.0.0.1:{closed_port()}"
    f = space(ctx, "  samples: 2\n", f"  samples: 2\n  mlflow: {{tracking_uri: '{uri}'}}\n")
    t0 = time.monotonic()
    r = run_weakseg(["search", str(f)], env=search_env(ctx.tmp), timeout=300)
    seconds = time.monotonic() - t0
    check_contract(r.returncode, r.stderr, "search", [uri, "unreachable", "settings.mlflow.tracking_uri"])
    assert not (ctx.tmp / "results").exists()  # no Ray experiment, no trial, no summary
    assert seconds < 60, seconds


@pytest.mark.slow
def test_restart_that_cannot_start_keeps_the_previous_search(ctx: Ctx):
    """--restart deletes the old search only once every check has passed: here MLflow is unreachable."""
    uri = f"http://127.0.0.1:{closed_port()}"
    f = space(ctx, "  samples: 2\n", f"  samples: 2\n  mlflow: {{tracking_uri: '{uri}'}}\n")
    state = ctx.tmp / "results" / "ray" / "bad" / "tuner.pkl"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"earlier search")
    before = snapshot([ctx.tmp / "results"])
    r = run_weakseg(["search", str(f), "--restart"], env=search_env(ctx.tmp), timeout=300)
    check_contract(r.returncode, r.stderr, "search", [uri, "unreachable"])
    assert snapshot([ctx.tmp / "results"]) == before


def test_resume_and_restart_together_are_refused_even_in_a_dry_run(ctx: Ctx, capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", str(space(ctx)), "--resume", "--restart", "--dry-run"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------- bugs found here (see the report)


def test_bad_base_names_the_file_that_holds_it(ctx: Ctx, capsys):
    argv, _ = base_that_does_not_exist(ctx)
    f = ctx.tmp / "bad.yaml"
    check_contract(main(argv), capsys.readouterr().err, "train", [f"{f}:1", "'paperr'"])


@pytest.mark.parametrize("samples", ["0", "-1"])
def test_samples_override_is_validated(ctx: Ctx, capsys, samples: str):
    argv = ["search", str(space(ctx)), "--samples", samples, "--dry-run"]
    check_contract(main(argv), capsys.readouterr().err, "search", ["--samples"])


def closed_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_address_where_no_ray_listens_fails_fast(ctx: Ctx):
    address = closed_address()
    proc = subprocess.Popen([sys.executable, "-m", "weakseg", "search", str(space(ctx)), "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=search_env(ctx.tmp),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=25)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail(f"weakseg search --address {address} still waiting after 25 s")
    check_contract(proc.returncode, err, "search", [address])
    assert not (ctx.tmp / "results").exists()


# ------------------------------------------------------------------------------- security defaults


PACKAGE = Path(__file__).resolve().parents[1] / "weakseg"


@functools.lru_cache(maxsize=1)
def package_trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def dotted(node: ast.AST) -> str:
    """`torch.load` for the call target torch.load, `subprocess.run` for subprocess.run, ...."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def calls(name_filter: Callable[[str], bool]) -> list[tuple[Path, ast.Call]]:
    return [(p, n) for p, tree in package_trees() for n in ast.walk(tree)
            if isinstance(n, ast.Call) and name_filter(dotted(n.func))]


def kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(p: Path, n: ast.AST) -> str:
    return f"{p.relative_to(PACKAGE.parent)}:{n.lineno}"


def test_every_torch_load_is_weights_only():
    found = calls(lambda d: d == "torch.load")
    assert len(found) >= 2, "expected torch.load in checkpoint.py and model.py"  # the check is not vacuous
    bad = [where(p, c) for p, c in found
           if not (isinstance(kw(c, "weights_only"), ast.Constant) and kw(c, "weights_only").value is True)]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    imports = [where(p, n) for p, t in package_trees() for n in ast.walk(t)
               if isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "load" for a in n.names)]
    assert not imports, f"`from torch import load` hides the call from this check: {imports}"


def test_no_pickle_of_data_files():
    modules = {"pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib", "_pickle"}
    imports = [where(p, n) for p, t in package_trees() for n in ast.walk(t)
               if (isinstance(n, ast.Import) and any(a.name.split(".")[0] in modules for a in n.names))
               or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in modules)]
    assert not imports, f"pickle-family imports in weakseg/: {imports}"
    loads = [where(p, c) for p, c in calls(lambda d: d.endswith(("np.load", "numpy.load")))
             if isinstance(kw(c, "allow_pickle"), ast.Constant) and kw(c, "allow_pickle").value]
    loads += [where(p, c) for p, c in calls(lambda d: d.endswith("read_pickle"))]
    assert not loads, f"pickled data loaded at {loads}"


def test_yaml_is_read_with_the_safe_loader_only():
    unsafe = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all", "compose",
              "compose_all", "parse", "scan"}
    bad = []
    for p, c in calls(lambda d: d.startswith("yaml.") and d.split(".", 1)[1] in unsafe):
        loader = dotted(kw(c, "Loader") or (c.args[1] if len(c.args) > 1 else ast.Constant(None)))
        if loader not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
            bad.append(where(p, c))
    assert not bad, f"YAML read without SafeLoader at {bad}"
    refs = [where(p, n) for p, t in package_trees() for n in ast.walk(t)
            if isinstance(n, ast.Attribute) and dotted(n) in ("yaml.Loader", "yaml.FullLoader", "yaml.UnsafeLoader",
                                                               "yaml.CLoader", "yaml.CFullLoader", "yaml.CUnsafeLoader")]
    assert not refs, f"unsafe YAML loaders referenced at {refs}"
    assert calls(lambda d: d == "yaml.safe_load"), "expected yaml.safe_load somewhere"  # not vacuous


def test_nothing_shells_out_with_user_strings():
    shells = [where(p, c) for p, c in calls(lambda d: d in ("os.system", "os.popen", "subprocess.getoutput",
                                                             "subprocess.getstatusoutput")
                                            or d.startswith(("os.exec", "os.spawn", "os.posix_spawn")))]
    assert not shells, f"shell-style process calls at {shells}"
    spawns = calls(lambda d: d in ("subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                                   "subprocess.check_output"))
    assert spawns, "expected the fixed-argument calls in search/run.py and cluster/local.py"
    for p, c in spawns:
        shell = kw(c, "shell")
        assert shell is None or (isinstance(shell, ast.Constant) and shell.value is False), where(p, c)
        arg = c.args[0] if c.args else kw(c, "args")
        if isinstance(arg, ast.Name):  # e.g. `cmd = [ray, "start", ...]; Popen(cmd, ...)`: find the list
            tree = dict(package_trees())[p]
            assigned = [a.value for a in ast.walk(tree) if isinstance(a, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == arg.id for t in a.targets)]
            assert assigned and all(isinstance(v, ast.List) for v in assigned), where(p, c)
        else:
            assert isinstance(arg, (ast.List, ast.Tuple)), f"{where(p, c)}: argv must be a list, not a string"


def test_archives_are_extracted_with_the_data_filter():
    found = calls(lambda d: d.endswith(".extractall") or d.endswith(".extract"))
    bad = [where(p, c) for p, c in found
           if not (isinstance(kw(c, "filter"), ast.Constant) and kw(c, "filter").value == "data")]
    assert not bad, f"tar extraction without filter='data' (path traversal) at {bad}"


def test_local_ray_binds_the_dashboard_to_loopback_with_token_auth(tmp_path: Path, monkeypatch):
    """A local search's Ray: dashboard on 127.0.0.1 (or off), token auth on, token file private."""
    import ray

    from weakseg.search import run

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.setenv(k, "x")  # recorded, so the test restores the caller's environment
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    run.prepare_local_auth(None)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
    text = token.read_text()
    assert len(text) == 64 and int(text, 16) >= 0  # 256 random bits, hex
    run.prepare_local_auth(None)
    assert token.read_text() == text  # an existing token is kept

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    run.init_ray(None)
    assert "address" not in seen  # a local Ray, started here
    assert seen.get("dashboard_host") == "127.0.0.1"
    assert seen.get("include_dashboard") in (False, None)


def test_the_printed_mlflow_ui_command_survives_a_store_path_with_spaces_and_quotes():
    import shlex

    from weakseg.cli import ui_command

    uri = "sqlite:////tmp/my results/it's here/mlflow.db"
    argv = shlex.split(ui_command(uri))  # what a shell would pass to mlflow
    assert argv == ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5000"]
    assert ui_command("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
