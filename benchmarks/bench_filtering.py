"""Time the Gaussian-filter backends, and pydensecrf's mean-field step for scale.

    python benchmarks/bench_filtering.py [--device cuda] [--repeats 3] [--dense-max 20000]

Two tables:

1. The bilateral filter of 21 class maps plus the normaliser (22 channels,
   what the neighbourhood loss filters) at VOC's 500×375 and at square grids
   from 28×28 to 512×512: `dense` and `permutohedral` (lattice built inside
   every call, as in training), forward and forward+backward, and the
   filtering alone with a prebuilt lattice (`lattice step`, what a mean-field
   iteration costs), with peak memory; and pydensecrf's `DenseCRF2D` with
   `addPairwiseGaussian(sxy=3, compat=3)`, `addPairwiseBilateral(sxy=80,
   srgb=13, compat=10)` and 21 labels: setup + `inference(1)`, and
   `inference(1)` alone (its lattices are built in setup). pydensecrf's step
   filters both kernels; ours time the bilateral one (the spatial kernel has
   an exact separable path, `filtering.spatial_filter`).
2. A sweep of square grids for the pixel count at which permutohedral beats
   dense: the value for `filtering.AUTO_DENSE_MAX_PIXELS`.

Every table cell runs in a fresh subprocess so that its peak resident memory
(ru_maxrss above the process's baseline) is its own; GPU runs report
torch.cuda.max_memory_allocated instead. Times are the best of `--repeats`.
The machine is shared, so treat differences under ~20 % as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = 21
THETA_ALPHA, THETA_BETA = 13.0, 80.0  # densecrf's defaults, in input pixels


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour blobs with sensor-like noise, a stand-in for a photo."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 32), max(2, w // 32), generator=g) * 255
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[0]
    img = (img + 5 * torch.randn(img.shape, generator=g)).clamp(0, 255)
    return img.permute(1, 2, 0).round().to(torch.uint8).numpy()


def bilateral_features(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, h*w, 5) [row/θβ, col/θβ, rgb/θα] of an (h, w, 3) image."""
    h, w, _ = image.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = torch.stack([rows, cols], -1).reshape(-1, 2) / THETA_BETA
    rgb = torch.from_numpy(image).reshape(-1, 3).float() / THETA_ALPHA
    return torch.cat([pos, rgb], 1)[None].to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def torch_case(backend: str, h: int, w: int, device: torch.device, repeats: int,
               backward: bool) -> float:
    """Seconds for one bilateral filtering of 22 channels (+ its backward)."""
    from weakseg.losses.filtering import gaussian_filter
    from weakseg.losses.permutohedral import PermutohedralLattice

    features = bilateral_features(synthetic_image(h, w), device)
    values = torch.rand(1, h * w, CLASSES + 1, device=device, requires_grad=backward)
    if backend == "lattice-step":  # a mean-field step: the lattice is built beforehand
        lattice = PermutohedralLattice(features)
        return best_time(lambda: lattice.filter(values), device, repeats)

    def step() -> None:
        out = gaussian_filter(features, values, backend=backend)
        if backward:
            out.backward(torch.ones_like(out))

    return best_time(step, device, repeats)


def pydensecrf_case(h: int, w: int, repeats: int, setup: bool) -> float:
    """Seconds for pydensecrf's setup + inference(1), or inference(1) alone."""
    import pydensecrf.densecrf as dcrf

    image = np.ascontiguousarray(synthetic_image(h, w))
    probs = np.random.default_rng(0).dirichlet(np.ones(CLASSES), size=h * w).T
    unary = np.ascontiguousarray(-np.log(probs).astype(np.float32))  # (21, h*w)

    def build():
        crf = dcrf.DenseCRF2D(w, h, CLASSES)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=THETA_BETA, srgb=THETA_ALPHA, rgbim=image, compat=10)
        return crf

    if setup:
        return best_time(lambda: build().inference(1), torch.device("cpu"), repeats)
    crf = build()
    return best_time(lambda: crf.inference(1), torch.device("cpu"), repeats)


def run_case(args: argparse.Namespace) -> None:
    """Subprocess entry: time one case, print {"seconds", "peak_mb"} as JSON."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method, h, w = args.case[0], int(args.case[1]), int(args.case[2])
    if method in ("pydensecrf", "pydensecrf-step"):
        seconds = pydensecrf_case(h, w, args.repeats, setup=method == "pydensecrf")
    else:
        backend, _, mode = method.partition(":")
        seconds = torch_case(backend, h, w, device, args.repeats, backward=mode == "fb")
    if device.type == "cuda" and method.startswith(("dense", "permutohedral")):
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def spawn(method: str, h: int, w: int, args: argparse.Namespace) -> dict | None:
    """Run one case in a fresh interpreter; None if it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", method, str(h), str(w),
           "--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        print(f"  {method} {h}x{w} failed: {result.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def fmt(cell: dict | None) -> str:
    if cell is None:
        return f"{'—':>19s}"
    return f"{cell['seconds'] * 1000:9.1f} ms {cell['peak_mb']:5.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the torch backends")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dense-max", type=int, default=20000,
                        help="skip the O(N²) dense backend above this many pixels")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} with "
          f"{args.threads} threads; device {args.device}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
    print("pydensecrf runs single-threaded on the CPU and filters both CRF kernels.\n")

    sizes = [(375, 500), (28, 28), (56, 56), (112, 112), (224, 224), (512, 512)]
    methods = ["dense:f", "dense:fb", "permutohedral:f", "permutohedral:fb", "lattice-step:f",
               "pydensecrf", "pydensecrf-step"]
    header = ["dense fwd", "dense fwd+bwd", "lattice fwd", "lattice fwd+bwd", "lattice step",
              "pydensecrf setup+step", "pydensecrf step"]
    print(f"{'h×w':>9s} {'pixels':>7s} " + " ".join(f"{h:>19s}" for h in header))
    for h, w in sizes:
        cells = []
        for method in methods:
            if method.startswith("dense") and h * w > args.dense_max:
                cells.append(None)
            else:
                cells.append(spawn(method, h, w, args))
        print(f"{f'{h}×{w}':>9s} {h * w:7d} " + " ".join(fmt(c) for c in cells), flush=True)

    print("\nCrossover sweep (B = 1, 22 channels, best of "
          f"{args.repeats}): permutohedral / dense time")
    crossover = {"f": None, "fb": None}
    for side in (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128):
        ratios = {}
        for mode in ("f", "fb"):
            lat, den = spawn(f"permutohedral:{mode}", side, side, args), \
                spawn(f"dense:{mode}", side, side, args)
            if lat is None or den is None:
                continue
            ratios[mode] = lat["seconds"] / den["seconds"]
            if ratios[mode] < 1 and crossover[mode] is None:
                crossover[mode] = side * side
            elif ratios[mode] >= 1:
                crossover[mode] = None  # not yet beaten for good
        print(f"  {side:4d}² = {side * side:6d} px: fwd {ratios.get('f', float('nan')):5.2f}, "
              f"fwd+bwd {ratios.get('fb', float('nan')):5.2f}", flush=True)
    for mode, name in (("f", "forward"), ("fb", "forward+backward")):
        where = f"{crossover[mode]} pixels" if crossover[mode] else "not reached"
        print(f"permutohedral is faster than dense from {where} ({name})")


if __name__ == "__main__":
    main()
