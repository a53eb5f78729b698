"""A search's life: interrupted (SIGINT, SIGTERM), edited between resumes, run twice at once, its state damaged,
every trial failing. One small search is taken through most of it, to keep the Ray starts few."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_faults import fault_env
from test_search import make_space, runs_of, search_env
from weakseg.cli import main

pytestmark = pytest.mark.slow


def wait_for(cond, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"the search ended before {what}"
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def interrupted_run(argv: list[str], env: dict, log_path: Path, ready, what: str, during, stop) -> tuple[int, str]:
    """Start a search, wait until `ready()`, call `during(proc)`, then `stop(proc)`: its exit status and output."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(ready, proc, what)
            during(proc)
            stop(proc)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return rc, log_path.read_text()


def checkpoints(exp_dir: Path) -> int:
    return len(list(exp_dir.glob("run_trial_*/checkpoint_*")))


def trials_csv(tmp_path: Path, name: str) -> list[dict]:
    import csv

    with open(tmp_path / "results" / name / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_signals_edits_concurrency_and_damaged_state(tmp_path: Path, synth_root: Path, capsys):
    space = make_space(tmp_path, synth_root, "life", samples=2, iterations=8, eval_every=2, concurrent=1)
    env = search_env(tmp_path)
    (tmp_path / "faults").mkdir()
    # slow steps (2 s each) while a signal or a second search must land mid-trial
    slow = {**env, **fault_env(tmp_path / "faults", [{"id": "slow", "at": "any", "action": "sleep", "seconds": 2}])}
    cmd = [sys.executable, "-m", "weakseg", "search", str(space)]
    exp_dir = tmp_path / "results" / "ray" / "life"
    results = tmp_path / "results" / "life"

    def while_it_runs(a: subprocess.Popen) -> None:
        # case 3: a second search of the same name is refused, naming the first; nothing of the first is touched
        b = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert b.returncode == 2, b.stderr
        assert f"pid {a.pid} on host" in b.stderr and "already running" in b.stderr and "Traceback" not in b.stderr
        # case 5: export-voc --best while it runs: refused (its best checkpoint may be rotated away)
        capsys.readouterr()
        assert main(["export-voc", "--best", str(results), "--out", str(tmp_path / "x.tar.gz")]) == 2
        assert "still running" in capsys.readouterr().err
        assert not (tmp_path / "x.tar.gz").exists()

    # case 4: Ctrl-C (SIGINT to the process group) mid-trial
    rc, out = interrupted_run(cmd, slow, tmp_path / "a.log", lambda: checkpoints(exp_dir) >= 1, "a first checkpoint",
                              while_it_runs, lambda a: os.killpg(a.pid, signal.SIGINT))
    assert rc == 130, out[-4000:]
    assert f"{space} --resume" in out and "interrupted by SIGINT" in out, out[-3000:]
    status = json.loads((results / "search.json").read_text())
    assert status["status"] == "interrupted" and status["complete"] is False
    rows = trials_csv(tmp_path, "life")
    assert rows and all(r["outcome"] != "stopped_early" for r in rows), rows
    cut = [r for r in rows if r["outcome"] == "interrupted"]
    assert len(cut) == 1 and int(cut[0]["iterations"]) < 8, rows
    assert status["best_trial"] != cut[0]["trial_id"]
    assert "**Incomplete**: interrupted by SIGINT" in (results / "trials.md").read_text()
    _, parents, children = runs_of(tmp_path, "life")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert parents[0].data.tags["weakseg.outcome"] == "interrupted"
    by_trial = {c.data.tags["weakseg.trial_id"]: c for c in children}
    assert by_trial[cut[0]["trial_id"]].info.status == "KILLED"
    assert by_trial[cut[0]["trial_id"]].data.tags["weakseg.outcome"] == "interrupted"
    assert not [c for c in children if c.info.status == "RUNNING"]
    capsys.readouterr()
    assert main(["export-voc", "--best", str(results), "--out", str(tmp_path / "x.tar.gz")]) == 2
    assert "interrupted (SIGINT) and is incomplete" in capsys.readouterr().err
    assert not (tmp_path / "results" / "ray" / "life.lock").exists()  # released at the end

    # case 1: --resume after editing the space: refused with the changed keys, the state untouched
    data = yaml.safe_load(space.read_text())
    data["settings"]["samples"] = 3
    data["params"]["loss.lam"] = {"uniform": [0.0, 2.0]}
    data["fixed"]["optim.batch_size"] = 2
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    before = sorted(p.name for p in exp_dir.iterdir())
    capsys.readouterr()
    assert main(["search", str(space), "--resume", "--apply-safe-changes"]) == 2
    err = capsys.readouterr().err
    for key in ("settings.samples: 2 -> 3", "params.loss.lam: uniform[0, 1] -> uniform[0, 2]",
                "config.optim.batch_size: 4 -> 2"):
        assert key in err, err
    assert sorted(p.name for p in exp_dir.iterdir()) == before
    data["params"]["loss.lam"] = {"uniform": [0.0, 1.0]}
    data["fixed"]["optim.batch_size"] = 4
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["search", str(space), "--resume"]) == 2  # more samples: safe, but only when asked
    assert "pass --apply-safe-changes" in capsys.readouterr().err

    # SIGTERM to the process group during the resumed search (more samples applied): Ray's own processes stop
    # too, so the driver closes the search as interrupted after Interruption.GRACE_S
    n0 = checkpoints(exp_dir)
    rc, out = interrupted_run(cmd + ["--resume", "--apply-safe-changes"], slow, tmp_path / "b.log",
                              lambda: checkpoints(exp_dir) > n0, "a checkpoint of the resumed search",
                              lambda b: None, lambda b: os.killpg(b.pid, signal.SIGTERM))
    assert rc == 143, out[-4000:]
    assert "interrupted by SIGTERM" in out and "--resume" in out
    _, parents, children = runs_of(tmp_path, "life")
    assert [p.info.status for p in parents] == ["KILLED"] and not [c for c in children if c.info.status == "RUNNING"]

    # ... and the last resume finishes every trial, the extra one included, without a duplicated metric point
    # (the stored space is updated only once a resumed search has ended, so the flag is needed again)
    r = subprocess.run(cmd + ["--resume", "--apply-safe-changes"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = trials_csv(tmp_path, "life")
    assert len(rows) == 3 and {x["outcome"] for x in rows} == {"completed"}, rows
    assert {x["iterations"] for x in rows} == {"8"}
    client, parents, children = runs_of(tmp_path, "life")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert parents[0].data.tags["weakseg.resumed.settings.samples"] == "2 -> 3"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        for key in ("val/miou", "train/loss"):
            steps = [m.step for m in client.get_metric_history(c.info.run_id, key)]
            assert sorted(steps) == sorted(set(steps)), (key, steps)
            assert max(steps) == 8
    assert json.loads((results / "search.json").read_text())["status"] == "finished"

    # case 2: state a full disk left truncated: --resume refuses in one line, no fresh search, results kept
    table = (results / "trials.csv").read_bytes()
    state = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    state.write_bytes(state.read_bytes()[:100])
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{state.name} is damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (results / "trials.csv").read_bytes() == table

    # case 9: a tuner.pkl others could have written is not unpickled
    (exp_dir / "tuner.pkl").chmod(0o666)
    state.unlink()  # the older state files are intact
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "tuner.pkl is mode -rw-rw-rw-" in r.stderr, r.stderr


def test_a_search_in_which_every_trial_fails_exits_non_zero(tmp_path: Path, synth_root: Path):
    space = make_space(tmp_path, synth_root, "allfail", samples=1, iterations=2, eval_every=2, concurrent=1)
    data = yaml.safe_load(space.read_text())
    data["settings"]["max_failures"] = 0
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    # every training step raises (a bad data root would be refused before the search starts)
    env = {**search_env(tmp_path), **fault_env(tmp_path, [{"id": "crash", "match": {}, "at": "any", "action": "raise"}])}
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no trial succeeded" in r.stderr
    assert json.loads((tmp_path / "results" / "allfail" / "search.json").read_text())["status"] == "failed"
    _, parents, children = runs_of(tmp_path, "allfail")
    assert [p.info.status for p in parents] == ["FAILED"] and [c.info.status for c in children] == ["FAILED"]
