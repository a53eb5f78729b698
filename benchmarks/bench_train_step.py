"""Train-step overhead of the neighbourhood loss: step time with λ > 0 over λ = 0 (paper: "negligible").

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--batch 4] [--size 224]
        [--amp auto|on|off] [--channels-last auto|on|off] [--compile] [--flags-sweep]

One `weakseg.engine.train_step` (forward, prior + class loss, neighbourhood
loss, backward, SGD step) of the VGG16 model, timed for λ = 0 and for
λ = 0.3 with each filtering backend (dense, permutohedral) and each variant
(mean, exp). The ratio λ>0 / λ=0 is what the issue's target (≤ 1.03) is about.
Then the split: the prior solver (`pixel_label_targets`), the neighbourhood
loss forward, and its backward, each as a share of the λ = 0 step. Then the
peak memory of each configuration (CPU: peak RSS of a fresh process per
configuration; CUDA: the allocator's peak).

All configurations share one model and one optimizer whose learning rates are
set to 0 (the SGD step does the same arithmetic), so every step sees the same
network output and the prior solver takes the same path in every
configuration: differences are the loss's alone. Configurations run
round-robin; the table gives medians over `--rounds`.

`--flags-sweep`, instead of the tables above, times the step under fp32,
AMP, AMP + channels-last and AMP + channels-last + torch.compile (the
`train.amp`, `train.channels_last`, `train.compile` switches of the config),
for λ = 0 and λ = 0.3 (backend auto): the speed-ups the issue asks for on a
GPU. On a CPU, bfloat16 autocast pays only where the CPU has bfloat16
instructions (AVX512-BF16, AMX).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common import (base_parser, interleaved, isolated, median, ms, peak_since, print_machine, reset_peak,
                    setup_device, spread, table, voc_like_images, voc_like_labels)
from weakseg import engine
from weakseg.checkpoint import model_from_config
from weakseg.config import Config, load_config
from weakseg.losses.neighborhood import neighborhood_loss
from weakseg.losses.prior import pixel_label_targets
from weakseg.model import OUTPUT_STRIDE

LAM = 0.3  # the paper's λ for its best (exp) model
CONFIGS = {  # name -> loss overrides
    "λ=0": ["loss.lam=0"],
    "dense / mean": ["loss.backend=dense", "loss.variant=mean"],
    "dense / exp": ["loss.backend=dense", "loss.variant=exp"],
    "permutohedral / mean": ["loss.backend=permutohedral", "loss.variant=mean"],
    "permutohedral / exp": ["loss.backend=permutohedral", "loss.variant=exp"],
}
FLAG_SETTINGS = {  # name -> (amp, channels_last, compile)
    "fp32": ("off", "off", False),
    "amp": ("on", "off", False),
    "amp + channels-last": ("on", "on", False),
    "amp + channels-last + compile": ("on", "on", True),
}


def make_config(batch: int, size: int, device: torch.device, amp: str, channels_last: str, compile_: bool,
                loss: list[str]) -> Config:
    """The paper's config (random init) with the benchmark's sizes, switches and loss settings."""
    return load_config("paper", [
        "model.pretrained=none", f"optim.batch_size={batch}", f"data.crop_size={size}",
        f"train.device={device}", f"train.amp={amp}", f"train.channels_last={channels_last}",
        f"train.compile={compile_}", f"loss.lam={LAM}", *loss,
    ])


@dataclass
class Setup:
    model: torch.nn.Module
    state: engine.TrainState
    batch: dict[str, torch.Tensor]
    amp: torch.dtype | None
    channels_last: bool


def build(cfg: Config, device: torch.device, seed: int = 0) -> Setup:
    """Model, zero-learning-rate optimizer and one VOC-like batch on `device`, as `engine.fit` sets them up."""
    torch.manual_seed(seed)
    amp = engine.amp_dtype(cfg, device)
    channels_last = engine.use_channels_last(cfg, device)
    model = model_from_config(cfg, pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # same arithmetic, unchanged weights: every step sees the same output
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.lr_step, gamma=cfg.optim.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    state = engine.TrainState(model, optimizer, scheduler, scaler)
    if cfg.train.compile:
        model = torch.compile(model)
        state.model = model
    model.train()
    B, size = cfg.optim.batch_size, cfg.data.crop_size
    batch = {"image": voc_like_images(B, size, seed), "labels": voc_like_labels(B, cfg.model.num_classes, seed),
             "valid": torch.ones(B, size, size, dtype=torch.bool)}
    return Setup(model, state, batch, amp, channels_last)


def step_fn(setup: Setup, cfg: Config, device: torch.device) -> Callable[[], None]:
    """One full `engine.train_step` with this configuration's loss settings."""
    def run() -> None:
        engine.train_step(setup.model, setup.batch, setup.state, cfg, device, setup.amp, setup.channels_last)
    return run


def split_fns(setup: Setup, cfgs: dict[str, Config], device: torch.device) -> dict[str, Callable[[], object]]:
    """The loss's parts on the batch's network output: prior solver, and per configuration fwd / fwd+bwd."""
    image = setup.batch["image"].to(device)  # (B, 3, H, W) uint8
    labels = setup.batch["labels"].to(device)  # (B, C)
    with torch.no_grad(), torch.autocast(device.type, dtype=setup.amp or torch.float32,
                                         enabled=setup.amp is not None):
        logits = setup.model(image).float()  # (B, C, h, w)
    image = image.float()
    loss0 = next(iter(cfgs.values())).loss
    fns: dict[str, Callable[[], object]] = {
        "prior": lambda: pixel_label_targets(logits.softmax(1), labels, c_bg=loss0.c_bg, c_fg=loss0.c_fg)
    }
    for name, cfg in cfgs.items():
        if cfg.loss.lam == 0:
            continue
        leaf = logits.clone().requires_grad_(True)

        def neighb(c=cfg.loss, leaf=leaf):  # exactly weak_loss's call
            log_p = F.log_softmax(leaf, dim=1)
            return neighborhood_loss(log_p.exp(), image, variant=c.variant, w1=c.w1, theta_alpha=c.theta_alpha,
                                     theta_beta=c.theta_beta, w2=c.w2, theta_gamma=c.theta_gamma,
                                     stride=OUTPUT_STRIDE, backend=c.backend, grad=c.grad, log_probs=log_p)

        fns[f"{name} fwd"] = neighb
        fns[f"{name} fwd+bwd"] = lambda neighb=neighb, leaf=leaf: (neighb().backward(), setattr(leaf, "grad", None))
    return fns


def memory_case(args: argparse.Namespace) -> None:
    """Subprocess entry: peak memory of two steps of one configuration, above the built model and batch."""
    device = setup_device(args)
    cfg = make_config(args.batch, args.size, device, args.amp, args.channels_last, args.compile,
                      CONFIGS[args.memory_case])
    setup = build(cfg, device)
    base = reset_peak(device)
    run = step_fn(setup, cfg, device)
    run()
    run()
    print(json.dumps({"peak_mb": peak_since(device, base)}))


def flags_sweep(args: argparse.Namespace, device: torch.device) -> None:
    """Step time under each performance switch, λ = 0 and λ = 0.3 (backend auto, exp)."""
    rows, fp32 = [], None
    for name, (amp, cl, comp) in FLAG_SETTINGS.items():
        cfgs = {lam: make_config(args.batch, args.size, device, amp, cl, comp, [f"loss.lam={lam}", "loss.variant=exp"])
                for lam in (0, LAM)}
        try:
            setup = build(cfgs[0], device)
            times = interleaved({lam: step_fn(setup, c, device) for lam, c in cfgs.items()}, device,
                                args.rounds, warmup=2)
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain on this host
            rows.append([name, "failed", "", "", "", "", f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"])
            continue
        t0, t1 = median(times[0]), median(times[LAM])
        fp32 = fp32 or t1
        rows.append([name, ms(t0), ms(t1), f"{t1 / t0:.3f}", f"{args.batch / t1:.1f}", f"{fp32 / t1:.2f}×", ""])
        del setup
    print(f"Performance switches (batch {args.batch}, {args.size}×{args.size}, median of {args.rounds}, "
          f"λ = {LAM} with backend auto):")
    print(table(["setting", "step λ=0", f"step λ={LAM}", "ratio", f"img/s (λ={LAM})", "speed-up over fp32",
                 "note"], rows))
    print()


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 4 on CPU, 20 on CUDA)")
    parser.add_argument("--size", type=int, default=224, help="input side (the paper's 224)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per configuration (default 5)")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="train.amp (auto: on for CUDA)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="train.channels_last (auto: on for CUDA)")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile the model")
    parser.add_argument("--flags-sweep", action="store_true",
                        help="instead of the backend tables, time fp32 / amp / channels-last / compile side by side")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--memory-case", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = setup_device(args)
    if args.batch is None:
        args.batch = 20 if device.type == "cuda" else 4
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.memory_case:
        memory_case(args)
        return

    print_machine(device)
    if args.flags_sweep:
        flags_sweep(args, device)
        return
    cfgs = {name: make_config(args.batch, args.size, device, args.amp, args.channels_last, args.compile, loss)
            for name, loss in CONFIGS.items()}
    setup = build(cfgs["λ=0"], device)
    print(f"VGG16 train step, batch {args.batch} at {args.size}×{args.size} "
          f"(output grid {args.size // OUTPUT_STRIDE}², 21 classes), amp {setup.amp or 'off'}, "
          f"channels-last {setup.channels_last}, compile {args.compile}; λ = {LAM} where on; "
          f"labels per image: {setup.batch['labels'][:, 1:].sum(1).int().tolist()} object classes")

    times = interleaved({name: step_fn(setup, cfg, device) for name, cfg in cfgs.items()}, device, args.rounds)
    base = median(times["λ=0"])
    memory: dict[str, float | None] = {}
    if not args.no_memory and not args.quick:
        script = Path(__file__).resolve()
        for name in CONFIGS:
            flags = ["--memory-case", name, "--device", args.device, "--threads", str(args.threads),
                     "--batch", str(args.batch), "--size", str(args.size), "--amp", args.amp,
                     "--channels-last", args.channels_last] + (["--compile"] if args.compile else [])
            out = isolated(script, flags)
            memory[name] = out["peak_mb"] if out else None
    rows = []
    for name, ts in times.items():
        t = median(ts)
        mem = memory.get(name)
        rows.append([name, ms(t), f"{spread(ts) * 100:.0f} %", f"{t / base:.3f}", f"{args.batch / t:.1f}",
                     f"{mem:.0f} MB" if mem is not None else "—"])
    print(f"\nStep time, median of {args.rounds} interleaved rounds (target ratio ≤ 1.03):")
    print(table(["configuration", "step", "spread", "ratio to λ=0", "img/s", "peak memory"], rows))
    where = "peak RSS above the built model, fresh process" if device.type == "cpu" else "CUDA allocator peak"
    print(f"peak memory: {where}, over two steps (includes gradients and momentum buffers)\n")

    parts = interleaved(split_fns(setup, cfgs, device), device, args.rounds)
    prior = median(parts["prior"])
    rows = [["prior solver (all configurations)", ms(prior), f"{prior / base * 100:.1f} %", "", "", ""]]
    for name in CONFIGS:
        if f"{name} fwd" not in parts:
            continue
        fwd = median(parts[f"{name} fwd"])
        bwd = max(0.0, median(parts[f"{name} fwd+bwd"]) - fwd)
        predicted = (base + fwd + bwd) / base
        measured = median(times[name]) / base
        rows.append([f"neighbourhood {name}", ms(fwd), f"{fwd / base * 100:.1f} %", ms(bwd),
                     f"{bwd / base * 100:.1f} %", f"{predicted:.3f} / {measured:.3f}"])
    print(f"Split, median of {args.rounds} (shares are of the λ=0 step, {ms(base)}, which includes the prior):")
    print(table(["part", "forward", "fwd share", "backward", "bwd share", "ratio predicted / measured"], rows))
    print()


if __name__ == "__main__":
    main()
