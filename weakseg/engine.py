"""Training and evaluation loops, in the style of torchvision's references/segmentation.

`fit` runs the paper's protocol (§5.3) for one config: an endless, replayable
stream of batches, SGD with two learning-rate groups and a step schedule,
evaluation every `train.eval_every` iterations, a checkpoint (`last.pt`, the
one reported: see "Model selection" in docs/method.md), and a `Reporter` that
the CLI (console, MLflow) and the search (Ray Tune) plug into. All of a step's
work is done before the reporter hears of it, so a search that stops a trial at
a report loses nothing.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from weakseg.checkpoint import load_checkpoint, load_weights, model_from_config, save_checkpoint, unwrap
from weakseg.config import Config, save_config
from weakseg.crf import CRFParams
from weakseg.data import build
from weakseg.data.classes import IGNORE_INDEX, VOC_CLASSES
from weakseg.diagnostics import ImageLevelMeter, object_iou
from weakseg.errors import UserError
from weakseg.io import atomic_write_text, csv_text
from weakseg.losses.image_level import weak_loss_with_image_level
from weakseg.losses.objective import LossParts, full_loss, lam_at
from weakseg.metrics import BoundaryMetrics, ConfusionMatrix, SegMetrics
from weakseg.model import upsample_logits


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run is stopped, not silently continued."""


# ------------------------------------------------------------------------ devices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name}: CUDA is not available on this machine (use auto or cpu)")
    return dev


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Mixed precision dtype, or None for float32. bfloat16 where supported (no loss scaling needed)."""
    on = cfg.train.amp == "on" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not on:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")


def loader_options(cfg: Config, device: torch.device) -> build.LoaderOptions:
    """Data-loading switches: pinned memory helps only for copies to a GPU (auto), workers as configured."""
    pin = cfg.train.pin_memory == "on" or (cfg.train.pin_memory == "auto" and device.type == "cuda")
    return build.LoaderOptions(workers=cfg.data.workers, pin_memory=pin, persistent=cfg.train.persistent_workers)


# ----------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    metrics: SegMetrics
    boundary: Any  # BoundaryMetrics.compute() result
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    images: int
    seconds: float
    image_level: dict[str, float] = field(default_factory=dict)  # weakseg.diagnostics.ImageLevelMeter.compute()

    def scalars(self, prefix: str = "val") -> dict[str, float]:
        """Flat metrics for loggers: miou, pixel accuracy, per-class IoU (all classes, NaN where a class is
        absent from both ground truth and prediction), boundary scores."""
        m = self.metrics
        out = {f"{prefix}/miou": float(m.miou), f"{prefix}/pixel_acc": float(m.pixel_acc)}
        for name, v in zip(m.class_names, m.iou):
            out[f"{prefix}/iou/{name}"] = float(v)
        b = self.boundary
        if b is not None:
            if not math.isnan(b.mean_boundary_iou):
                out[f"{prefix}/boundary_iou"] = float(b.mean_boundary_iou)
            for w, acc in b.trimap.items():
                if not math.isnan(acc):
                    out[f"{prefix}/trimap_acc/{w}px"] = float(acc)
        out[f"{prefix}/object_iou"] = object_iou(m.iou)
        out.update({f"{prefix}/{k}": v for k, v in self.image_level.items()})
        return out


@torch.inference_mode()
def predict_probs(model: nn.Module, image: Tensor, amp: torch.dtype | None = None) -> Tensor:
    """image (1, 3, H, W) 0–255 on the model's device -> softmax probabilities (1, C, H, W) at the image's size."""
    with torch.autocast(image.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(image)  # (1, C, h, w)
    return upsample_logits(logits.float(), tuple(image.shape[-2:])).softmax(dim=1)


def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    num_classes: int,
    *,
    amp: torch.dtype | None = None,
    crf: CRFParams | None = None,
    crf_workers: int = 0,
    boundary: bool = True,
    overlays: int = 0,
    progress: bool = False,
) -> EvalResult:
    """mIoU, per-class IoU and boundary quality of `model` on a loader of single images.

    Predictions are made at each image's own size. With `crf` (a `CRFParams`),
    the probabilities are refined by the dense CRF in `crf_workers` processes.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
    meter = ImageLevelMeter(num_classes)
    bm = BoundaryMetrics(num_classes, ignore_index=IGNORE_INDEX) if boundary else None
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    t0, n = time.perf_counter(), 0

    def predictions() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for batch in _progress(loader, progress, "eval"):
            image = batch["image"].to(device, non_blocking=True)  # (1, 3, H, W) uint8
            probs = predict_probs(model, image, amp)  # (1, C, H, W)
            if "labels" in batch:
                meter.add_probs(probs[0], batch["labels"][0])
            yield batch["mask"][0], batch["image"][0], probs[0]

    stream: Iterable[tuple[Tensor, Tensor, Tensor]] = predictions()
    if crf is not None:
        from weakseg.crf import refine_stream

        stream = refine_stream(stream, crf, crf_workers)
    for mask, image, probs in stream:
        pred = probs.argmax(dim=0)  # (H, W)
        mask = mask.to(pred.device)
        cm.update(pred, mask)
        meter.add_prediction(pred, mask)
        if bm is not None or len(kept) < overlays:
            pred_np, mask_np = pred.cpu().numpy(), mask.cpu().numpy()
            if bm is not None:
                bm.update(pred_np, mask_np)
            if len(kept) < overlays:
                kept.append((image.permute(1, 2, 0).cpu().numpy(), pred_np, mask_np))
        n += 1
    if n == 0:
        raise UserError("the evaluation split is empty")
    return EvalResult(
        metrics=cm.compute(),
        boundary=bm.compute() if bm is not None else None,
        overlays=kept,
        images=n,
        seconds=time.perf_counter() - t0,
        image_level=meter.compute(),
    )


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------- training


class Reporter(Protocol):
    """Where training progress goes: the console, an MLflow run, a Ray Tune trial."""

    def log(self, iteration: int, scalars: dict[str, float]) -> None: ...

    def evaluated(self, iteration: int, scalars: dict[str, float], result: EvalResult, final: bool) -> None: ...


class NullReporter:
    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        pass

    def evaluated(self, iteration: int, scalars: dict[str, float], result: EvalResult, final: bool) -> None:
        pass


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    # peak val mIoU over the evaluations: information only, never the reported result (it is
    # chosen on the same val images, so it overestimates); the result is `final_miou`
    best_miou: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)
    train_log: list[dict[str, float]] = field(default_factory=list)  # the logged training scalars (train_log.csv)
    image_phase_over: bool = False  # the classification-first phase ended early (loss.cls_switch_auc reached)

    @property
    def final_miou(self) -> float:
        """The reported score: val mIoU of the last evaluation (that of checkpoints/last.pt)."""
        return float(self.history[-1].get("val/miou", math.nan)) if self.history else math.nan


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The paper's two learning rates (1e-3 pretrained layers, 1e-2 new ones) with SGD, or AdamW."""
    o = cfg.optim
    groups = unwrap(model).param_groups()  # type: ignore[operator]
    params = [
        {"params": groups["pretrained"], "lr": o.lr_pretrained, "name": "pretrained"},
        {"params": groups["new"], "lr": o.lr_new, "name": "new"},
    ]
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr_new, betas=(o.momentum, 0.999), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr_new, momentum=o.momentum, weight_decay=o.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.StepLR:
    """Every learning rate multiplied by `lr_gamma` (the paper: halved) every `lr_step` iterations."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.lr_step, gamma=cfg.optim.lr_gamma)


def train_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    state: TrainState,
    cfg: Config,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
) -> LossParts:
    """One SGD step on one batch; returns the loss parts (still on the device)."""
    image = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) uint8
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    # padding (hence invalid pixels) only happens in scale_crop mode; skip the masking work otherwise
    valid = batch.get("valid") if cfg.data.train_mode == "scale_crop" else None
    valid = valid.to(device, non_blocking=True) if valid is not None else None
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(image)  # (B, C, h, w)
    if cfg.supervision in ("full", "pseudo"):  # pseudo: the cross-entropy on pseudo label maps
        parts = full_loss(logits, batch["mask"].to(device, non_blocking=True))
    else:
        labels = batch["labels"].to(device, non_blocking=True)  # (B, C)
        parts = weak_loss_with_image_level(logits, labels, image.float(), cfg.loss, lam_at(cfg.loss, state.iteration),
                                           in_image_phase(cfg, state), valid)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(parts.total).backward()
    if cfg.optim.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    return parts


def fit(
    cfg: Config,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    reporter: Reporter | None = None,
) -> TrainState:
    """Train `cfg` to `optim.iterations`, evaluating and checkpointing into `run_dir`.

    run_dir/config.yaml                   the resolved config
    run_dir/checkpoints/last.pt           self-describing checkpoint of the last iteration: the reported
                                          model (no best-on-val checkpoint is kept: docs/method.md)
    run_dir/metrics.csv                   one row per evaluation
    run_dir/eval/                         per-class table, confusion matrix and overlays of the latest evaluation
    """
    reporter = reporter or NullReporter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    amp = amp_dtype(cfg, device)
    channels_last = use_channels_last(cfg, device)
    progress = cfg.train.progress == "on" or (cfg.train.progress == "auto" and sys.stderr.isatty())
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels once

    train_ds = build.train_dataset(cfg)
    val_ds = build.limit(build.eval_dataset(cfg), cfg.data.val_limit)
    loader_opts = loader_options(cfg, device)

    model = model_from_config(cfg, pretrained=resume_from is None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    state = TrainState(model, optimizer, scheduler, scaler)
    if resume_from is not None:
        _restore(state, resume_from, device)
        thr = cfg.loss.cls_switch_auc  # did an evaluation before the checkpoint end the image-level phase?
        state.image_phase_over = thr > 0 and any(r.get("val/image_auc", -1.0) >= thr for r in state.history)
        print(f"weakseg: resuming from iteration {state.iteration} of {cfg.optim.iterations} ({resume_from})",
              flush=True)
    if cfg.train.compile:
        model = torch.compile(model)
        state.model = model

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    total = cfg.optim.iterations
    if state.iteration >= total:
        return state
    batches = iter(build.train_loader(train_ds, cfg, state.iteration, total, loader_opts))
    val_loader = build.eval_loader(val_ds, loader_opts)

    window = _Window()
    bar = _progress(range(state.iteration, total), progress, "train")
    model.train()
    for _ in bar:
        t0 = time.perf_counter()
        batch = next(batches)
        parts = train_step(model, batch, state, cfg, device, amp, channels_last)
        it = state.iteration
        evaluate_now = it % cfg.train.eval_every == 0 or it == total
        # flushing checks the loss is finite: always before an evaluation writes a checkpoint
        checkpoint_now = bool(cfg.train.checkpoint_every) and it % cfg.train.checkpoint_every == 0
        flush = evaluate_now or checkpoint_now or it % cfg.train.log_every == 0
        scalars = window.add(parts, batch["image"].shape[0], time.perf_counter() - t0, state, flush=flush)
        if flush:
            if progress:
                bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", cls=f"{scalars['train/loss_class']:.3f}",
                                neighb=f"{scalars['train/loss_neighb']:.3f}", lam=f"{scalars['train/lambda']:.2g}",
                                img_s=f"{scalars['train/images_per_s']:.1f}")
            reporter.log(it, scalars)
            state.train_log.append({"iteration": it, **scalars})
        if evaluate_now:
            _evaluate_and_checkpoint(state, cfg, run_dir, val_loader=val_loader, device=device, amp=amp,
                                     progress=progress, reporter=reporter, final=it == total)
            model.train()
        elif checkpoint_now:
            _save_last(state, cfg, run_dir, state.history[-1] if state.history else {})
            _write_history(run_dir / TRAIN_LOG, state.train_log)
    return state


TRAIN_LOG = "train_log.csv"  # the run's training scalars (losses, λ, learning rates), written with each checkpoint


def in_image_phase(cfg: Config, state: TrainState) -> bool:
    """Whether this step trains the image-level loss alone (the classification-first phase)."""
    return state.iteration < cfg.loss.cls_only_iters and not state.image_phase_over


def _save_last(state: TrainState, cfg: Config, run_dir: Path, metrics: dict[str, float]) -> None:
    """checkpoints/last.pt: everything `--resume` needs to continue exactly from this iteration."""
    save_checkpoint(run_dir / "checkpoints" / "last.pt", cfg=cfg, model=state.model, iteration=state.iteration,
                    optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
                    best_miou=state.best_miou, metrics=metrics)


class _Window:
    """Running means of the loss parts and throughput between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.images, self.seconds, self.steps = 0, 0.0, 0

    def add(self, parts: LossParts, images: int, seconds: float, state: TrainState, flush: bool) -> dict[str, float]:
        for k in ("total", "cls", "neighb", "image"):
            v = getattr(parts, k)
            if v is None:
                continue
            v = v.detach()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.images += images
        self.seconds += seconds
        self.steps += 1
        if not flush:
            return {}
        means = {k: float(v) / self.steps for k, v in self.sums.items()}  # one host sync per log line
        if not all(math.isfinite(v) for v in means.values()):
            raise TrainingDiverged(
                f"loss became non-finite before iteration {state.iteration} "
                f"(class={means['cls']:.4g}, neighb={means['neighb']:.4g}); "
                "lower optim.lr_new / loss.lam or enable optim.grad_clip"
            )
        lrs = {f"train/lr/{g['name']}": g["lr"] for g in state.optimizer.param_groups}
        out = {
            "train/loss": means["total"],
            "train/loss_class": means["cls"],
            "train/loss_neighb": means["neighb"],
            "train/lambda": parts.lam,
            **({"train/loss_image": means["image"]} if "image" in means else {}),
            "train/images_per_s": self.images / max(self.seconds, 1e-9),
            **lrs,
        }
        self.sums, self.images, self.seconds, self.steps = {}, 0, 0.0, 0
        return out


def _evaluate_and_checkpoint(state: TrainState, cfg: Config, run_dir: Path, *, val_loader: Iterable[dict[str, Any]],
                             device: torch.device, amp: torch.dtype | None, progress: bool, reporter: Reporter,
                             final: bool) -> None:
    from weakseg.report import class_table, write_eval_artifacts, write_tables

    result = evaluate(
        state.model, val_loader, device, cfg.model.num_classes, amp=amp, overlays=cfg.train.overlays,
        progress=progress,
    )
    scalars = result.scalars("val")
    scalars["iteration"] = state.iteration
    _check_learning(state, cfg, scalars)
    miou = result.metrics.miou
    if math.isnan(state.best_miou) or miou > state.best_miou:
        state.best_miou = miou
    _save_last(state, cfg, run_dir, scalars)
    state.history.append(scalars)
    _write_history(run_dir / "metrics.csv", state.history)
    _write_history(run_dir / TRAIN_LOG, state.train_log)
    eval_dir = run_dir / "eval"
    write_eval_artifacts(result, list(VOC_CLASSES[: cfg.model.num_classes]), eval_dir)
    # every evaluation's table stays, so the one behind any checkpoint can be found again
    write_tables(class_table(result.metrics, result.boundary), eval_dir / f"iter-{state.iteration:06d}")
    reporter.evaluated(state.iteration, scalars, result, final)


def _check_learning(state: TrainState, cfg: Config, scalars: dict[str, float]) -> None:
    """Add the prior's foreground demand and the collapse flag to an evaluation's scalars; warn on collapse.

    Also ends the classification-first phase early once val image AUC reaches loss.cls_switch_auc.
    """
    from weakseg.diagnostics import collapse_scalars, fg_demand

    l = cfg.loss
    n = scalars.get("val/classes_per_image")
    if n is not None:
        c = l.object_fraction if l.c_fg_mode == "size" else l.c_fg  # confident mode: its ceiling
        scalars["val/fg_demand"] = fg_demand(n, l.c_bg, c)
    armed = cfg.supervision != "full" and state.iteration >= cfg.train.collapse_after * cfg.optim.iterations
    flag, reason = collapse_scalars(scalars, "val", armed, cfg.train.collapse_auc)
    scalars.update(flag)
    if reason:
        print(f"weakseg: WARNING: weak training looks collapsed at iteration {state.iteration}: {reason}. "
              "From random init, try the recipe of the config demo_weak (the image-level loss with top-k pooling "
              "first, loss.c_fg_mode=size, model.padding=replicate, optim.optimizer=adamw), a smaller loss.lam, or "
              "a pretrained backbone.", file=sys.stderr, flush=True)
    auc = scalars.get("val/image_auc", math.nan)
    if l.cls_switch_auc > 0 and in_image_phase(cfg, state) and auc >= l.cls_switch_auc:
        state.image_phase_over = True
        print(f"weakseg: val image AUC {auc:.3f} >= loss.cls_switch_auc: the pixel loss starts at iteration "
              f"{state.iteration}", flush=True)


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    atomic_write_text(path, csv_text(rows))


def _restore(state: TrainState, path: Path, device: torch.device) -> None:
    """Continue exactly where a checkpoint stopped: weights, momentum, schedule, iteration."""
    ck = load_checkpoint(path, map_location=device)
    if ck.get("format_version", 1) < 2:
        raise UserError(f"checkpoint {path} is from weakseg's format 1 (decoder convs without bias): "
                        "it can be evaluated and exported, but training cannot resume from it")
    load_weights(state.model, ck, path)
    if ck.get("optimizer") is None or ck.get("scheduler") is None:
        raise UserError(f"checkpoint {path} has no optimizer state: it can be evaluated but not resumed")
    saved = (ck.get("config") or {}).get("optim", {}).get("optimizer", "sgd")  # format 2 before the key: SGD
    if saved != type(state.optimizer).__name__.lower():
        raise UserError(f"checkpoint {path} was trained with optim.optimizer={saved}: resume it with the same "
                        f"optimizer (--set optim.optimizer={saved}), or start a new run")
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler") is not None and state.scaler.is_enabled():
        state.scaler.load_state_dict(ck["scaler"])
    state.iteration = int(ck["iteration"])
    state.best_miou = float(ck.get("best_miou", float("nan")))
    metrics = ck.get("metrics") or {}
    state.history = []
    hist = path.parent.parent / "metrics.csv"
    if hist.is_file():
        with hist.open() as f:
            state.history = [
                {k: float(v) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)
                if float(row.get("iteration", 0) or 0) <= state.iteration
            ]
    elif metrics:
        state.history = [metrics]
    log = path.parent.parent / TRAIN_LOG
    if log.is_file():
        with log.open() as f:
            state.train_log = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)
                               if float(row.get("iteration", 0) or 0) <= state.iteration]

