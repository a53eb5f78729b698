"""The gradient-mode toy of docs/method.md: which way the neighbourhood loss pushes, per mode.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/toy_gradient.py [--seeds 4] [--steps 200] [--lam 0.3]

A 64x64 image of a disk (radius 20, colour noise σ = 10) and a soft, noisy training target
like the prior's pixel labels: q(disk) = 0.65 on the disk and 0.35 off it, plus N(0, 0.25²)
per pixel, clipped to [0.02, 0.98] (its argmax is wrong at about a quarter of the pixels).
The logits themselves are the parameters (no network): Adam (lr 0.1) minimises
mean_i CE(q_i, p_i) + λ·neighbourhood loss, for each variant and gradient mode, over several
seeds (a seed draws the noise, the target and the initial logits). Printed per mode: mIoU of
argmax against the clean disk and the share of "flat" pixels (max_l p < 0.6, undecided), mean
and range over seeds; then the neighbourhood loss alone (no CE), started from p = q, which
shows where each mode's minimum lies. Kernel: the paper's defaults (w1 = 10, θα = 13, θβ = 80,
w2 = 3, θγ = 3) on the image's own grid (stride 1), filtered on the permutohedral lattice (what
`backend: auto` picks at this size; dense is 10x slower here).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weakseg.losses.neighborhood import neighborhood_loss  # noqa: E402

SIZE, RADIUS, NOISE = 64, 20, 10.0
TARGET_BIAS, TARGET_NOISE = 0.15, 0.25  # target q(disk) = 0.5 ± 0.15 + N(0, 0.25²), clipped
MODES = [("exp", "detach"), ("exp", "free_energy"), ("exp", "both"), ("mean", "both"), ("mean", "detach")]
FLAT = 0.6  # a pixel is flat (undecided) when its largest probability is below this


def scene(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image (1, 3, S, S) 0–255, clean mask (S, S) long, noisy soft target (1, 2, S, S))."""
    g = torch.Generator().manual_seed(seed)
    r, c = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    mask = (((r - SIZE / 2 + 0.5) ** 2 + (c - SIZE / 2 + 0.5) ** 2) < RADIUS ** 2).long()
    colours = torch.tensor([[60.0, 90.0, 180.0], [200.0, 80.0, 60.0]])  # background, disk
    image = colours[mask].permute(2, 0, 1)[None] + NOISE * torch.randn(1, 3, SIZE, SIZE, generator=g)
    q = 0.5 + TARGET_BIAS * (2 * mask - 1) + TARGET_NOISE * torch.randn(SIZE, SIZE, generator=g)
    q = q.clamp(0.02, 0.98)  # like the prior's pixel labels: soft, right on average, often wrong
    return image.clamp(0, 255), mask, torch.stack([1 - q, q])[None]


def miou(pred: torch.Tensor, mask: torch.Tensor) -> float:
    ious = [((pred == k) & (mask == k)).sum() / ((pred == k) | (mask == k)).sum() for k in (0, 1)]
    return float(sum(ious) / 2)


def optimise(logits: torch.Tensor, image: torch.Tensor, target: torch.Tensor | None, variant: str | None,
             grad: str, lam: float, steps: int) -> torch.Tensor:
    """Adam on the logits themselves; returns the final probabilities (1, 2, S, S)."""
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        log_p = logits.log_softmax(1)
        loss = -(target * log_p).sum(1).mean() if target is not None else log_p.new_zeros(())
        if lam > 0:
            loss = loss + lam * neighborhood_loss(log_p.exp(), image, variant=variant, grad=grad, stride=1,
                                                  backend="permutohedral", log_probs=log_p)
        loss.backward()
        opt.step()
    return logits.detach().softmax(1)


def summary(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:5.1f} ({100 * min(values):.1f}–{100 * max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lam", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0, cpu0 = time.time(), time.process_time()
    seeds = range(args.seeds)
    scenes = {s: scene(s) for s in seeds}
    init = {s: 0.1 * torch.randn(1, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(100 + s)) for s in seeds}

    print(f"CE toward the noisy target + λ·L_neighb, λ = {args.lam}, {args.steps} Adam steps, "
          f"{args.seeds} seeds: mean (range), %")
    print()
    print("| variant | grad | mIoU vs clean disk | flat pixels |")
    print("|---|---|---:|---:|")
    rows = [("(λ = 0: CE alone; argmax of the target)", "–", None)] + [(v, g, v) for v, g in MODES]
    for label, grad, variant in rows:
        ious, flats = [], []
        for s in seeds:
            image, mask, target = scenes[s]
            lam = 0.0 if variant is None else args.lam
            p = optimise(init[s], image, target, variant, grad, lam, args.steps)
            ious.append(miou(p.argmax(1)[0], mask))
            flats.append(float((p.max(1).values < FLAT).float().mean()))
        print(f"| {label} | {grad} | {summary(ious)} | {summary(flats)} |", flush=True)

    print()
    print(f"The neighbourhood loss alone (no CE), from p = the noisy target, {args.steps} steps: "
          "mean (range), %")
    print()
    print("| variant | grad | mIoU vs clean disk | flat pixels | mean max_l p |")
    print("|---|---|---:|---:|---:|")
    for variant, grad in MODES:
        ious, flats, conf = [], [], []
        for s in seeds:
            image, mask, target = scenes[s]
            start = target.log()  # p = the noisy target
            p = optimise(start, image, None, variant, grad, 1.0, args.steps)
            ious.append(miou(p.argmax(1)[0], mask))
            flats.append(float((p.max(1).values < FLAT).float().mean()))
            conf.append(float(p.max(1).values.mean()))
        print(f"| {variant} | {grad} | {summary(ious)} | {summary(flats)} | {summary(conf)} |", flush=True)

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print()
    print(f"{time.time() - t0:.0f} s wall ({time.process_time() - cpu0:.0f} s CPU) on {cpu}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
