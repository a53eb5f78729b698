"""`weakseg search` end to end on a local Ray: MLflow structure, results, resume after SIGKILL, fail-fast."""

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from weakseg.compat import optuna_study
from weakseg.data.classes import VOC_CLASSES
from conftest import tiny_fixed

pytestmark = pytest.mark.slow

def make_space(tmp_path: Path, synth_root: Path, name: str, *, samples: int, iterations: int, eval_every: int,
               scheduler=None, resources=None, concurrent: int = 2, export=None) -> Path:
    space = {
        "name": name,
        "base": "demo",
        "fixed": tiny_fixed(synth_root, {"train.overlays": 1, "optim.iterations": iterations,
                                         "train.eval_every": eval_every, "train.log_every": 1}),
        "params": {"loss.variant": {"choice": ["exp", "mean"]}, "loss.lam": {"uniform": [0.0, 1.0]}},
        "settings": {
            "samples": samples,
            "scheduler": scheduler or "none",
            "max_concurrent": concurrent,
            "resources": resources or {"cpu": 1, "gpu": 0},
            "max_failures": 1,
            "storage_path": str(tmp_path / "results" / "ray"),
            "results_dir": str(tmp_path / "results"),
        },
    }
    if export:
        space["export"] = export
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def search_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["HOME"] = str(tmp_path / "home")  # Ray's token file and caches stay inside the test
    # Ray's Unix sockets live under RAY_TMPDIR, and AF_UNIX paths must stay under 108 bytes
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wsr", dir="/tmp")
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def optuna_trial_states(exp_dir: Path) -> list[str]:
    """The state Optuna recorded for each trial, from the searcher state Ray pickles with the experiment."""
    state = sorted(exp_dir.glob("searcher-state-*.pkl"))[-1]
    searcher = pickle.loads(state.read_bytes())
    study = optuna_study(searcher)
    return [t.state.name for t in study.trials]


def runs_of(tmp_path: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("weakseg.role") == "search"]
    children = [r for r in runs if r.data.tags.get("weakseg.role") == "trial"]
    return client, parents, children


def test_search_logs_parent_and_children_with_per_class_metrics(tmp_path: Path, synth_root: Path):
    space = make_space(tmp_path, synth_root, "t1", samples=3, iterations=4, eval_every=2, export={"split": "test"})
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=600, env=search_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "MLflow UI:" in r.stdout and "results:" in r.stdout

    client, parents, children = runs_of(tmp_path, "t1")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["weakseg.trial_id"] for c in children}) == 3
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["weakseg.outcome"] == "completed"
        assert c.data.params["loss.variant"] in ("exp", "mean") and 0 <= float(c.data.params["loss.lam"]) <= 1
        assert c.data.params["optim.iterations"] == "4"
        absent = set(c.data.tags["weakseg.absent_classes"].split(","))
        for cls in VOC_CLASSES:  # each of the 21 classes has an IoU, or never occurs and is listed as absent
            assert f"val/iou/{cls}" in c.data.metrics or cls in absent, cls
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val/miou")] == [2, 4]
        for name in ("train/loss", "train/loss_class", "train/loss_neighb", "train/images_per_s",
                     "train/lr/pretrained", "train/lr/new"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, name)] == [1, 2, 3, 4], name
        assert all(m.value > 0 for m in client.get_metric_history(c.info.run_id, "train/images_per_s"))
        arts = {a.path for a in client.list_artifacts(c.info.run_id, "eval")}
        assert {"eval/classes.md", "eval/classes.csv", "eval/confusion.png", "eval/overlays.png"} <= arts
    assert "final/val/miou" in parent.data.metrics
    assert "weakseg.checkpoint" in parent.data.tags and parent.data.tags["weakseg.code_version"]
    summary_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.md", "summary/metric_vs_lambda.png", "summary/best_iou.png"} <= summary_arts

    out = tmp_path / "results" / "t1"
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + 3 trials
    best = json.loads((out / "search.json").read_text())
    # the search reports the best of the trials' LAST evaluations (MLflow's latest values), with
    # the last checkpoint of that trial
    finals = [max(client.get_metric_history(c.info.run_id, "val/miou"), key=lambda m: m.step).value
              for c in children]
    assert best["best_value"] == pytest.approx(max(finals))
    assert parent.data.metrics["final/val/miou"] == pytest.approx(max(finals))
    from weakseg.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(best["best_checkpoint"]) / "checkpoint.pt")
    assert ck["iteration"] == 4 and ck["metrics"]["val/miou"] == pytest.approx(max(finals))
    cfg = yaml.safe_load((out / "best_config.yaml").read_text())
    assert cfg["optim"]["iterations"] == 4 and cfg["model"]["backbone"] == "tiny"
    assert (Path(best["best_checkpoint"]) / "checkpoint.pt").is_file()
    assert (out / "metric_vs_lambda.png").stat().st_size > 1000 and (out / "best_iou.png").is_file()
    # `export: {split: test}`: the search ends with the VOC server tarball of its best model
    import tarfile

    ids = (synth_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    with tarfile.open(out / "voc_test_submission.tar.gz") as tar:
        names = {m.name.rsplit("/", 1)[-1] for m in tar.getmembers() if m.isfile()}
    assert names == {f"{i}.png" for i in ids}

    # --restart: the Ray state starts over, MLflow keeps the first search as history
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space), "--restart", "--samples", "1"],
                       capture_output=True, text=True, timeout=600, env=search_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    _, parents, children = runs_of(tmp_path, "t1")
    assert len(parents) == 2 and len(children) == 3 + 1
    assert all(r.info.status == "FINISHED" for r in parents + children)
    assert len(list((tmp_path / "results" / "ray" / "t1").glob("run_trial_*"))) == 1
    # the first search's checkpoints are gone, and so are the tags that pointed at them
    old = next(p for p in parents if p.info.run_id == parent.info.run_id)
    assert "weakseg.checkpoint" not in old.data.tags and old.data.tags["weakseg.checkpoint_deleted"]
    new = json.loads((out / "search.json").read_text())
    assert new["parent_run_id"] != parent.info.run_id and Path(new["best_checkpoint"]).is_dir()


def test_asha_stops_trials_early_and_tells_optuna_they_were_pruned(tmp_path: Path, synth_root: Path):
    """Half the grid is hopeless (c_fg = 0.8 makes objects of everything): ASHA stops trials at a rung,
    MLflow and Optuna both record it, and the grid sampler running out of points fails no trial."""
    space = make_space(tmp_path, synth_root, "t4", samples=0, iterations=12, eval_every=4, concurrent=1,
                       scheduler={"type": "asha", "grace": 4, "max_t": 12, "reduction_factor": 2})
    data = yaml.safe_load(space.read_text())
    data["settings"].pop("samples")
    data["settings"]["sampler"] = "grid"
    data["fixed"].update({"optim.lr_pretrained": 0.1, "optim.lr_new": 0.1, "loss.c_bg": 0.1})
    data["params"] = {"loss.c_fg": {"choice": [0.05, 0.8]}, "loss.lam": {"choice": [0.0, 0.2, 0.4]}}
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=600, env=search_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, parents, children = runs_of(tmp_path, "t4")
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    steps = {c.data.tags["weakseg.trial_id"]: [m.step for m in client.get_metric_history(c.info.run_id, "val/miou")]
             for c in children}
    outcome = {c.data.tags["weakseg.trial_id"]: c.data.tags["weakseg.outcome"] for c in children}
    for trial_id, seen in steps.items():
        assert outcome[trial_id] == ("completed" if seen[-1] == 12 else "stopped_early"), (trial_id, seen)
    assert "stopped_early" in outcome.values() and "completed" in outcome.values()
    table = {row.split(",")[1]: row.split(",")[2]
             for row in (tmp_path / "results" / "t4" / "trials.csv").read_text().strip().splitlines()[1:]}
    assert table == outcome
    states = sorted(optuna_trial_states(tmp_path / "results" / "ray" / "t4"))
    counts = {o: list(outcome.values()).count(o) for o in ("completed", "stopped_early")}
    assert states == sorted(["COMPLETE"] * counts["completed"] + ["PRUNED"] * counts["stopped_early"])


def test_resume_after_driver_sigkill(tmp_path: Path, synth_root: Path):
    """Kill -9 the driver mid-search; --resume finishes every trial; one MLflow run per trial; none RUNNING."""
    space = make_space(tmp_path, synth_root, "t2", samples=4, iterations=8, eval_every=2, concurrent=1)
    env = search_env(tmp_path)
    cmd = [sys.executable, "-m", "weakseg", "search", str(space)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    exp_dir = tmp_path / "results" / "ray" / "t2"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # until a second trial has checkpointed (Ray keeps 1 checkpoint a trial)
            if len({c.parent for c in exp_dir.glob("run_trial_*/checkpoint_*")}) >= 2:
                break
            assert proc.poll() is None, "the search ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    time.sleep(2)

    _, _, before = runs_of(tmp_path, "t2")
    assert any(c.info.status == "RUNNING" for c in before)  # the kill really left a trial running

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, parents, children = runs_of(tmp_path, "t2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    # A trial the killed driver had started but not yet saved in its experiment state does not exist for
    # the resumed search (Tune and Optuna restore the same snapshot); its run is closed as abandoned and
    # no longer counts as a trial run.
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    others = client.search_runs([parents[0].info.experiment_id], filter_string="tags.`weakseg.role` != 'trial'")
    for c in others:
        assert c.data.tags["weakseg.role"] in ("search", "abandoned")
        if c.data.tags["weakseg.role"] == "abandoned":
            assert c.info.status == "KILLED" and c.data.tags["weakseg.outcome"] == "abandoned"
    ids = [c.data.tags["weakseg.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 4  # every trial exactly once
    assert all(c.info.status == "FINISHED" for c in children)
    table = (tmp_path / "results" / "t2" / "trials.csv").read_text().strip().splitlines()[1:]
    assert {row.split(",")[1] for row in table} == set(ids)
    # every trial trained to the end, the interrupted one from its checkpoint
    assert all(row.split(",")[3] == "8" for row in table)
    summary = json.loads((tmp_path / "results" / "t2" / "search.json").read_text())
    assert summary["trials"] == 4
    # Optuna's history survived: 4 trials told COMPLETE, none left running, none duplicated
    states = optuna_trial_states(exp_dir)
    assert states.count("COMPLETE") == 4 and len(states) == 4, states


def test_gpu_trials_on_a_cluster_without_gpus_fail_fast(tmp_path: Path, synth_root: Path):
    space = make_space(tmp_path, synth_root, "t3", samples=2, iterations=2, eval_every=2,
                       resources={"cpu": 1, "gpu": 1})
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=300, env=search_env(tmp_path))
    assert r.returncode == 2
    assert "gpu: 1" in r.stderr and "PENDING forever" in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 120
    assert not (tmp_path / "results" / "ray" / "t3").exists()
