"""Scaling of the two filtering backends with the grid: time and peak memory from 28×28 to 512×512.

    python benchmarks/bench_scaling.py [--quick] [--device cuda] [--repeats 3] [--budget 5]

The bilateral filter of 22 channels (21 class maps + normaliser) on square
grids, batch 1, forward and forward+backward, for `dense` (exact, O(N²) work,
O(N·chunk) memory) and `permutohedral` (lattice built inside each call, O(N)).
A 224×224 input gives a 56×56 grid; 512×512 is a 2048-pixel input, beyond
anything the paper trains on.

Dense is capped by a time budget: a size is skipped when the previous size's
time scaled by (N/N_prev)² exceeds `--budget` seconds per call, and the table
says so (with the extrapolated time). Each cell runs in a fresh subprocess
(the case runner of bench_filtering.py), so the peak memory is its own: peak
RSS above the process baseline on the CPU, the CUDA allocator's peak on a GPU.
Times are medians of `--repeats` calls after a warm-up.
"""

from __future__ import annotations

from pathlib import Path

from common import base_parser, isolated, ms, print_machine, setup_device, table

SIDES = (28, 56, 112, 224, 512)
QUICK_SIDES = (28, 56, 112)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 3, --quick 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="skip a dense cell whose extrapolated time per call exceeds this (s; default 5, --quick 1)")
    args = parser.parse_args()
    device = setup_device(args)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.budget is None:
        args.budget = 1.0 if args.quick else 5.0
    print_machine(device)
    runner = Path(__file__).resolve().parent / "bench_filtering.py"
    sides = QUICK_SIDES if args.quick else SIDES

    methods = ("dense:f", "dense:fb", "permutohedral:f", "permutohedral:fb")
    last: dict[str, tuple[int, float]] = {}  # dense method -> (pixels, seconds) of its last measured size
    grid: dict[tuple[str, int], str] = {}
    notes = []
    for side in sides:
        n = side * side
        for method in methods:
            if method in last:
                prev_n, prev_t = last[method]
                predicted = prev_t * (n / prev_n) ** 2
                if predicted > args.budget:
                    grid[method, side] = f"skipped (~{ms(predicted)})"
                    notes.append(f"{method} at {side}²: extrapolated {ms(predicted)} per call > budget "
                                 f"{args.budget:g} s")
                    last[method] = (n, predicted)
                    continue
            timeout = max(60.0, 4 * args.budget * (args.repeats + 1)) if method.startswith("dense") else None
            out = isolated(runner, ["--case", method, str(side), str(side), "--device", args.device,
                                    "--repeats", str(args.repeats), "--threads", str(args.threads)], timeout=timeout)
            if out is None:
                grid[method, side] = "failed"
                continue
            grid[method, side] = f"{ms(out['seconds'])}, {out['peak_mb']:.0f} MB"
            if method.startswith("dense"):
                last[method] = (n, out["seconds"])
        print(f"  {side}² done", flush=True)

    headers = ["grid", "pixels", "dense fwd", "dense fwd+bwd", "lattice fwd", "lattice fwd+bwd"]
    rows = [[f"{s}²", s * s, *(grid[m, s] for m in methods)] for s in sides]
    mem = "peak RSS above baseline" if device.type == "cpu" else "CUDA allocator peak"
    print(f"\nBilateral filtering of 22 channels, B = 1 (median of {args.repeats}; time, {mem}):")
    print(table(headers, rows))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
