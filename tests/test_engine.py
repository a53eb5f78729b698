"""Training and evaluation loops: exact resume, the paper's schedule, evaluation at native size, failures."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from weakseg.checkpoint import load_checkpoint, load_model, save_checkpoint
from weakseg.config import load_config
from weakseg.data import build
from weakseg.data.classes import IGNORE_INDEX
from weakseg.engine import TrainingDiverged, evaluate, fit, make_optimizer, make_scheduler
from weakseg.errors import UserError
from weakseg.losses.objective import full_loss, lam_at
from weakseg.model import SegNet, upsample_logits


def cfg_with(overrides, *more):
    return load_config("demo", overrides + list(more))


def test_resume_continues_exactly(tmp_path: Path, tiny_overrides):
    """6 iterations straight == 3 iterations, stop, resume for 3 more: same weights and momentum."""
    cfg = cfg_with(tiny_overrides, "optim.iterations=6", "train.eval_every=3", "optim.lr_step=4",
                   "data.train_mode=scale_crop", "data.scale_min=0.7", "data.scale_max=1.3")
    straight = fit(cfg, tmp_path / "a")
    half = cfg_with(tiny_overrides, "optim.iterations=3", "train.eval_every=3", "optim.lr_step=4",
                    "data.train_mode=scale_crop", "data.scale_min=0.7", "data.scale_max=1.3")
    fit(half, tmp_path / "b")
    resumed = fit(cfg, tmp_path / "b", resume_from=tmp_path / "b" / "checkpoints" / "last.pt")
    assert straight.iteration == resumed.iteration == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        torch.testing.assert_close(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"], rtol=0, atol=0)
    # the history file has one row per evaluation, also across the resume
    rows = (tmp_path / "b" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].count(",") == rows[2].count(",")


class StopAt:
    """A reporter that interrupts training (as Ctrl-C would) when iteration `at` is logged."""

    def __init__(self, at: int) -> None:
        self.at = at

    def log(self, iteration, scalars) -> None:
        if iteration == self.at:
            raise KeyboardInterrupt

    def evaluated(self, iteration, scalars, result, final) -> None:
        pass


def test_interrupted_between_evaluations_resumes_from_the_periodic_checkpoint(tmp_path: Path, tiny_overrides):
    """checkpoint_every=2: killed at iteration 5, resumed from 4, the run ends as if never stopped."""
    sets = ["optim.iterations=7", "train.eval_every=7", "train.log_every=1", "optim.lr_step=3", "data.val_limit=1"]
    straight = fit(cfg_with(tiny_overrides, *sets), tmp_path / "a")
    cfg = cfg_with(tiny_overrides, *sets, "train.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "b", reporter=StopAt(5))
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["iteration"] == 4
    resumed = fit(cfg, tmp_path / "b", resume_from=last)
    assert resumed.iteration == 7
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_lr_schedule_and_groups_follow_section_5_3(tiny_overrides):
    """lr halves every lr_step iterations; pretrained layers get lr_pretrained, new ones lr_new."""
    cfg = cfg_with(tiny_overrides, "optim.lr_pretrained=0.001", "optim.lr_new=0.01", "optim.lr_step=5")
    model = SegNet("tiny", 21, 16, 4)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    for t in range(17):
        expected = [0.001 * 0.5 ** (t // 5), 0.01 * 0.5 ** (t // 5)]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-5


class Recorder:
    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def log(self, iteration, scalars) -> None:
        self.logged[iteration] = scalars

    def evaluated(self, iteration, scalars, result, final) -> None:
        pass


def test_fit_follows_the_schedule_and_logs_it(tmp_path: Path, tiny_overrides):
    """fit's own schedule: the lr logged after step t (what step t+1 uses) is lr0 · 0.5^⌊t/2⌋ per group."""
    cfg = cfg_with(tiny_overrides, "optim.lr_pretrained=0.002", "optim.lr_new=0.02", "optim.lr_step=2",
                   "optim.iterations=5", "train.eval_every=5", "train.log_every=1", "data.val_limit=1")
    rec = Recorder()
    fit(cfg, tmp_path / "run", reporter=rec)
    assert sorted(rec.logged) == [1, 2, 3, 4, 5]
    for t, s in rec.logged.items():
        assert s["train/lr/pretrained"] == pytest.approx(0.002 * 0.5 ** (t // 2))
        assert s["train/lr/new"] == pytest.approx(0.02 * 0.5 ** (t // 2))


def test_lambda_warmup():
    cfg = load_config("demo", ["loss.lam=0.5", "loss.lam_warmup=10"]).loss
    assert [lam_at(cfg, t) for t in (0, 5, 10, 50)] == [0.0, 0.25, 0.5, 0.5]
    assert lam_at(load_config("demo", ["loss.lam=0.5"]).loss, 0) == 0.5  # the paper: constant λ
    assert lam_at(load_config("demo", ["loss.variant=none"]).loss, 100) == 0.0


class Constant(nn.Module):
    """A 'model' whose stride-4 logits say class `c` everywhere."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, image):
        B, _, H, W = image.shape
        out = torch.full((B, 21, math.ceil(H / 4), math.ceil(W / 4)), -10.0)
        out[:, self.c] = 10.0
        return out + self.dummy


def test_evaluate_against_hand_computed_iou(synth_root: Path):
    """Predicting background everywhere: IoU_bg = #bg / #labelled pixels; every object class scores 0."""
    ds = build.eval_dataset(load_config("demo", [f"data.root={synth_root}"]), split="val", root=synth_root)
    loader = build.eval_loader(ds, build.LoaderOptions(workers=0, pin_memory=False))
    res = evaluate(Constant(0), loader, torch.device("cpu"), 21, boundary=False)
    masks = [np.asarray(Image.open(p)) for p in ds.mask_paths]
    bg = sum(int((m == 0).sum()) for m in masks)
    labelled = sum(int((m != IGNORE_INDEX).sum()) for m in masks)
    present = sorted({int(v) for m in masks for v in np.unique(m) if v != IGNORE_INDEX})
    assert res.metrics.iou[0] == pytest.approx(bg / labelled)
    for c in present[1:]:
        assert res.metrics.iou[c] == 0.0
    absent = [c for c in range(21) if c not in present]
    assert all(math.isnan(res.metrics.iou[c]) for c in absent)
    assert res.metrics.miou == pytest.approx(bg / labelled / len(present))
    assert res.images == len(ds)


def test_predictions_are_upsampled_to_each_images_size(synth_root: Path):
    ds = build.eval_dataset(load_config("demo", [f"data.root={synth_root}"]), split="val", root=synth_root)
    sizes = {tuple(ds[i]["image"].shape[-2:]) for i in range(len(ds))}
    assert any(h % 4 or w % 4 for h, w in sizes), "fixture should include sizes that are not multiples of 4"
    loader = build.eval_loader(ds, build.LoaderOptions(workers=0, pin_memory=False))
    res = evaluate(Constant(0), loader, torch.device("cpu"), 21, boundary=True, overlays=len(ds))
    for (img, pred, gt), i in zip(res.overlays, range(len(ds))):
        assert pred.shape == gt.shape == img.shape[:2] == tuple(ds[i]["image"].shape[-2:])


def test_full_supervision_loss_is_cross_entropy_at_input_size():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 5, 7)
    mask = torch.randint(0, 21, (2, 18, 27))
    mask[0, :3] = IGNORE_INDEX
    up = upsample_logits(logits, (18, 27))  # cell-aligned (tested in test_model.py)
    logp = up.log_softmax(1)
    keep = mask != IGNORE_INDEX
    picked = logp.permute(0, 2, 3, 1)[keep]  # (n, 21)
    expected = -picked[torch.arange(picked.shape[0]), mask[keep]].mean()
    torch.testing.assert_close(full_loss(logits, mask).total, expected)
    all_void = torch.full((2, 18, 27), IGNORE_INDEX)
    assert float(full_loss(logits, all_void).total) == 0.0


def test_divergence_stops_with_a_clear_reason_and_no_nan_checkpoint(tmp_path: Path, tiny_overrides):
    cfg = cfg_with(tiny_overrides, "optim.iterations=6", "train.eval_every=2", "train.log_every=1",
                   "optim.lr_new=1e12", "optim.lr_pretrained=1e12", "optim.momentum=0.0")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        fit(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    if last.exists():  # a checkpoint written before the divergence holds finite weights only
        state = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoints_describe_themselves_and_reject_bad_files(tmp_path: Path, tiny_overrides):
    cfg = cfg_with(tiny_overrides)
    model = SegNet("tiny", 21, 16, 4)
    path = tmp_path / "c.pt"
    save_checkpoint(path, cfg=cfg, model=model, iteration=7)
    loaded, cfg2, state = load_model(path)
    assert cfg2 == cfg and state["iteration"] == 7
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)

    other = load_config("demo", tiny_overrides + ["model.decoder_channels=32"])
    save_checkpoint(tmp_path / "other.pt", cfg=other, model=SegNet("tiny", 21, 32, 4), iteration=1)
    from weakseg.checkpoint import load_weights

    with pytest.raises(UserError, match="does not fit this model config: shape mismatch"):
        load_weights(model, load_checkpoint(tmp_path / "other.pt"), tmp_path / "other.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.pt is truncated or not a PyTorch file"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="not a weakseg checkpoint"):
        load_checkpoint(plain)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weakseg", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.mark.slow
def test_cli_train_resume_evaluate(tmp_path: Path, tiny_overrides):
    sets = [x for o in tiny_overrides + ["optim.iterations=4", "train.eval_every=2"] for x in ("--set", o)]
    out = tmp_path / "run"
    r = run_cli("train", "demo", *sets, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "config.yaml").is_file()
    assert not (out / "checkpoints" / "best.pt").exists()  # nothing is picked on val
    assert (out / "eval" / "classes.md").is_file() and (out / "eval" / "confusion.png").is_file()

    again = run_cli("train", "demo", *sets, "--out", str(out))
    assert again.returncode == 2 and "pass --resume" in again.stderr

    longer = [x for o in tiny_overrides + ["optim.iterations=6", "train.eval_every=2"] for x in ("--set", o)]
    r = run_cli("train", "demo", *longer, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 6

    changed = run_cli("train", "demo", *longer, "--set", "loss.lam=0.9", "--out", str(out), "--resume")
    assert changed.returncode == 2 and "loss.lam" in changed.stderr

    r = run_cli("evaluate", str(out / "checkpoints" / "last.pt"), "--workers", "0", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    assert "background" in r.stdout and (tmp_path / "ev" / "classes.csv").is_file()
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_evaluate_with_dense_crf_matches_refining_each_image(synth_root: Path):
    """The pooled CRF path gives the confusion matrix of refining every image one by one."""
    from weakseg.crf import CRFParams, refine
    from weakseg.engine import predict_probs
    from weakseg.metrics import ConfusionMatrix

    torch.manual_seed(0)
    model = SegNet("tiny", 21, 16, 4).eval()
    ds = build.eval_dataset(load_config("demo", [f"data.root={synth_root}"]), split="val", root=synth_root)
    loader = build.eval_loader(ds, build.LoaderOptions(workers=0, pin_memory=False))
    res = evaluate(model, loader, torch.device("cpu"), 21, crf=CRFParams(iterations=3), crf_workers=2,
                   boundary=False)
    cm = ConfusionMatrix(21)
    for i in range(len(ds)):
        item = ds[i]
        probs = predict_probs(model, item["image"][None])[0].numpy()
        refined = refine(item["image"].permute(1, 2, 0).numpy().copy(), probs, CRFParams(iterations=3))
        cm.update(torch.from_numpy(refined.argmax(0)), item["mask"])
    np.testing.assert_array_equal(res.metrics.matrix, cm.compute().matrix)


def test_train_and_evaluate_log_to_mlflow_when_configured(tmp_path: Path, tiny_overrides):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    sets = [x for o in tiny_overrides + ["optim.iterations=2", "train.eval_every=1", "train.log_every=1",
                                         f"tracking.uri={uri}", "tracking.experiment=single"] for x in ("--set", o)]
    from weakseg.cli import main

    assert main(["train", "demo", *sets, "--out", str(tmp_path / "run")]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("single")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optim.iterations"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [1, 2]
    assert "val/boundary_iou" in run.data.metrics and "val/iou/background" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/classes.md"}

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["evaluate", str(ckpt), "--workers", "0", "--out", str(tmp_path / "ev")]) == 0
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`weakseg.role` = 'evaluate'")
    assert len(runs) == 1
    ev = runs[0]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev.data.metrics["val/miou"] == pytest.approx(metrics["val/miou"])

    # --resume for two more iterations continues the same MLflow run; a changed seed is refused
    more = [x if x != "optim.iterations=2" else "optim.iterations=4" for x in sets]
    assert main(["train", "demo", *more, "--set", "train.seed=1", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert main(["train", "demo", *more, "--out", str(tmp_path / "run"), "--resume"]) == 0
    (again,) = client.search_runs([exp.experiment_id], filter_string="tags.`weakseg.role` = 'train'")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [1, 2, 3, 4]
    assert again.data.params["optim.iterations"] == "2" and again.data.tags["resumed.optim.iterations"] == "4"


def copy_without_train_masks(synth_root: Path, into: Path) -> Path:
    import shutil

    root = shutil.copytree(synth_root, into)
    voc = root / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = set((voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    for i in train:
        if i not in val:
            (voc / "SegmentationClass" / f"{i}.png").unlink()
    return root


def test_weak_training_runs_without_any_training_mask(tmp_path: Path, tiny_overrides):
    """Image-level labels only: with every training mask deleted, weak training runs; full supervision
    names the first mask it misses."""
    synth = Path(next(o for o in tiny_overrides if o.startswith("data.root=")).split("=", 1)[1])
    root = copy_without_train_masks(synth, tmp_path / "data")
    base = [o for o in tiny_overrides if not o.startswith("data.root=")] + [f"data.root={root}", "data.val_limit=2"]
    state = fit(cfg_with(base, "optim.iterations=2", "train.eval_every=2"), tmp_path / "weak")
    assert state.iteration == 2
    with pytest.raises(UserError, match=r"mask file\(s\) missing"):
        fit(cfg_with(base, "supervision=full", "optim.iterations=2"), tmp_path / "full")


def test_full_supervision_trains_on_the_masks(tmp_path: Path, tiny_overrides):
    """The upper bound: cross-entropy against the pixel masks goes down from ln 21 as it trains."""
    rec = Recorder()
    cfg = cfg_with(tiny_overrides, "supervision=full", "optim.iterations=30", "train.eval_every=30",
                   "train.log_every=10", "optim.lr_new=0.05", "optim.lr_pretrained=0.05", "data.val_limit=2")
    fit(cfg, tmp_path / "full", reporter=rec)
    losses = [rec.logged[t]["train/loss"] for t in (10, 20, 30)]
    assert all(rec.logged[t]["train/loss_neighb"] == 0.0 for t in (10, 20, 30))
    assert losses[0] < math.log(21) and losses[2] < losses[0], losses


def test_format_1_checkpoints_without_decoder_biases_still_evaluate(tmp_path: Path, tiny_overrides):
    """A checkpoint saved before the decoder convs had biases is the same model with zero biases."""
    cfg = cfg_with(tiny_overrides)
    model = SegNet("tiny", 21, 16, 4).eval()
    path = tmp_path / "v2.pt"
    save_checkpoint(path, cfg=cfg, model=model, iteration=3)
    state = torch.load(path, weights_only=True)
    biases = [k for k in state["model"] if k.endswith(".0.bias") and not k.startswith("encoder.")]
    assert len(biases) == 7  # skip4, skip8, dec16, dec8 x2, dec4 x2
    for k in biases:
        state["model"][k].zero_()
    expected_model = SegNet("tiny", 21, 16, 4).eval()
    expected_model.load_state_dict(state["model"])
    for k in biases:
        del state["model"][k]
    state["format_version"] = 1
    old = tmp_path / "v1.pt"
    torch.save(state, old)
    loaded, _, _ = load_model(old)
    image = torch.rand(1, 3, 40, 52) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), expected_model(image), rtol=0, atol=0)
    with pytest.raises(UserError, match="format 1.*cannot resume"):
        fit(cfg_with(tiny_overrides, "optim.iterations=4"), tmp_path / "run", resume_from=old)


def test_adamw_first_step_moves_every_weight_by_lr_times_the_gradients_sign(tiny_overrides):
    """AdamW's first step is lr · g / (|g| + eps) ≈ lr · sign(g) (bias-corrected moments m̂ = g, v̂ = g²),
    where SGD's would be lr · g: the configured optimizer, its lr groups and beta1 = optim.momentum."""
    cfg = cfg_with(tiny_overrides, "optim.optimizer=adamw", "optim.lr_new=0.1", "optim.lr_pretrained=0.1",
                   "optim.weight_decay=0", "optim.momentum=0.8")
    model = SegNet("tiny", 21, 8, 4)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.999)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(2, 3, 32, 32) * 255).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, g, p in zip(before, grads, model.parameters()):
        big = g.abs() > 1e-4  # eps = 1e-8 is negligible there
        torch.testing.assert_close((b - p.detach())[big], 0.1 * g[big].sign(), rtol=1e-3, atol=1e-6)


def test_resuming_with_another_optimizer_is_refused(tmp_path: Path, tiny_overrides):
    fit(cfg_with(tiny_overrides, "optim.iterations=2", "train.eval_every=2"), tmp_path / "r")
    cfg = cfg_with(tiny_overrides, "optim.iterations=4", "train.eval_every=2", "optim.optimizer=adamw")
    with pytest.raises(UserError, match=r"optim.optimizer=sgd"):
        fit(cfg, tmp_path / "r", resume_from=tmp_path / "r" / "checkpoints" / "last.pt")
