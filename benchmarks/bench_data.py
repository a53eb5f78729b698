"""Training input pipeline throughput against what the train step consumes.

    python benchmarks/bench_data.py [--quick] [--device cuda] [--images 100] [--batch 8] [--data DIR]

Data: a VOC-layout synthetic set at VOC-like sizes (longer side 500 px, JPEG),
generated once into `--data` (kept) or a temporary folder (deleted). The
pipeline is the one `engine.fit` builds for weak supervision:
`build.train_dataset` (JPEG decode, labels from the XML already parsed,
`train_transform`: antialiased resize to 224×224 and flip) and
`build.train_loader` (the resumable iteration sampler, per-sample seeded
augmentation), with 0, 1 and 2 DataLoader workers; pinned memory follows
`engine.fit` (on for CUDA) unless `--pin-memory` says otherwise.

Three tables: (1) images/s the loader delivers alone, after its first batch
(worker start-up is reported apart); (2) images/s the train step consumes
on the same batches held in memory, for the tiny and the VGG16 model at
224×224 (λ = 0.3, backend auto), with the share of the step spent in the
prior solver (its cost depends on the labels, hence the same batches); (3)
the two together, `fit`'s loop (next batch, then the step) with the tiny
model, where loader workers and the step share the machine's cores. The train loader needs no persistent workers: `fit` makes
one iterator for the whole run (the eval loader's workers are persistent).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import base_parser, median, print_machine, setup_device, table, time_call
from bench_train_step import LAM, build, step_fn
from weakseg import engine
from weakseg.config import Config, load_config
from weakseg.data import build as data_build
from weakseg.losses.prior import pixel_label_targets

WORKERS = (0, 1, 2)


def data_config(root: Path, batch: int, workers: int, device: torch.device, backbone: str) -> Config:
    """The training config of this benchmark: synthetic data at `root`, 224×224, λ = 0.3."""
    model = (["model.backbone=tiny", "model.decoder_channels=64", "model.skip_channels=16"]
             if backbone == "tiny" else [])
    return load_config("paper", [
        "data.dataset=synthetic", f"data.root={root}", "data.train_split=train", f"data.workers={workers}", "data.crop_size=224",
        f"optim.batch_size={batch}", "model.pretrained=none", f"train.device={device}", f"loss.lam={LAM}",
        *model,
    ])


def make_loader(cfg: Config, batches: int, pin: bool) -> DataLoader:
    ds = data_build.train_dataset(cfg)
    return data_build.train_loader(ds, cfg, 0, batches, data_build.LoaderOptions(cfg.data.workers, pin))


def loader_rate(cfg: Config, batches: int, pin: bool) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the remaining `batches` − 1)."""
    start = time.perf_counter()
    it = iter(make_loader(cfg, batches, pin))
    next(it)
    first = time.perf_counter() - start
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch["image"].shape[0]
    return first, n / (time.perf_counter() - start)


def fit_loop_rate(cfg: Config, device: torch.device, batches: int, pin: bool) -> float:
    """images/s of `fit`'s inner loop (next batch, train_step) after its first two steps."""
    setup = build(cfg, device)
    it = iter(make_loader(cfg, batches, pin))
    for _ in range(2):  # worker start-up, first-step allocations
        engine.train_step(setup.model, next(it), setup.state, cfg, device, setup.amp, setup.channels_last)
    start, n = time.perf_counter(), 0
    for batch in it:
        engine.train_step(setup.model, batch, setup.state, cfg, device, setup.amp, setup.channels_last)
        n += batch["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--images", type=int, default=None, help="training images to generate (default 100)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--data", type=Path, default=None, help="keep the generated set here (reused if present)")
    parser.add_argument("--pin-memory", choices=("auto", "on", "off"), default="auto",
                        help="DataLoader pin_memory (auto: on for CUDA, as engine.fit)")
    args = parser.parse_args()
    device = setup_device(args)
    images = args.images or (24 if args.quick else 100)
    pin = args.pin_memory == "on" or (args.pin_memory == "auto" and device.type == "cuda")
    print_machine(device)

    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="weakseg-bench-data-"))
        root = tmp / "synthetic"
    else:
        root = args.data.expanduser().resolve()
    try:
        if not (root / "VOCdevkit" / "VOC2012").is_dir():
            from weakseg.data.synthetic import make_synthetic

            start = time.perf_counter()
            make_synthetic(root, n_train=images, n_val=1, n_test=1, size=500, seed=0)
            print(f"generated {images} training images (longer side 500 px) in {time.perf_counter() - start:.1f} s")
        run(args, device, root, pin)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, root: Path, pin: bool) -> None:
    n_train = len(data_build.train_dataset(data_config(root, args.batch, 0, device, "tiny")))
    batches = max(4, n_train // args.batch)  # about one epoch
    rows = []
    for workers in WORKERS:
        cfg = data_config(root, args.batch, workers, device, "tiny")
        rates = [loader_rate(cfg, batches, pin) for _ in range(1 if args.quick else 3)]
        rows.append([workers, f"{median([r[0] for r in rates]):.2f} s", f"{median([r[1] for r in rates]):.0f}"])
    print(f"\n(1) Loader alone: {n_train} training images, batch {args.batch}, {batches} batches per pass, "
          f"pin_memory {pin} (median of {1 if args.quick else 3} passes):")
    print(table(["workers", "first batch", "images/s"], rows))

    # (2) on the very batches (3) trains on, held in memory: the prior's cost depends on the labels
    held = list(make_loader(data_config(root, args.batch, 0, device, "tiny"), batches, pin))
    rows = []
    for backbone in ("tiny", "vgg16"):
        cfg = data_config(root, args.batch, 0, device, backbone)
        setup = build(cfg, device)
        use = held if backbone == "tiny" else held[: 1 if args.quick else 3]

        def one(batch, setup=setup, cfg=cfg) -> None:
            engine.train_step(setup.model, batch, setup.state, cfg, device, setup.amp, setup.channels_last)

        one(use[0])  # warm-up
        steps = [time_call(lambda b=b: one(b), device) for b in use]
        priors = []
        for b in use:
            with torch.no_grad():
                probs = setup.model(b["image"].to(device)).float().softmax(1)  # (B, C, h, w)
            labels = b["labels"].to(device)
            priors.append(time_call(lambda: pixel_label_targets(probs, labels), device))
        rows.append([backbone, f"{median(steps) * 1000:.0f} ms", f"{len(use) * args.batch / sum(steps):.1f}",
                     f"{sum(priors) / sum(steps) * 100:.0f} %"])
        del setup
    print(f"\n(2) Train step alone on {len(held)} of those batches in memory (batch {args.batch} at 224×224, "
          f"λ = {LAM}, backend auto; VGG16 on the first {min(len(held), 1 if args.quick else 3)}):")
    print(table(["model", "step (median)", "images/s consumed", "of which prior solver"], rows))

    rows = []
    for workers in WORKERS:
        cfg = data_config(root, args.batch, workers, device, "tiny")
        rows.append([workers, f"{fit_loop_rate(cfg, device, batches + 2, pin):.1f}"])
    print(f"\n(3) fit's loop, tiny model fed by the loader (batch {args.batch}, {batches} timed steps):")
    print(table(["workers", "images/s"], rows))
    print("The loader keeps up when (1) exceeds (2); (3) shows what sharing the cores costs.")


if __name__ == "__main__":
    main()
