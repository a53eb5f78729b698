"""Accuracy of the permutohedral backend against the exact dense one, where the loss uses it.

    python benchmarks/bench_accuracy.py [--quick] [--device cuda]

For the neighbourhood estimator with the paper's kernel (w1 = 10, θα = 13,
θβ = 80, w2 = 3, θγ = 3, stride 4) on grids from 28×28 to 94×125 (a 500×375
VOC image), both variants, the relative error of the permutohedral result
against the exact dense one in

- p̄, the neighbourhood distribution: ‖p̄_lattice − p̄_dense‖ / ‖p̄_dense‖;
- the loss, mean KL(p ‖ p̄): |KL_lattice − KL_dense| / KL_dense;
- its gradient with respect to p (grad = both).

Images: the synthetic VOC-layout generator's (flat regions, textures, edges,
what a photo gives the lattice) and uniform noise (the lattice's hard case:
every pixel's colour is far from its neighbours'). Probabilities: smooth
random class blobs, as an untrained (σ = 1) or a trained (σ = 5) network gives.
Batch 2, float32 as in training.
"""

from __future__ import annotations

import torch

from common import base_parser, network_like_probs, print_machine, setup_device, table, voc_like_images
from weakseg.losses import neighborhood_distribution, neighborhood_loss

GRIDS = ((28, 28), (56, 56), (94, 125))
QUICK_GRIDS = ((28, 28), (40, 56))


def errors(probs: torch.Tensor, image: torch.Tensor, variant: str) -> tuple[float, float, float]:
    """(p̄, loss, gradient) relative errors of the lattice against the dense backend."""
    out = {}
    for backend in ("dense", "permutohedral"):
        p = probs.clone().requires_grad_(True)
        pbar = neighborhood_distribution(probs, image, variant=variant, backend=backend)
        # gradient through p̄ too: the mode results/benchmarks.md was measured with (and the widest path)
        kl = neighborhood_loss(p, image, variant=variant, backend=backend, grad="both")
        (grad,) = torch.autograd.grad(kl, p)
        out[backend] = (pbar.double(), kl.detach().double(), grad.double())
    (pd, kd, gd), (pl, kl_, gl) = out["dense"], out["permutohedral"]
    return (float((pl - pd).norm() / pd.norm()), float((kl_ - kd).abs() / kd),
            float((gl - gd).norm() / gd.norm()))


def main() -> None:
    args = base_parser(__doc__).parse_args()
    device = setup_device(args)
    print_machine(device)
    print(flush=True)
    rows = []
    for h, w in QUICK_GRIDS if args.quick else GRIDS:
        gen = torch.Generator().manual_seed(h * w)
        images = {
            "synthetic": voc_like_images(2, (4 * h, 4 * w), seed=h).float(),
            "noise": torch.rand(2, 3, 4 * h, 4 * w, generator=gen) * 255,
        }
        for kind, image in images.items():
            for sharpness in (1.0, 5.0):
                probs = network_like_probs(2, 21, h, w, sharpness, seed=h + int(sharpness)).to(device)
                for variant in ("exp", "mean"):
                    e = errors(probs, image.to(device), variant)
                    rows.append([f"{h}×{w}", kind, f"σ={sharpness:g}", variant, *(f"{x:.2%}" for x in e)])
                    print(table(["grid", "image", "probs", "variant", "p̄", "loss", "gradient"], rows[-1:])
                          .splitlines()[-1], flush=True)
    print()
    print(table(["grid", "image", "probs", "variant", "p̄ rel. error", "loss rel. error", "gradient rel. error"],
                rows))


if __name__ == "__main__":
    main()
