"""The MLflow bookkeeping of `weakseg.tracking` and `weakseg.search.tracking`, on a local SQLite store (no Ray)."""

from pathlib import Path

from mlflow import MlflowClient

from weakseg.compat import mlflow_tracking_uri
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
    from weakseg.tracking.runs import TrainRunReporter

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


def test_weakseg_train_logs_its_last_checkpoint_as_a_model_with_lineage(tmp_path: Path, tiny_overrides,
                                                                         synth_root: Path, capsys, monkeypatch):
    import mlflow
    import numpy as np
    import torch

    from weakseg.checkpoint import load_model
    from weakseg.cli import main
    from weakseg.engine import predict_probs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*tiny_overrides, "optim.iterations=2", "train.eval_every=2", f"tracking.uri={uri}", "tracking.experiment=e"]
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.data.tags["weakseg.role"] == "train" and "mlflow.source.git.commit" in run.data.tags
    assert not any(np.isnan(v) for v in run.data.metrics.values())  # absent classes are skipped, not NaN
    assert run.data.metrics["final/val/miou"] == run.data.metrics["val/miou"]
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "synthetic:train+val"

    with mlflow_tracking_uri(uri):
        (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        model = mlflow.pyfunc.load_model(logged.model_uri)
    assert logged.source_run_id == run.info.run_id
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    net, _, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    want = predict_probs(net, torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(model.predict(images), want)

    # registered and promoted, it is a source for export-voc (an alias) and a clear error when it isn't there
    import tarfile

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the model version's source resolves in the default store
    client.create_registered_model("m")
    version = client.create_model_version("m", logged.model_uri, run.info.run_id)
    client.set_registered_model_alias("m", "champion", version.version)
    out = tmp_path / "voc.tar.gz"
    assert main(["export-voc", "models:/m@champion", "--tracking-uri", uri, "--split", "test", "--out", str(out),
                 "--workers", "0"]) == 0
    test_ids = (synth_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    with tarfile.open(out) as tar:
        assert sorted(Path(m.name).stem for m in tar.getmembers() if m.name.endswith(".png")) == sorted(test_ids)
    assert main(["evaluate", "models:/m/7", "--tracking-uri", uri]) == 2
    assert "models:/m/7: cannot load it from" in capsys.readouterr().err


def test_the_dataset_digest_follows_the_split_files(tmp_path: Path, synth_root: Path):
    import shutil

    from weakseg.config import load_config
    from weakseg.data.fingerprint import fingerprint

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    cfg = load_config("demo", ["data.dataset=synthetic", f"data.root={root}"])
    before = fingerprint(cfg)
    assert before.images == {"train": 16, "val": 6}
    voc = root / "VOCdevkit" / "VOC2012"
    first_val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    image = voc / "JPEGImages" / f"{first_val}.jpg"
    data = image.read_bytes()
    image.write_bytes(data + b"\0")  # one byte more in one listed image
    assert fingerprint(cfg).digest != before.digest
    image.write_bytes(data)
    assert fingerprint(cfg).digest == before.digest
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    ids = split.read_text().split()
    split.write_text("\n".join(ids[:-1]) + "\n")  # one id fewer in the split list
    assert fingerprint(cfg).digest != before.digest


def test_a_search_shorter_than_one_sampling_interval_still_gets_system_metrics(tmp_path: Path):
    """MLflow samples every 10 s and drops the interval it is stopped in; the parent run must not end bare."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = SearchRun(uri, "exp", "/ray/short")
    run.start(False, {}, tmp_path / "space.yaml", "0.1.0")
    assert run.monitor is not None, "psutil is a dependency: the sampler must start"
    run.finish("FINISHED", {"trials": 1.0}, {})  # well inside the first 10 s interval
    metrics = MlflowClient(uri).get_run(run.run_id).data.metrics
    cpu = [k for k in metrics if k.startswith("system/cpu_utilization")]
    assert cpu and 0.0 <= metrics[cpu[0]] <= 100.0 * 64, sorted(metrics)
