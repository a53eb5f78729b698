"""Shared fixtures: one small synthetic VOC-layout data set per test session."""

from pathlib import Path

import pytest
import torch

from weakseg.data.synthetic import make_synthetic

# Tests share two cores with each other's subprocesses: keep torch from oversubscribing.
torch.set_num_threads(1)

# The tiny training of the tests, one spelling: TINY as `--set` items, tiny_fixed() as a search space's `fixed:`.
TINY_VALUES: dict[str, object] = {
    "model.backbone": "tiny",
    "model.pretrained": "none",
    "model.decoder_channels": 16,
    "model.skip_channels": 4,
    "data.workers": 0,
    "data.crop_size": 64,
    "optim.batch_size": 4,
    "train.device": "cpu",
    "train.overlays": 2,
    "train.progress": "off",
}
TINY = [f"{k}={v}" for k, v in TINY_VALUES.items()]


def tiny_fixed(synth_root: Path, changes: dict[str, object] | None = None) -> dict[str, object]:
    """TINY_VALUES on the synthetic set (3 val images) as a search space's `fixed:` mapping, with `changes`."""
    return {**TINY_VALUES, "data.dataset": "synthetic", "data.root": str(synth_root), "data.val_limit": 3,
            **(changes or {})}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `gpu` skip, saying why, where there is no CUDA device."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (marker gpu)")


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
