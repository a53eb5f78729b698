"""Shared fixtures: one small synthetic VOC-layout data set per test session."""

from pathlib import Path

import pytest
import torch

from weakseg.data.synthetic import make_synthetic

# Tests share two cores with each other's subprocesses: keep torch from oversubscribing.
torch.set_num_threads(1)

TINY = [
    "model.backbone=tiny",
    "model.pretrained=none",
    "model.decoder_channels=16",
    "model.skip_channels=4",
    "data.workers=0",
    "data.crop_size=64",
    "optim.batch_size=4",
    "train.device=cpu",
    "train.overlays=2",
    "train.progress=off",
]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 16/6/6-image synthetic data set at 64 px (VOC layout, test masks included)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic(root, n_train=16, n_val=6, n_test=6, size=64, seed=3, test_masks=True)
    return root


@pytest.fixture()
def tiny_overrides(synth_root: Path) -> list[str]:
    """`--set` items for a seconds-long training run on the synthetic set."""
    return TINY + [f"data.root={synth_root}", "data.dataset=synthetic"]
