"""Search-space files are validated before anything starts; every error names the file, line and key."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from weakseg.errors import UserError
from weakseg.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
name: t
base: demo
fixed:
  data.root: ../data
params:
  loss.variant: {choice: [exp, mean, none]}
  loss.lam: {uniform: [0.0, 1.0]}
  loss.theta_alpha: {loguniform: [3, 60]}
  optim.batch_size: {int: [4, 16], step: 4}
  loss.w2: {uniform: [0, 10], when: {loss.variant: [exp, mean]}}
settings:
  samples: 3
  scheduler: {type: asha, grace: 100, max_t: 400}
  resources: {cpu: 1, gpu: 0.5}
"""


def write(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "spaces"
    d.mkdir(exist_ok=True)
    p = d / "space.yaml"
    p.write_text(text)
    return p


def test_good_space_parses_with_resolved_paths(tmp_path: Path):
    space = load_space(write(tmp_path, GOOD))
    assert [p.key for p in space.params] == ["loss.variant", "loss.lam", "loss.theta_alpha", "optim.batch_size",
                                             "loss.w2"]
    assert space.fixed["data.root"].base_dir == tmp_path / "spaces"
    assert space.base_config.data.root == str(tmp_path / "data")
    assert space.settings.resources.gpu == 0.5 and space.settings.scheduler.max_t == 400
    assert Path(space.settings.storage_path) == (tmp_path / "results" / "ray")
    assert space.tracking_uri == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    assert space.register_as == space.name  # the Model Registry name defaults to the search's


def test_conditional_parameters_follow_when(tmp_path: Path):
    """Define-by-run: loss.w2 is sampled only when the variant is exp or mean."""
    space = load_space(write(tmp_path, GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"exp": 0, "mean": 0, "none": 0}
    for _ in range(40):
        t = study.ask()
        space.optuna_space()(t)
        v = t.params["loss.variant"]
        seen[v] += 1
        assert ("loss.w2" in t.params) == (v != "none")
        assert t.params["optim.batch_size"] in (4, 8, 12, 16)
        assert 3 <= t.params["loss.theta_alpha"] <= 60
        study.tell(t, 0.0)
    assert all(seen.values())
    cfg = space.trial_config({"loss.variant": "mean", "loss.lam": 0.25, "loss.w2": 7.0})
    assert (cfg.loss.variant, cfg.loss.lam, cfg.loss.w2) == ("mean", 0.25, 7.0)


@pytest.mark.parametrize(
    "old,new,pattern",
    [
        ("  loss.lam: {uniform: [0.0, 1.0]}", "  loss.lamda: {uniform: [0.0, 1.0]}",
         r"space.yaml:7: params.loss.lamda: not a training-config key \(did you mean 'loss.lam'\?\)"),
        ("  loss.lam: {uniform: [0.0, 1.0]}", "  loss.lam: {uniform: [1.0, 0.0]}",
         r"space.yaml:7: params.loss.lam.uniform: low \(1.0\) must be below high"),
        ("  loss.lam: {uniform: [0.0, 1.0]}", "  loss.lam: {uniform: [-1.0, 1.0]}",
         r"space.yaml:7: params.loss.lam: value -1.0 is invalid: must be >= 0"),
        ("  loss.theta_alpha: {loguniform: [3, 60]}", "  loss.theta_alpha: {loguniform: [0, 60]}",
         r"space.yaml:8: params.loss.theta_alpha.loguniform: low must be > 0"),
        ("  loss.variant: {choice: [exp, mean, none]}", "  loss.variant: {choice: [exp, gauss]}",
         r"params.loss.variant.choice: 'gauss' is not one of"),
        ("  loss.variant: {choice: [exp, mean, none]}", "  loss.variant: {uniform: [0, 1]}",
         r"params.loss.variant: uniform needs a numeric key"),
        ("  optim.batch_size: {int: [4, 16], step: 4}", "  optim.batch_size: {uniform: [4, 16]}",
         r"optim.batch_size is an integer: use \{int: \[low, high\]\}"),
        ("  loss.lam: {uniform: [0.0, 1.0]}", "  loss.lam: {uniform: [0.0, one]}",
         r"params.loss.lam.uniform: must be \[low, high\] with two numbers"),
        ("  loss.lam: {uniform: [0.0, 1.0]}", "  loss.lam: {unifrom: [0.0, 1.0]}",
         r"params.loss.lam.unifrom: unknown option \(did you mean 'uniform'\?\)"),
        ("  loss.w2: {uniform: [0, 10], when: {loss.variant: [exp, mean]}}",
         "  loss.w2: {uniform: [0, 10], when: {loss.varaint: [exp]}}",
         r"params.loss.w2.when.loss.varaint: must name a parameter listed above"),
        ("  samples: 3", "  samples: 0", r"space.yaml:12: settings.samples: expected an integer >= 1, got 0"),
        ("  samples: 3", "  sample: 3",
         r"space.yaml:12: settings.sample: unknown key \(did you mean 'samples'\?\); allowed: sampler, samples,"),
        ("  resources: {cpu: 1, gpu: 0.5}", "  resources: {cpu: 1, gpu: 1.5}",
         r"settings.resources.gpu: must be 0, a fraction"),
        ("  resources: {cpu: 1, gpu: 0.5}", "  resources: {cpu: 1, gpus: 1}",
         r"space.yaml:14: settings.resources.gpus: unknown key \(did you mean 'gpu'\?\); allowed: cpu, gpu"),
        ("  scheduler: {type: asha, grace: 100, max_t: 400}", "  scheduler: {type: asha, grace: 500, max_t: 400}",
         r"settings.scheduler.grace: must lie in \(0, max_t=400\)"),
        ("  scheduler: {type: asha, grace: 100, max_t: 400}", "  scheduler: {type: asha, grace: 100, max_t: 99999}",
         r"settings.scheduler.max_t: 99999 exceeds optim.iterations"),
        ("  data.root: ../data", "  data.rot: ../data", r"space.yaml:4: fixed.data.rot: not a training-config key"),
        ("  data.root: ../data", "  loss.c_bg: -3", r"space.yaml:4: loss.c_bg: must lie in \[0, 1\]"),
        ("base: demo", "base: nosuch", r"space.yaml:2: base:"),
        ("name: t", "name: t\nextra: 1", r"space.yaml:2: extra: unknown key"),
        ("settings:", "settings:\n  metric: val/accuracy", r"settings.metric: must be one of"),
        ("settings:", "settings:\n  mlflow: {register_as: 'a/b'}", r"settings.mlflow.register_as: must be a model name"),
        # types and declared ranges, checked as a config's are (config._coerce), but strictly: what YAML parsed
        ("  samples: 3", "  samples: 2.5", r"space.yaml:12: settings.samples: expected an integer >= 1, got 2.5"),
        ("  samples: 3", "  samples: '3'", r"space.yaml:12: settings.samples: expected an integer >= 1, got '3'"),
        ("settings:", "settings:\n  seed: -1",
         r"space.yaml:12: settings.seed: expected an integer in \[0, 4294967295\], got -1"),
        ("  resources: {cpu: 1, gpu: 0.5}", "  resources: {cpu: .inf, gpu: 0.5}",
         r"space.yaml:14: settings.resources.cpu: expected a finite number, got inf"),
        ("  scheduler: {type: asha, grace: 100, max_t: 400}", "  scheduler: {type: asha, max_t: 400}",
         r"space.yaml:13: settings.scheduler.grace: required: an integer >= 1"),
        ("  scheduler: {type: asha, grace: 100, max_t: 400}", "  scheduler: {type: fifo, grace: 100, max_t: 400}",
         r"space.yaml:13: settings.scheduler.type: expected one of 'asha', 'none', got 'fifo'"),
        ("settings:", "settings:\n  mlflow: {tracking_uri: 5}",
         r"space.yaml:12: settings.mlflow.tracking_uri: expected a string, got 5"),
        ("settings:", "settings:\n  mlflow: [a]",
         r"space.yaml:12: settings.mlflow: expected a mapping with keys tracking_uri, experiment, register_as, got \['a'\]"),
    ],
)
def test_bad_spaces_name_line_and_key(tmp_path: Path, old: str, new: str, pattern: str):
    assert old in GOOD
    with pytest.raises(UserError, match=pattern):
        load_space(write(tmp_path, GOOD.replace(old, new, 1)))


def test_settings_shorthands_and_what_a_search_records(tmp_path: Path):
    """`scheduler: none` (or {type: none}, its options ignored), an empty `mlflow:` and the defaults parse as
    before; the settings are recorded (MLflow params, the space record) under these keys."""
    from weakseg.search.run import _settings_params

    for sched in ("none", "{type: none, grace: x}", "null"):
        text = GOOD.replace("  scheduler: {type: asha, grace: 100, max_t: 400}", f"  scheduler: {sched}\n  mlflow:")
        assert load_space(write(tmp_path, text)).settings.scheduler.type == "none"
    text = GOOD.replace("settings:\n", "settings:\n  mlflow: {tracking_uri: mlruns.db, experiment: e}\n")
    space = load_space(write(tmp_path, text), {"samples": 5})
    recorded = _settings_params(space)
    assert list(recorded) == [
        "sampler", "samples", "metric", "mode", "scheduler.type", "scheduler.grace", "scheduler.max_t",
        "scheduler.reduction_factor", "max_concurrent", "resources.cpu", "resources.gpu", "max_failures", "seed",
        "storage_path", "results_dir", "tracking_uri", "experiment", "register_as"]
    assert recorded["tracking_uri"] == str(tmp_path / "spaces" / "mlruns.db") == space.tracking_uri
    assert (recorded["samples"], recorded["experiment"], recorded["register_as"]) == (5, "e", None)
    assert (recorded["resources.gpu"], recorded["scheduler.max_t"], recorded["seed"]) == (0.5, 400, 0)


def test_malformed_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match=r"space.yaml:\d+: malformed YAML"):
        load_space(write(tmp_path, "name: t\nparams: {a: [1, 2}\n"))
    with pytest.raises(UserError, match="no such file"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(f.stem for f in (REPO / "search_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid(name: str):
    space = load_space(REPO / "search_spaces" / f"{name}.yaml")
    assert space.params, "a search space with nothing to search"


def test_cli_dry_run_and_bad_space_exit_codes(tmp_path: Path):
    weakseg = [sys.executable, "-m", "weakseg"]
    ok = subprocess.run(weakseg + ["search", str(REPO / "search_spaces" / "demo.yaml"), "--dry-run"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "loss.lam" in ok.stdout and "nothing was started" in ok.stdout
    bad = write(tmp_path, GOOD.replace("loss.lam:", "loss.lamda:"))
    r = subprocess.run(weakseg + ["search", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "params.loss.lamda" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()  # nothing was started or written


def test_scheduler_type_none_needs_no_asha_options(tmp_path: Path):
    text = GOOD.replace("  scheduler: {type: asha, grace: 100, max_t: 400}", "  scheduler: {type: none}")
    assert load_space(write(tmp_path, text)).settings.scheduler.type == "none"


def test_grid_sampler_visits_every_combination_once_even_concurrently():
    """lambda_sweep.yaml: a grid over variant × λ, each point exactly once with 2 trials in flight."""
    import itertools

    from weakseg.search.run import _sampler

    space = load_space(REPO / "search_spaces" / "lambda_sweep.yaml")
    grid = space.grid()
    combos = set(itertools.product(*grid.values()))
    assert space.settings.samples == len(combos) == 2 * 5
    study = optuna.create_study(sampler=_sampler(space), direction="maximize")
    seen, running = [], []
    for _ in range(len(combos)):
        t = study.ask()
        space.optuna_space()(t)
        running.append(t)
        if len(running) == 2:  # two trials in flight, as with max_concurrent: 2
            done = running.pop(0)
            study.tell(done, 0.5)
        seen.append(tuple(t.params[k] for k in grid))
    assert sorted(seen, key=repr) == sorted(combos, key=repr)


def test_grid_sampler_rejects_continuous_parameters(tmp_path: Path):
    text = GOOD.replace("settings:\n", "settings:\n  sampler: grid\n")
    with pytest.raises(UserError, match="grid sampler needs unconditional `choice` parameters"):
        load_space(write(tmp_path, text))


def test_cli_setting_overrides_for_clusters(tmp_path: Path, capsys):
    from weakseg.cli import main

    argv = ["search", str(REPO / "search_spaces" / "paper.yaml"), "--dry-run", "--storage-path", "s3://bkt/ray",
            "--results-dir", str(tmp_path / "r"), "--tracking-uri", "http://127.0.0.1:5000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "s3://bkt/ray/paper" in out and f"{tmp_path / 'r' / 'paper'}" in out and "http://127.0.0.1:5000" in out


def test_asha_max_t_is_a_trials_full_length(tmp_path: Path):
    """Trials reaching ASHA's max_t count as completed (told COMPLETE to Optuna), not as stopped early."""
    text = GOOD.replace("  data.root: ../data\n", "  data.root: ../data\n  optim.iterations: 1000\n")
    assert load_space(write(tmp_path, text)).full_iterations == 400
    no_max = text.replace("grace: 100, max_t: 400", "grace: 100")
    assert load_space(write(tmp_path, no_max)).full_iterations == 1000
    fifo = text.replace("scheduler: {type: asha, grace: 100, max_t: 400}", "scheduler: none")
    assert load_space(write(tmp_path, fifo)).full_iterations == 1000
    with pytest.raises(UserError, match="max_t.*exceeds optim.iterations"):
        load_space(write(tmp_path, text.replace("max_t: 400", "max_t: 2000")))


def test_trials_sampling_the_variant_get_its_default_gradient_mode(tmp_path: Path):
    """base <- fixed <- sampled, as run_trial composes it: `auto` is resolved per trial, not in the base."""
    from weakseg.config import build_config, mapping_settings

    def trial_grad(space, variant):
        values = {**space.base_values(), "loss.variant": variant}
        return build_config(mapping_settings(values, "trial", None)).loss.grad

    space = load_space(write(tmp_path, GOOD))
    assert space.base_config.loss.grad == "detach" and space.base_values()["loss.grad"] == "auto"
    assert (trial_grad(space, "exp"), trial_grad(space, "mean")) == ("detach", "both")
    # a mode named in `fixed` (or the base file) holds for every variant
    fixed = load_space(write(tmp_path, GOOD.replace("  data.root: ../data\n",
                                                    "  data.root: ../data\n  loss.grad: both\n")))
    assert (trial_grad(fixed, "exp"), trial_grad(fixed, "mean")) == ("both", "both")


def test_free_energy_with_a_sampled_mean_variant_is_refused_before_the_search(tmp_path: Path):
    """free_energy is exp's: a space that can pair it with `mean` names the key before anything starts."""
    fixed = GOOD.replace("  data.root: ../data\n", "  data.root: ../data\n  loss.grad: free_energy\n")
    with pytest.raises(UserError, match=r"params.loss.variant.*'mean'.*free_energy is the free energy"):
        load_space(write(tmp_path, fixed))
    sampled = GOOD.replace("  loss.lam: {uniform: [0.0, 1.0]}\n",
                           "  loss.lam: {uniform: [0.0, 1.0]}\n  loss.grad: {choice: [detach, free_energy]}\n")
    with pytest.raises(UserError, match=r"params.loss.grad.*'mean'.*free_energy"):
        load_space(write(tmp_path, sampled))
    ok = GOOD.replace("{choice: [exp, mean, none]}", "{choice: [exp, none]}").replace(
        "  loss.lam: {uniform: [0.0, 1.0]}\n",
        "  loss.lam: {uniform: [0.0, 1.0]}\n  loss.grad: {choice: [both, free_energy]}\n")
    assert load_space(write(tmp_path, ok)).params
