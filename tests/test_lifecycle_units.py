"""The driver-side pieces of a search's life, without Ray: the experiment lock, the tracking queue during a
server outage, metric points never sent twice, the owner check before unpickling Ray's state."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from weakseg.config import load_config
from weakseg.errors import UserError
from weakseg.search import callbacks, tracking
from weakseg.search.callbacks import MlflowCallback
from weakseg.search.lifecycle import SearchLock, check_owner
from weakseg.search.tracking import SearchRun
from weakseg.tracking import client as tracking_client


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_second_driver_is_refused_naming_the_first_and_the_lock_goes_with_it(tmp_path: Path):
    first = SearchLock(str(tmp_path / "ray" / "s"), "s")
    first.acquire()
    with pytest.raises(UserError) as e:
        SearchLock(str(tmp_path / "ray" / "s"), "s").acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    assert "already running" in str(e.value) and str(tmp_path / "ray" / "s.lock") in str(e.value)
    first.release()
    assert not (tmp_path / "ray" / "s.lock").exists()
    again = SearchLock(str(tmp_path / "ray" / "s"), "s")
    again.acquire()  # free again
    again.release()


@pytest.mark.parametrize("held,reason", [
    ({"host": socket.gethostname(), "pid": "DEAD", "heartbeat": "NOW"}, "no longer runs"),
    ({"host": "elsewhere", "pid": 1, "heartbeat": "OLD"}, "has not refreshed it for"),
])
def test_a_stale_lock_is_detected_named_and_replaced(tmp_path: Path, capsys, held: dict, reason: str):
    pid = dead_pid() if held["pid"] == "DEAD" else held["pid"]
    beat = time.time() - (0 if held["heartbeat"] == "NOW" else 3600)
    (tmp_path / "s.lock").write_text(json.dumps({**held, "pid": pid, "heartbeat": beat, "started": "then",
                                                 "token": "x"}))
    lock = SearchLock(str(tmp_path / "s"), "s")
    lock.acquire()
    try:
        assert f"pid {pid} on host {held['host']}" in lock.replaced and reason in lock.replaced
        assert "removing a stale lock" in capsys.readouterr().out
        assert json.loads((tmp_path / "s.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_state_files_others_could_write_are_refused(tmp_path: Path):
    f = tmp_path / "tuner.pkl"
    f.write_bytes(b"x")
    f.chmod(0o644)
    tmp_path.chmod(0o755)
    check_owner(tmp_path, [f])  # ours, not writable by others: fine
    f.chmod(0o664)
    with pytest.raises(UserError, match="tuner.pkl is mode -rw-rw-r--"):
        check_owner(tmp_path, [f])
    f.chmod(0o644)
    tmp_path.chmod(0o777)  # anyone could replace the file
    try:
        with pytest.raises(UserError, match="drwxrwxrwx"):
            check_owner(tmp_path, [f])
    finally:
        tmp_path.chmod(0o755)


class Down:
    """A tracking client whose server does not answer."""

    def __getattr__(self, name):
        def fail(*a, **k):
            raise ConnectionError("Connection refused")
        return fail


def test_a_tracking_outage_is_buffered_reported_after_the_bound_and_sent_once(tmp_path: Path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "space.yaml").write_text("name: s\n")
    search = SearchRun(uri, "exp", "/ray/s")
    search.start(False, {}, tmp_path / "space.yaml", "0")
    real, down, clock = tracking_client.mlflow_client, [False], [0.0]
    fake = lambda u: Down() if down[0] else real(u)  # noqa: E731
    monkeypatch.setattr(tracking, "mlflow_client", fake)
    monkeypatch.setattr(callbacks, "mlflow_client", fake)
    monkeypatch.setattr(tracking_client.time, "sleep", lambda s: None)  # `retry` backs off for seconds otherwise
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: None))
    cb = MlflowCallback(search, load_config("demo").flat(), full_iterations=4)
    trial = SimpleNamespace(trial_id="t1", config={"loss.lam": 0.5}, last_result={"iteration": 4})

    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"iteration": 2, "val/miou": 0.2})
    down[0] = True
    cb.on_trial_result(0, [], trial, {"iteration": 4, "val/miou": 0.4})
    assert len(cb.pending) == 1
    clock[0] = 30.0
    cb.on_step_begin(0, [])
    assert "warning" not in capsys.readouterr().out  # down for 30 s: below the 60 s bound
    cb.on_trial_complete(0, [], trial)
    clock[0] = 61.0
    cb.on_step_begin(0, [])
    out = capsys.readouterr().out
    assert f"MLflow at {uri} has failed for 61 s" in out and "training goes on, 2 tracking call(s) are buffered" in out
    down[0] = False
    clock[0] = 65.0
    cb.on_step_begin(0, [])  # within 10 s of the last try: not yet
    assert len(cb.pending) == 2
    clock[0] = 72.0
    cb.on_step_begin(0, [])
    assert not cb.pending and "answers again" in capsys.readouterr().out

    client = MlflowClient(uri)
    run = client.get_run(cb.runs["t1"])
    assert run.info.status == "FINISHED" and run.data.tags["weakseg.outcome"] == "completed"
    # a resumed driver (new callback, empty caches) replays the trial's reports: no point is sent twice
    cb2 = MlflowCallback(search, load_config("demo").flat(), full_iterations=4)
    cb2.on_trial_result(0, [], trial, {"iteration": 4, "val/miou": 0.41})
    cb2.on_trial_result(0, [], trial, {"iteration": 6, "val/miou": 0.6})
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/miou")]
    assert sorted(history) == [(2, 0.2), (4, 0.4), (6, 0.6)]


def test_a_write_that_would_fill_the_disk_is_refused_and_leaves_the_old_file(tmp_path: Path, monkeypatch):
    from weakseg import io

    target = tmp_path / "search.json"
    target.write_text("old\n")
    real = os.statvfs(tmp_path)
    free = io.MIN_FREE_BYTES + 2 * real.f_frsize  # what the file system reports as free: the reserve + 2 blocks
    monkeypatch.setattr(io.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free // real.f_frsize,
                                                                    f_frsize=real.f_frsize))
    io.atomic_write_text(target, "x" * 100)  # fits, with the reserve kept
    with pytest.raises(UserError, match=f"no space left for {target}"):
        io.atomic_write_text(target, "y" * (2 * real.f_frsize + 1))
    assert target.read_text() == "x" * 100 and not list(tmp_path.glob(".*.tmp"))
