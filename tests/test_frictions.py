"""What a user with their own VOC-layout data meets: evaluate's reference numbers and test split, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY
from weakseg.cli import main
from weakseg.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> tuple[Path, Path]:
    """A VOC-layout set read as data.dataset=voc (no test masks, as real VOC), and a 4-iteration run on it."""
    tmp = tmp_path_factory.mktemp("own")
    root = tmp / "data"
    make_synthetic(root, n_train=6, n_val=3, n_test=2, size=48, seed=1)
    sets = TINY + [f"data.root={root}", "data.dataset=voc", "optim.iterations=4", "train.eval_every=2"]
    assert main(["train", "demo", *[a for s in sets for a in ("--set", s)], "--out", str(tmp / "run")]) == 0
    return root, tmp / "run"


def test_no_paper_reference_on_a_set_that_is_not_voc_val(own_data, capsys):
    root, run = own_data
    assert main(["evaluate", str(run / "checkpoints" / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference" not in out.lower() and "Δ" not in out
    assert (run / "eval" / "iter-000002" / "classes.md").is_file()  # every evaluation's table is kept
    assert (run / "eval" / "iter-000004" / "classes.md").is_file()


def test_evaluate_test_split_without_masks_points_at_export_voc(own_data, capsys):
    root, run = own_data
    code = main(["evaluate", str(run / "checkpoints" / "last.pt"), "--split", "test", "--workers", "0",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "export-voc" in err and "SBD" not in err


def test_resume_says_from_which_iteration(own_data, capsys):
    root, run = own_data
    sets = TINY + [f"data.root={root}", "data.dataset=voc", "optim.iterations=6", "train.eval_every=2"]
    assert main(["train", "demo", *[a for s in sets for a in ("--set", s)], "--out", str(run), "--resume"]) == 0
    assert "resuming from iteration 4 of 6" in capsys.readouterr().out
