"""The MLflow bookkeeping of `weakseg.search.tracking`, on a local SQLite store (no Ray)."""

from pathlib import Path

from mlflow import MlflowClient

from weakseg.search.tracking import SearchRun


def test_restart_closes_what_a_killed_search_left_running_and_drops_dead_checkpoint_tags(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = SearchRun(uri, "exp", "/ray/exp")
    old.start(False, {"settings.samples": 2}, tmp_path / "space.yaml", "0.1.0")
    done, running = old.child("t-done", "trial done"), old.child("t-run", "trial running")
    client = MlflowClient(uri)
    client.set_tag(done, "weakseg.checkpoint", "/ray/exp/t-done/checkpoint_000001")
    old.close_child("t-done", "FINISHED", "completed")
    other = SearchRun(uri, "exp", "/ray/other")  # another search in the same experiment: not touched
    other.start(False, {}, tmp_path / "space.yaml", "0.1.0")
    other_child = other.child("t-x", "trial x")

    assert SearchRun(uri, "exp", "/ray/exp").retire_previous() == old.run_id

    parent = client.get_run(old.run_id)
    assert parent.info.status == "KILLED" and parent.data.tags["weakseg.outcome"] == "restarted"
    r = client.get_run(running)
    assert r.info.status == "KILLED" and r.data.tags["weakseg.outcome"] == "restarted"
    d = client.get_run(done)
    assert d.info.status == "FINISHED" and d.data.tags["weakseg.outcome"] == "completed"
    assert "weakseg.checkpoint" not in d.data.tags
    assert d.data.tags["weakseg.checkpoint_deleted"] == "/ray/exp/t-done/checkpoint_000001"
    assert client.get_run(other.run_id).info.status == "RUNNING"
    assert client.get_run(other_child).info.status == "RUNNING"
    assert SearchRun(uri, "exp", "/ray/never").retire_previous() is None


def test_a_resumed_training_run_reattaches_unless_its_mlflow_run_was_deleted(tmp_path: Path):
    from weakseg.config import load_config
    from weakseg.search.tracking import TrainRunReporter

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("demo", [f"tracking.uri={uri}", "tracking.experiment=e"])
    first = TrainRunReporter(cfg, tmp_path / "run")
    first.close(error=RuntimeError("power cut"))
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).data.tags["weakseg.error"] == "power cut"

    again = TrainRunReporter(cfg, tmp_path / "run", resume=True)
    assert again.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and "weakseg.error" not in run.data.tags
    again.close()

    client.delete_run(first.run_id)  # deleted in the UI: a resume starts a new run instead of failing
    third = TrainRunReporter(cfg, tmp_path / "run", resume=True)
    assert third.run_id != first.run_id
    assert (tmp_path / "run" / "mlflow_run_id").read_text().strip() == third.run_id
    assert TrainRunReporter(cfg, tmp_path / "other").run_id not in (first.run_id, third.run_id)
