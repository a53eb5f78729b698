"""Cost of the adaptive-prior solver per batch, relative to the train step (target ≤ 1 %).

    python benchmarks/bench_prior.py [--quick] [--device cuda] [--batch 20] [--grid 56] [--rounds 3]

`weakseg.losses.pixel_label_targets` (the max-entropy prior of eq. 7 and the
targets q of eq. 5) on a batch of 20 probability maps at 56×56 (a 224×224
input at stride 4) with 21 classes: the paper's batch. Labels follow VOC's
mix of images by number of object classes (1–4, `common.VOC_CLASS_COUNTS`),
five different batches, and then batches where every image has k objects,
which isolates the solver's paths (with the default c_bg = 0.4, c_fg = 0.2:
k = 1 is the exact two-class case, k = 3 the single point Σc = 1, k = 2 and
k = 4 the multi-start solver, feasible and infeasible). Probabilities are
the softmax of smooth random logits: σ = 1 is an untrained network (almost
uniform), σ = 5 a trained one (confident).

The reference is one full `engine.train_step` of the VGG16 model at the same
batch and 224×224 (λ = 0.3, exp, backend auto; it includes the prior of its
own batch). On the CPU the prior runs its many small kernels on one core's
worth of work: with more torch threads than free cores (a shared machine, or
DataLoader workers on the same cores) each kernel waits for a descheduled
thread and the solver slows down by one or two orders of magnitude; run this
on an idle machine or pass `--threads 1` to see the difference.
"""

from __future__ import annotations

from common import (base_parser, interleaved, measure, median, ms, network_like_probs, print_machine, setup_device,
                    table, voc_like_labels)
from bench_train_step import LAM, build, make_config, step_fn
from weakseg.losses.prior import pixel_label_targets


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--batch", type=int, default=20, help="images per batch (the paper's 20)")
    parser.add_argument("--grid", type=int, default=56, help="output grid side (224 / stride 4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the step and every VOC-mix batch (default 3, --quick 1)")
    args = parser.parse_args()
    device = setup_device(args)
    rounds = args.rounds or (1 if args.quick else 3)
    seeds = range(2 if args.quick else 5)
    print_machine(device)
    B, C, g = args.batch, 21, args.grid

    def prior_fn(probs, labels):
        probs, labels = probs.to(device), labels.to(device)
        return lambda: pixel_label_targets(probs, labels)

    # the step and the VOC-mix batches run round-robin, so that load drift cancels in the shares
    cfg = make_config(B, g * 4, device, "auto", "auto", False, [f"loss.lam={LAM}", "loss.variant=exp"])
    cases = {"step": step_fn(build(cfg, device), cfg, device)}
    mixes = {1.0: "untrained", 5.0: "trained"}
    for sigma in mixes:
        for seed in seeds:
            cases[sigma, seed] = prior_fn(network_like_probs(B, C, g, g, sigma, seed=seed),
                                          voc_like_labels(B, C, seed=seed))
    times = interleaved(cases, device, rounds)
    step = median(times.pop("step"))
    rows: list[tuple[str, str, float, float]] = []  # (what, batches, median s, max s)
    for sigma, what in mixes.items():
        per_batch = [median(times[sigma, seed]) for seed in seeds]
        rows.append((f"VOC mix, {what} (σ={sigma:g})", f"{len(per_batch)} batches", median(per_batch),
                     max(per_batch)))
    if not args.quick:
        probs = network_like_probs(B, C, g, g, 5.0)
        for k in (1, 2, 3, 4):
            t = median(measure(prior_fn(probs, voc_like_labels(B, C, seed=0, counts={k: 1.0})), device, 2))
            rows.append((f"every image {k} object class{'es' if k > 1 else ''}, trained (σ=5)", "1 batch", t, t))

    print(f"Prior solver, batch {B} at {g}×{g}, {C} classes; reference: VGG16 train step, batch {B} at "
          f"{g * 4}×{g * 4}, λ = {LAM}: {ms(step)}. Step and VOC-mix batches: medians of {rounds} interleaved "
          "rounds; every-image-k rows: median of 2 calls, after the rounds.")
    print(table(["labels, probabilities", "batches", "prior (median)", "prior (max)", "share of step"],
                [[what, n, ms(med), ms(mx), f"{med / step * 100:.1f} %"] for what, n, med, mx in rows]))
    print("target: ≤ 1 % of the step")


if __name__ == "__main__":
    main()
