"""make-synthetic's difficulty knobs, measured on the generated masks and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from weakseg.data.synthetic import DEFAULT_CLASSES, PRESETS, Difficulty, make_synthetic, render_image
from weakseg.errors import UserError

N = 40  # renders per measurement (128 px): enough for stable means, ~5 s


def renders(d: Difficulty, n: int = N, seed: int = 11):
    return [render_image(np.random.default_rng([seed, i]), 128, DEFAULT_CLASSES, d) for i in range(n)]


def present(mask: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(mask) if c not in (0, 255)]


def test_small_preset_has_two_classes_of_five_to_eight_percent_each():
    out = renders(PRESETS["small"])
    per_image = [len(present(m)) for _, m, _ in out]
    fractions = [float((m == c).mean()) for _, m, _ in out for c in present(m)]
    assert np.mean([k == 2 for k in per_image]) >= 0.95  # an object can be occluded away, rarely
    assert 0.05 <= np.mean(fractions) <= 0.08
    # today's set, for contrast: objects about twice as large, 1-3 objects, classes may repeat
    base = renders(Difficulty())
    base_fr = [float((m == c).mean()) for _, m, _ in base for c in present(m)]
    assert np.mean(base_fr) > 1.7 * np.mean(fractions)


@pytest.mark.parametrize("area", [(0.03, 0.05), (0.2, 0.3)])
def test_object_area_is_an_upper_bound_and_mostly_met(area):
    d = Difficulty(object_area=area, objects=(1, 1))
    fr = np.array([float((m == present(m)[0]).mean()) for _, m, _ in renders(d, 30)])
    assert fr.max() <= area[1] + 1e-9  # visible area never exceeds the target (void band, truncation only shrink)
    assert np.median(fr) >= 0.6 * area[0]  # at most 40 % truncated, minus the void band


def test_objects_and_distinct_classes_per_image():
    out = renders(Difficulty(objects=(3, 3), distinct=True, object_area=(0.05, 0.08)), 30)
    counts = [len(o) for _, _, o in out]  # objects kept (an occluded-away one is dropped)
    assert np.mean([c == 3 for c in counts]) >= 0.9
    for _, m, objs in out:
        assert len({o.name for o in objs}) == len(objs)  # distinct
        assert len(present(m)) == len(objs)


def background_roughness(out) -> float:
    """Mean |horizontal gradient| over background pixels: clutter shapes add edges."""
    vals = []
    for img, m, _ in out:
        g = np.abs(np.diff(img.astype(np.float32).mean(2), axis=1))
        bg = (m[:, 1:] == 0) & (m[:, :-1] == 0)
        vals.append(g[bg].mean())
    return float(np.mean(vals))


def test_clutter_adds_background_edges():
    none, base, heavy = (background_roughness(renders(Difficulty(clutter=k), 20)) for k in (0.0, 1.0, 3.0))
    assert none < base < heavy
    assert heavy > 1.3 * none


def class_colours(out) -> dict[int, np.ndarray]:
    sums: dict[int, list] = {}
    for img, m, _ in out:
        for c in present(m):
            sums.setdefault(c, []).append(img[m == c].astype(np.float64).mean(0))
    return {c: np.mean(v, 0) for c, v in sums.items()}


def test_texture_similarity_brings_class_colours_together():
    def spread(s: float) -> float:
        col = class_colours(renders(Difficulty(texture_similarity=s), 60))
        means = np.stack(list(col.values()))
        return float(np.linalg.norm(means - means.mean(0), axis=1).mean())

    assert spread(1.0) < 0.6 * spread(0.0)


def test_default_difficulty_draws_the_original_stream(tmp_path: Path):
    # the knobs at their defaults must not consume random numbers: same bytes as without them
    a = make_synthetic(tmp_path / "a", n_train=3, n_val=1, n_test=1, size=48, seed=2)
    b = make_synthetic(tmp_path / "b", n_train=3, n_val=1, n_test=1, size=48, seed=2, difficulty=Difficulty(
        object_area=(0.12, 0.35), objects=(0, 0), clutter=1.0))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = make_synthetic(tmp_path / "c", n_train=3, n_val=1, n_test=1, size=48, seed=2, difficulty=PRESETS["small"])
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    assert json.loads((tmp_path / "c" / "synthetic.json").read_text())["difficulty"]["objects"] == [2, 2]


@pytest.mark.parametrize("d", [Difficulty(object_area=(0.3, 0.1)), Difficulty(objects=(3, 2)),
                               Difficulty(clutter=-1.0), Difficulty(texture_similarity=1.5),
                               Difficulty(objects=(7, 7), distinct=True)])
def test_bad_knobs_are_user_errors(tmp_path: Path, d: Difficulty):
    with pytest.raises(UserError, match="make_synthetic"):
        make_synthetic(tmp_path / "x", n_train=1, n_val=1, n_test=1, size=48, difficulty=d)


# ------------------------------------------------------------------ through the config and the CLI


def test_config_keys_make_the_preset_with_overrides(tmp_path: Path):
    from weakseg.config import load_config
    from weakseg.data.build import ensure_synthetic, synthetic_difficulty

    cfg = load_config("demo", [f"data.root={tmp_path / 'syn'}", "data.synthetic_preset=small",
                               "data.synthetic_clutter=2", "data.synthetic_train=2", "data.synthetic_val=1",
                               "data.synthetic_test=1", "data.synthetic_size=48"])
    d = synthetic_difficulty(cfg.data)
    assert d == Difficulty(object_area=(0.08, 0.12), objects=(2, 2), distinct=True, clutter=2.0)
    root = ensure_synthetic(cfg.data)
    assert json.loads((root / "synthetic.json").read_text())["difficulty"] == d.to_dict()
    # the same root with other knobs is refused rather than silently reused
    other = load_config("demo", [f"data.root={root}", "data.synthetic_preset=clutter"])
    with pytest.raises(UserError, match="another difficulty"):
        ensure_synthetic(other.data)


def test_demo_config_on_a_users_voc_tree_points_at_dataset_voc(tmp_path: Path, capsys):
    from weakseg.cli import main

    voc = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages"
    voc.mkdir(parents=True)
    (voc / "2008_000001.jpg").write_bytes(b"x")
    for root in (tmp_path, tmp_path / "VOCdevkit"):
        code = main(["train", "demo", "--set", f"data.root={root}", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and "data.dataset=voc" in err and "--force" not in err
    assert (voc / "2008_000001.jpg").read_bytes() == b"x"  # untouched
    # make-synthetic itself never offers to overwrite it either
    code = main(["make-synthetic", str(tmp_path / "VOCdevkit"), "--force"])
    assert code == 2 and "not written by make_synthetic" in capsys.readouterr().err
    assert (voc / "2008_000001.jpg").read_bytes() == b"x"


def test_make_synthetic_cli_preset_and_knobs(tmp_path: Path, capsys):
    from weakseg.cli import main

    out = tmp_path / "s"
    assert main(["make-synthetic", str(out), "--train", "2", "--val", "1", "--test", "1", "--size", "48",
                 "--preset", "small", "--set", "data.synthetic_texture_similarity=0.5"]) == 0
    assert "data.synthetic_preset=small" in capsys.readouterr().out
    rec = json.loads((out / "synthetic.json").read_text())["difficulty"]
    assert rec["objects"] == [2, 2] and rec["texture_similarity"] == 0.5
    assert main(["make-synthetic", str(tmp_path / "t"), "--set", "loss.lam=1"]) == 2
