"""Config flow: YAML defaults -> --set overrides -> validated dataclasses; errors name file, line and key."""

from pathlib import Path

import pytest
import yaml

from weakseg.config import Config, config_from_dict, load_config, named_configs, save_config
from weakseg.errors import UserError


def test_paper_defaults_match_section_5_3_and_krahenbuhl():
    """The shipped `paper` config is the paper's protocol (§5.3) and Krähenbühl's kernel defaults."""
    cfg = load_config("paper")
    o, l = cfg.optim, cfg.loss
    assert (o.batch_size, o.momentum, o.weight_decay) == (20, 0.9, 5e-5)
    assert (o.lr_pretrained, o.lr_new, o.lr_step, o.lr_gamma, o.iterations) == (1e-3, 1e-2, 4000, 0.5, 40000)
    assert (l.w1, l.theta_alpha, l.theta_beta, l.w2, l.theta_gamma) == (10.0, 13.0, 80.0, 3.0, 3.0)
    assert (l.c_bg, l.c_fg, l.lam_warmup) == (0.4, 0.2, 0)
    assert cfg.model.backbone == "vgg16" and cfg.model.pretrained == "imagenet"
    assert cfg.data.crop_size == 224
    # the dataclass defaults are the same protocol, not only the YAML file
    d = Config()
    assert d.optim == o and (d.loss.w1, d.loss.theta_beta) == (10.0, 80.0)


def test_grad_auto_resolves_per_variant_and_is_saved_concrete(tmp_path: Path):
    """`loss.grad: auto` is exp -> detach, mean -> both; an explicit mode wins; saved configs hold the mode."""
    assert load_config("paper").loss.grad == "detach"
    assert load_config("demo").loss.grad == "detach"
    assert load_config("demo", ["loss.variant=mean"]).loss.grad == "both"
    assert load_config("demo", ["loss.variant=exp", "loss.grad=both"]).loss.grad == "both"
    assert load_config("demo", ["loss.variant=mean", "loss.grad=detach"]).loss.grad == "detach"
    assert load_config("demo", ["loss.grad=free_energy"]).loss.grad == "free_energy"
    assert Config().loss.grad == "detach"  # built without the loader too
    save_config(load_config("demo", ["loss.variant=mean"]), tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["loss"]["grad"] == "both"


def test_free_energy_needs_the_exp_variant(tmp_path: Path):
    with pytest.raises(UserError, match=r"--set: loss.grad: free_energy is the free energy of the exp variant"):
        load_config("demo", ["loss.variant=mean", "loss.grad=free_energy"])
    f = tmp_path / "fe.yaml"
    f.write_text("base: demo\nloss:\n  variant: mean\n  grad: free_energy\n")
    with pytest.raises(UserError, match=r"fe.yaml:4: loss.grad: free_energy"):
        load_config(f)


def test_named_configs_and_base_chain():
    assert {"paper", "demo"} <= set(named_configs())
    demo = load_config("demo")
    assert demo.model.backbone == "tiny"  # set by demo.yaml
    assert demo.optim.momentum == 0.9  # inherited from paper.yaml through `base`


def test_overrides_win_and_are_typed():
    cfg = load_config("demo", ["loss.lam=0.75", "supervision=full", "loss.variant=mean", "optim.iterations=7"])
    assert cfg.loss.lam == 0.75 and isinstance(cfg.loss.lam, float)
    assert cfg.supervision == "full" and cfg.loss.variant == "mean" and cfg.optim.iterations == 7
    # an int where a float is expected is fine; the reverse is not
    assert load_config("demo", ["loss.lam=1"]).loss.lam == 1.0


def test_yaml_errors_name_file_line_and_key(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("base: demo\nloss:\n  lam: 0.3\n  thetaalpha: 4\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    msg = str(e.value)
    assert f"{f}:4" in msg and "loss.thetaalpha" in msg and "loss.theta_alpha" in msg  # line, key, suggestion

    f.write_text("base: demo\noptim:\n  batch_size: 2.5\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: optim.batch_size: expected an integer"):
        load_config(f)

    f.write_text("base: demo\nloss:\n  c_bg: 1.5\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: loss.c_bg: must lie in \[0, 1\]"):
        load_config(f)

    f.write_text("base: demo\nloss:\n  variant: expo\n")
    with pytest.raises(UserError, match=r"loss.variant: expected one of 'exp', 'mean', 'none'"):
        load_config(f)

    f.write_text("base: demo\nloss: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: malformed YAML"):
        load_config(f)


def test_cli_override_errors_name_the_key():
    with pytest.raises(UserError, match=r"--set: unknown key 'loss.lamb' \(did you mean 'loss.lam'\?\)"):
        load_config("demo", ["loss.lamb=1"])
    with pytest.raises(UserError, match=r"--set: loss.lam: must be >= 0"):
        load_config("demo", ["loss.lam=-0.1"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config("demo", ["loss.lam"])
    with pytest.raises(UserError, match="no such file and no shipped config"):
        load_config("no-such-config")


def test_relative_paths_resolve_against_their_origin(tmp_path: Path, monkeypatch):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    f = sub / "mine.yaml"
    f.write_text("base: demo\ndata:\n  root: ../voc\n")
    assert load_config(f).data.root == str((tmp_path / "voc").resolve())  # relative to the file
    monkeypatch.chdir(tmp_path)
    cfg = load_config(f, ["data.root=here/voc"])
    assert cfg.data.root == str((tmp_path / "here" / "voc").resolve())  # relative to the working directory


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config("demo", ["loss.lam=0.1", "data.root=/data/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_on_off_switches_survive_yaml_booleans():
    """YAML 1.1 reads `off` as False; the on/off/auto keys still get their string value."""
    cfg = load_config("demo", ["train.amp=off", "train.channels_last=on"])
    assert (cfg.train.amp, cfg.train.channels_last) == ("off", "on")


def test_scientific_notation_without_a_dot_is_a_number():
    """YAML 1.1 reads 1e-3 as a string; --set optim.lr_new=1e-3 must still mean 0.001."""
    cfg = load_config("demo", ["optim.lr_new=1e-3", "optim.iterations=2e3"])
    assert cfg.optim.lr_new == 0.001 and cfg.optim.iterations == 2000
    with pytest.raises(UserError, match="optim.lr_new: expected a number, got 'fast'"):
        load_config("demo", ["optim.lr_new=fast"])


def test_a_dataclass_block_is_typed_strictly_with_ranges_and_file_lines():
    """coerce_dataclass (a search space's settings): nested and optional sections, declared ranges, no conversions."""
    from dataclasses import dataclass, field

    from weakseg.config import ConfigError, coerce_dataclass, within

    @dataclass(frozen=True)
    class Inner:
        rate: float = 0.5

    @dataclass(frozen=True)
    class Block:
        count: int = field(default=1, metadata=within(1, 10))
        name: str | None = None
        inner: Inner = Inner()
        extra: Inner | None = None

    def at(key: str) -> str:
        return f"f.yaml:{len(key)}"  # a line per key, so the test sees which key's line was asked for

    assert coerce_dataclass(Block, {}, "b", at) == Block()
    got = coerce_dataclass(Block, {"count": 10, "inner": {"rate": 2}, "extra": None}, "b", at)
    assert got == Block(count=10, inner=Inner(2.0)) and isinstance(got.inner.rate, float)
    assert coerce_dataclass(Block, {"extra": {}}, "b", at).extra == Inner()
    for raw, message in [
        ({"count": 11}, "f.yaml:7: b.count: expected an integer in [1, 10], got 11"),
        ({"count": 2.0}, "f.yaml:7: b.count: expected an integer in [1, 10], got 2.0"),
        ({"count": "3"}, "f.yaml:7: b.count: expected an integer in [1, 10], got '3'"),
        ({"count": True}, "f.yaml:7: b.count: expected an integer in [1, 10], got True"),
        ({"name": 5}, "f.yaml:6: b.name: expected a string, got 5"),
        ({"inner": {"rate": "1e-3"}}, "f.yaml:12: b.inner.rate: expected a number, got '1e-3'"),
        ({"inner": {"rate": float("nan")}}, "f.yaml:12: b.inner.rate: expected a finite number, got nan"),
        ({"inner": None}, "f.yaml:7: b.inner: expected a mapping with keys rate, got None"),
        ({"inner": {"rat": 1}}, "f.yaml:11: b.inner.rat: unknown key (did you mean 'rate'?); allowed: rate"),
        ({"cont": 1}, "f.yaml:6: b.cont: unknown key (did you mean 'count'?); allowed: count, name, inner, extra"),
    ]:
        with pytest.raises(ConfigError) as e:
            coerce_dataclass(Block, raw, "b", at)
        assert str(e.value) == message
    # a config's coercion is not strict: --set and YAML 1.1 hand over numbers as strings
    assert load_config("demo", ["optim.iterations=4.0", "optim.lr_new=1e-3"]).optim.iterations == 4
