"""Shared helpers of the benchmark scripts: machine description, timing, memory, inputs, tables.

Timing rules used everywhere: a warm-up call first (allocator, caches,
lazy CUDA and cuDNN initialisation), CUDA synchronised before every clock read,
and the *median* of several calls reported. Cases that are compared with each
other run interleaved (round-robin), so that load from other processes on a
shared machine hits every case alike and cancels in the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

# Share of VOC 2012 images holding 1, 2, 3, 4 distinct object classes: an estimate (most
# images hold one class, the mean is about 1.5), not counted from the devkit, which these
# benchmarks do not need; images with 5+ classes are folded into 4.
VOC_CLASS_COUNTS = {1: 0.63, 2: 0.27, 3: 0.08, 4: 0.02}

K = TypeVar("K", bound=Hashable)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (lscpu's "Model name"), from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    """Physical memory in GiB (0 where /proc/meminfo is missing)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def code_version() -> str:
    """weakseg's git commit and a hash of its source as it is on disk (uncommitted edits included)."""
    import hashlib

    import weakseg

    package = Path(weakseg.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"weakseg {weakseg.__version__}" + (f" at {sha}" if sha else "") + f", source sha1 {digest.hexdigest()[:10]}"


def machine_lines(device: torch.device) -> list[str]:
    """What a reader needs to compare figures between machines."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, {memory_gib():.0f} GiB RAM; load average {load}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"torch threads {torch.get_num_threads()}",
        code_version(),
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append("GPU: none used (device cpu)")
    return lines


def print_machine(device: torch.device) -> None:
    for line in machine_lines(device):
        print(line)
    print(flush=True)


# ---------------------------------------------------------------------------- parsing


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """--quick, --device and --threads, common to every script."""
    text = (doc or "").strip()
    parser = argparse.ArgumentParser(description=text.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=text)
    parser.add_argument("--quick", action="store_true", help="a much shorter run (smoke test of the script)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's choice)")
    return parser


def setup_device(args: argparse.Namespace) -> torch.device:
    """The device named on the command line, with a clear message if it is not there."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    return device  # cudnn.benchmark stays as engine.fit leaves it: these figures are training's own


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def interleaved(cases: dict[K, Callable[[], object]], device: torch.device, rounds: int,
                warmup: int = 1) -> dict[K, list[float]]:
    """Seconds per call of each case, measured round-robin so that load drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[K, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(time_call(fn, device))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """(max − min) / median: how noisy a set of timings was."""
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB; None where there is none."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM; ru_maxrss, in KiB on Linux, elsewhere)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the baseline (MB) to pass to `peak_since`.

    CUDA: the allocator's peak is reset. CPU: Linux resets the resident-set
    high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs; where
    that is not possible the window starts at the process's start, so run
    each case in a fresh process (`isolated`) to keep its peak its own.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_mb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return peak_rss_mb()


def peak_since(device: torch.device, baseline_mb: float) -> float:
    """MB above `baseline_mb` at the peak since `reset_peak`: CUDA allocator peak, or peak RSS."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - baseline_mb
    return peak_rss_mb() - baseline_mb


def isolated(script: Path, args: Sequence[str], timeout: float | None = None) -> dict | None:
    """Run `python script *args` and parse the JSON object on its last stdout line; None if it failed."""
    cmd = [sys.executable, str(script), *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        print(f"  {' '.join(args)}: over {timeout:.0f} s, stopped", file=sys.stderr)
        return None
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
        print(f"  {' '.join(args)} failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- inputs


def voc_like_images(n: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) uint8 images of the synthetic VOC-layout generator, resized (antialiased).

    Their colour statistics (flat regions, textures, edges) decide how many
    lattice vertices the permutohedral backend touches, so random noise would
    misstate its cost.
    """
    from weakseg.data.synthetic import DEFAULT_CLASSES, render_image
    from weakseg.data.transforms import resize_image

    h, w = (size, size) if isinstance(size, int) else size
    out = torch.empty(n, 3, h, w, dtype=torch.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image, _, _ = render_image(rng, max(h, w, 64), DEFAULT_CLASSES)  # (H, W, 3) uint8
        out[i] = resize_image(torch.from_numpy(image).permute(2, 0, 1).contiguous(), (h, w))
    return out


def voc_like_labels(n: int, num_classes: int = 21, seed: int = 0,
                    counts: dict[int, float] | None = None) -> torch.Tensor:
    """(n, C) float32 multi-hot: background plus k distinct object classes, k drawn from `counts`.

    Default `counts` is VOC's share of images by number of object classes
    (`VOC_CLASS_COUNTS`); pass {k: 1.0} for a batch where every image has k.
    """
    counts = counts or VOC_CLASS_COUNTS
    rng = np.random.default_rng(seed)
    ks = rng.choice(list(counts), size=n, p=np.array(list(counts.values())) / sum(counts.values()))
    labels = torch.zeros(n, num_classes)
    labels[:, 0] = 1.0
    for i, k in enumerate(ks):
        labels[i, 1 + rng.choice(num_classes - 1, size=int(k), replace=False)] = 1.0
    return labels


def network_like_probs(n: int, num_classes: int, h: int, w: int, sharpness: float,
                       seed: int = 0) -> torch.Tensor:
    """(n, C, h, w) softmax of spatially smooth random logits: blobs of classes, as a network gives.

    `sharpness` is the logits' standard deviation: ~1 is an untrained network
    (nearly uniform), ~5 a trained one (most pixels confident).
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, num_classes, max(2, h // 8), max(2, w // 8), generator=g)  # (n, C, h/8, w/8)
    logits = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    logits = logits / logits.std() * sharpness
    return logits.softmax(dim=1)  # (n, C, h, w)


# ----------------------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into results/benchmarks.md, reads fine in a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(wd) for c, wd in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (wd + 1) + ":" for wd in widths) + "|",
                      *(line(r) for r in cells[1:])])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
