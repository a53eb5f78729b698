"""Faults during a search: a crashing trial, a NaN loss, a worker node killed mid-trial.

Faults are injected from outside the package: `tests/faults/sitecustomize.py`, put on the PYTHONPATH of
the search (Ray's workers inherit the driver's or the node's environment), wraps
`weakseg.engine.train_step` for the trials whose config matches and records every step it sees
(pid, session, iteration). The oracles are records weakseg does not write itself: that step log,
Ray's experiment state (status, number of failures), Optuna's study in the searcher state, and the
MLflow store read back through `MlflowClient`.

Covered elsewhere: driver SIGKILL + `--resume` (test_search.py::test_resume_after_driver_sigkill), a GPU
trial on a cluster without GPUs failing fast (test_search.py::test_gpu_trials_on_a_cluster_without_gpus_fail_fast),
divergence inside `fit` leaving no NaN checkpoint (test_engine.py).
"""

import collections
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

from weakseg.cluster.local import LocalCluster
from weakseg.compat import optuna_study
from conftest import tiny_fixed

pytestmark = pytest.mark.slow

FAULTS_DIR = Path(__file__).resolve().parent / "faults"

def write_space(folder: Path, synth_root: Path, name: str, lams: list[float], iterations: int,
                concurrent: int = 2) -> Path:
    """A grid over loss.lam: every trial is known in advance, and faults pick trials by their λ."""
    space = {
        "name": name,
        "base": "demo",
        "fixed": tiny_fixed(synth_root, {"train.eval_every": 2, "train.log_every": 1, "train.overlays": 1,
                                         "optim.iterations": iterations}),
        "params": {"loss.lam": {"choice": lams}},
        "settings": {
            "sampler": "grid",
            "max_concurrent": concurrent,
            "resources": {"cpu": 1, "gpu": 0},
            "max_failures": 1,
            "storage_path": str(folder / "results" / "ray"),
            "results_dir": str(folder / "results"),
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def fault_env(folder: Path, faults: list[dict]) -> dict[str, str]:
    """PYTHONPATH and WEAKSEG_FAULTS for `tests/faults/sitecustomize.py`."""
    plan = {"log": str(folder / "steps.jsonl"), "markers": str(folder / "markers"), "faults": faults}
    path = os.pathsep.join(p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "WEAKSEG_FAULTS": json.dumps(plan)}


def steps_by_lam(folder: Path) -> dict[float, list[dict]]:
    """The injector's record of every train_step call, per trial (λ), in order."""
    out: dict[float, list[dict]] = collections.defaultdict(list)
    for line in (folder / "steps.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["lam"]].append(r)
    return out


def attempts(calls: list[dict]) -> list[list[int]]:
    """Split a trial's step calls into attempts: a new process or an iteration that goes backwards."""
    out: list[list[int]] = []
    last_pid, last_it = None, None
    for c in calls:
        if c["pid"] != last_pid or last_it is None or c["it"] <= last_it:
            out.append([])
        out[-1].append(c["it"])
        last_pid, last_it = c["pid"], c["it"]
    return out


def ray_trials(exp_dir: Path) -> dict[float, dict]:
    """λ -> {status, num_failures} from Ray Tune's own experiment state."""
    state = json.loads(next(exp_dir.glob("experiment_state-*.json")).read_text())
    out = {}
    for meta, run in state["trial_data"]:
        meta = json.loads(meta) if isinstance(meta, str) else meta
        run = json.loads(run) if isinstance(run, str) else run
        out[meta["config"]["loss.lam"]] = {"status": meta["status"], "num_failures": run["num_failures"],
                                           "trial_id": meta["trial_id"]}
    return out


def optuna_states(exp_dir: Path) -> dict[float, str]:
    """λ -> the state Optuna recorded, from the searcher state Ray pickles (Ray's file, read by the test)."""
    state = sorted(exp_dir.glob("searcher-state-*.pkl"))[-1]
    searcher = pickle.loads(state.read_bytes())
    study = optuna_study(searcher)
    return {t.params["loss.lam"]: t.state.name for t in study.trials}


def child_runs(db: Path, experiment: str) -> tuple[MlflowClient, list, dict[float, list]]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("weakseg.role") == "search"]
    by_lam: dict[float, list] = collections.defaultdict(list)
    for r in runs:
        if r.data.tags.get("weakseg.role") == "trial":
            by_lam[float(r.data.params["loss.lam"])].append(r)
    return client, parents, by_lam


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(home)  # Ray's token file and caches stay inside the test
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wsf", dir="/tmp")  # AF_UNIX paths < 108 bytes
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------ crash, crash again, NaN: one search

CLEAN, TRANSIENT, PERSISTENT, NAN = 0.1, 0.2, 0.3, 0.4
FAULT_AT = 3  # after the checkpoint of iteration 2, before the one of iteration 4
ITERATIONS = 6


@pytest.fixture(scope="module")
def faulty_search(tmp_path_factory, synth_root: Path):
    """One search of four trials: clean; raises once; raises on every attempt; NaN loss once."""
    folder = tmp_path_factory.mktemp("faults")
    space = write_space(folder, synth_root, "faults", [CLEAN, TRANSIENT, PERSISTENT, NAN], ITERATIONS)
    env = base_env(folder / "home")
    env.update(fault_env(folder, [
        {"id": "transient", "match": {"loss.lam": TRANSIENT}, "at": FAULT_AT, "action": "raise", "once": True},
        {"id": "persistent", "match": {"loss.lam": PERSISTENT}, "at": FAULT_AT, "action": "raise"},
        # `once`: were the diverged trial retried, the retry would run clean and finish: visible below
        {"id": "nan", "match": {"loss.lam": NAN}, "at": FAULT_AT, "action": "nan", "once": True},
    ]))
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=400, env=env)
    return folder, r


def test_search_with_faulty_trials_still_ends_with_a_summary(faulty_search):
    folder, r = faulty_search
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ui = next(l for l in r.stdout.splitlines() if l.startswith("MLflow UI:"))
    assert "--host 127.0.0.1" in ui  # the UI command weakseg prints binds to loopback
    client, parents, by_lam = child_runs(folder / "results" / "mlflow.db", "faults")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials"] == 4 and parents[0].data.metrics["trials_failed"] == 2
    assert sorted(by_lam) == [CLEAN, TRANSIENT, PERSISTENT, NAN]
    assert all(len(runs) == 1 for runs in by_lam.values())  # retries reuse the trial's run
    clean = by_lam[CLEAN][0]
    assert clean.info.status == "FINISHED" and clean.data.tags["weakseg.outcome"] == "completed"
    assert steps(client, clean, "val/miou") == [2, 4, 6]


def test_crashed_trial_is_retried_from_its_checkpoint(faulty_search):
    folder, _ = faulty_search
    calls = steps_by_lam(folder)[TRANSIENT]
    # attempt 1 runs from 0 and dies at the fault; attempt 2 starts at the checkpoint's iteration (2), not at 0
    assert attempts(calls) == [[0, 1, 2, FAULT_AT], [2, 3, 4, 5]]
    ray = ray_trials(folder / "results" / "ray" / "faults")[TRANSIENT]
    assert ray["status"] == "TERMINATED" and ray["num_failures"] == 1
    client, _, by_lam = child_runs(folder / "results" / "mlflow.db", "faults")
    run = by_lam[TRANSIENT][0]
    assert run.info.status == "FINISHED" and run.data.tags["weakseg.outcome"] == "completed"
    # every training step logged exactly once: a retry from scratch would log steps 1-2 twice
    assert steps(client, run, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps(client, run, "val/miou") == [2, 4, 6]
    assert optuna_states(folder / "results" / "ray" / "faults")[TRANSIENT] == "COMPLETE"


def test_trial_crashing_on_every_attempt_is_marked_failed(faulty_search):
    folder, _ = faulty_search
    calls = steps_by_lam(folder)[PERSISTENT]
    assert attempts(calls) == [[0, 1, 2, FAULT_AT], [2, FAULT_AT]]  # max_failures: 1 -> one retry, then given up
    ray = ray_trials(folder / "results" / "ray" / "faults")[PERSISTENT]
    assert ray["status"] == "ERROR" and ray["num_failures"] == 2
    _, _, by_lam = child_runs(folder / "results" / "mlflow.db", "faults")
    run = by_lam[PERSISTENT][0]
    assert run.info.status == "FAILED" and run.data.tags["weakseg.outcome"] == "failed"
    assert "InjectedFault" in run.data.tags["weakseg.error"]
    assert f"at iteration {FAULT_AT}" in run.data.tags["weakseg.error"]
    assert optuna_states(folder / "results" / "ray" / "faults")[PERSISTENT] == "FAIL"
    md = (folder / "results" / "faults" / "trials.md").read_text()
    failed = md.split("Failed trials:", 1)[1]
    assert f"`{ray['trial_id']}` (failed): " in failed and "InjectedFault" in failed


def test_nan_loss_ends_the_trial_as_diverged_without_retry(faulty_search):
    folder, _ = faulty_search
    calls = steps_by_lam(folder)[NAN]
    assert attempts(calls) == [[0, 1, 2, FAULT_AT]]  # no second attempt (it would have run clean to the end)
    ray = ray_trials(folder / "results" / "ray" / "faults")[NAN]
    assert ray["status"] == "TERMINATED" and ray["num_failures"] == 0
    client, _, by_lam = child_runs(folder / "results" / "mlflow.db", "faults")
    run = by_lam[NAN][0]
    assert run.info.status == "FAILED" and run.data.tags["weakseg.outcome"] == "diverged"
    assert "non-finite" in run.data.tags["weakseg.error"]
    assert f"before iteration {FAULT_AT + 1}" in run.data.tags["weakseg.error"]
    assert steps(client, run, "val/miou") == [2]  # the NaN placeholder report is not logged as a metric
    assert optuna_states(folder / "results" / "ray" / "faults")[NAN] == "FAIL"
    md = (folder / "results" / "faults" / "trials.md").read_text()
    failed = md.split("Failed trials:", 1)[1]
    assert f"`{ray['trial_id']}` (diverged): loss became non-finite" in failed
    # the diverged trial is never the best one, even though its score is no worse
    best = json.loads((folder / "results" / "faults" / "search.json").read_text())
    assert best["best_trial"] not in (ray["trial_id"], ray_trials(folder / "results" / "ray" / "faults")[PERSISTENT]["trial_id"])


# ---------------------------------------------------------------------- a worker node dies mid-trial


def session_pids(sid: int) -> list[int]:
    """Live processes in a session (the node's `ray start` leads it: raylet, workers, agents)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d.name))
    return out


@pytest.fixture()
def short_root():
    import shutil

    root = Path(tempfile.mkdtemp(prefix="wsfn", dir="/tmp"))  # Ray's sockets live under it
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_trial_on_a_killed_worker_node_resumes_on_the_surviving_node(tmp_path: Path, synth_root: Path,
                                                                    short_root: Path, monkeypatch):
    """Head (1 CPU) + worker (1 CPU), two trials: one lands on each node; the worker is SIGKILLed."""
    iterations = 8
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    # the GCS declares a silent node dead after period x threshold: seconds, not Ray's default ~15 s
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    for k, v in fault_env(tmp_path, []).items():  # the step log only: node processes inherit it
        monkeypatch.setenv(k, v)
    space = write_space(tmp_path, synth_root, "nodekill", [0.25, 0.75], iterations)

    cluster = LocalCluster(short_root, workers=1, worker_cpus=1, worker_gpus=0, head_cpus=1, head_gpus=0,
                           timeout_s=120)
    try:
        cluster.start()
        head_sid, worker_sid = cluster.node_pids  # each node's `ray start` leads its own session
        head_node = next(n["node_id"] for n in cluster.nodes if "node:__internal_head__" in n["resources"])
        worker_node = next(n["node_id"] for n in cluster.nodes if n["node_id"] != head_node)
        env = dict(os.environ)
        env.update(cluster.client_env())
        env.pop("RAY_ADDRESS")
        proc = subprocess.Popen([sys.executable, "-m", "weakseg", "search", str(space), "--address", cluster.address],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            exp = tmp_path / "results" / "ray" / "nodekill"
            deadline = time.time() + 240
            victim = None
            while victim is None:  # the trial on the worker node, once it has a checkpoint
                assert time.time() < deadline, "no checkpoint on the worker node in time"
                assert proc.poll() is None, "the search ended before the node could be killed"
                for result in exp.glob("run_trial_*/result.json"):
                    rows = [json.loads(l) for l in result.read_text().splitlines() if l.strip()]
                    if rows and rows[0].get("node_id") == worker_node and list(result.parent.glob("checkpoint_*")):
                        victim = result.parent
                time.sleep(0.2)
            for pid in session_pids(worker_sid):  # the whole node at once: raylet, trial worker, agents
                os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        assert proc.returncode == 0, out[-4000:]
    finally:
        cluster.stop()

    rows = [json.loads(l) for l in (victim / "result.json").read_text().splitlines() if l.strip()]
    before = [r["iteration"] for r in rows if r["node_id"] == worker_node]
    after = [r["iteration"] for r in rows if r["node_id"] == head_node]
    assert before and after and rows[-1]["iteration"] == iterations
    # the next evaluation after the last checkpoint: nothing skipped, not restarted from scratch. A node killed
    # while a report is in flight may lose that report's checkpoint though its row reached result.json, and the
    # trial then redoes that one evaluation (Ray delivers it at least once): before[-1] again, never more.
    redo = after[0] == before[-1]
    assert after[0] == before[-1] + 2 or (redo and after[0] > 2), (before, after)
    lam = next(r["config"]["loss.lam"] for r in rows)
    calls = steps_by_lam(tmp_path)[lam]
    tries = attempts(calls)
    assert len(tries) == 2 and tries[0][0] == 0
    resumed = [c for c in calls if c["sid"] == head_sid]
    assert {c["sid"] for c in calls} == {worker_sid, head_sid}
    # the head picked up at the worker's last checkpoint: its iteration, not 0
    assert tries[1][0] == resumed[0]["it"] == before[-1] - (2 if redo else 0) > 0 and resumed[0]["t"] > killed_at
    assert ray_trials(exp)[lam]["num_failures"] == 1 and ray_trials(exp)[lam]["status"] == "TERMINATED"

    client, parents, by_lam = child_runs(tmp_path / "results" / "mlflow.db", "nodekill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(by_lam) == [0.25, 0.75] and len(by_lam[lam]) == 1  # exactly one run for the killed trial
    run = by_lam[lam][0]
    assert run.info.status == "FINISHED" and run.data.tags["weakseg.outcome"] == "completed"
    assert sorted(set(steps(client, run, "val/miou"))) == list(range(2, iterations + 1, 2))
