"""weakseg.compat: each private Ray/Optuna/MLflow internal weakseg uses still exists and does what weakseg
relies on. A failure here after an upgrade names the internal that moved (see weakseg/compat.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from weakseg import compat

REPO = Path(__file__).resolve().parents[1]


def test_tested_versions_are_the_cluster_pins():
    text = (REPO / "cluster" / "constraints.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M))
    assert {k: pins.get(k) for k in compat.TESTED_WITH} == compat.TESTED_WITH


def test_refresh_ray_config():  # ray._raylet.Config.initialize
    compat.refresh_ray_config()


def test_autoscaler_cluster_config_shape():  # ray._private.state.state.get_cluster_config
    import ray
    from ray.core.generated import autoscaler_pb2

    if ray.is_initialized():
        pytest.skip("needs a process without a Ray session")
    with pytest.raises(Exception, match="ray.init"):  # no session: Ray's own error, which the caller tolerates
        compat.autoscaler_cluster_config()
    group = autoscaler_pb2.ClusterConfig(node_group_configs=[{"max_count": 2, "resources": {"GPU": 1}}])
    assert [dict(g.resources) for g in group.node_group_configs if g.max_count != 0] == [{"GPU": 1}]


def test_storage_fs_and_path(tmp_path: Path):  # ray.train._internal.storage.get_fs_and_path
    import pyarrow.fs

    fs, path = compat.storage_fs_and_path(str(tmp_path))
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)
    assert fs.get_file_info(path).type == pyarrow.fs.FileType.Directory


def _searcher():
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space={"x": tune.uniform(0.0, 1.0)}, metric="m", mode="max")


def test_optuna_internals_of_ray_optuna_search():  # OptunaSearch._ot_study, _ot_trials, _completed_trials
    from optuna.trial import TrialState

    s = _searcher()
    config = s.suggest("t1")
    assert compat.optuna_trial(s, "t1").params == config and compat.optuna_trial(s, "t2") is None
    s.on_trial_complete("t1", {"m": 0.25, **config})
    assert compat.completed_trials(s) == {"t1"}
    (trial,) = compat.optuna_study(s).trials
    assert trial.state == TrialState.COMPLETE and trial.value == 0.25
    assert compat.optuna_study(s.__dict__.copy()) is compat.optuna_study(s)  # the saved state: OptunaSearch.save


def test_search_budget():  # SearchGenerator._total_samples, _finished, _counter
    from ray.tune.search import SearchGenerator

    g = SearchGenerator(_searcher())
    compat.set_search_budget(g, 5)
    assert g.total_samples == 5 and not g.is_finished()
    compat.set_search_budget(g, 0)
    assert g.is_finished()


def test_tuner_configs(tmp_path: Path):  # Tuner._local_tuner._run_config, ._tune_config
    from ray import tune

    callbacks, searcher = [tune.Callback()], _searcher()
    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=2),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=callbacks))
    assert compat.restored_run_config(tuner).callbacks is callbacks
    assert compat.restored_tune_config(tuner).search_alg is searcher


def test_rsync_filter_args():  # SSHCommandRunner._create_rsync_filter_args
    assert compat.rsync_filter_args(["/data", "*.pt"], None) == ["--exclude", "/data", "--exclude", "*.pt"]
    assert compat.rsync_filter_args(None, [".gitignore"]) == ["--filter", "dir-merge,- .gitignore"]


def test_prepare_cluster_config():  # ray.autoscaler._private.util.prepare_config, validate_config
    import yaml

    cfg = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    prepared = compat.prepare_cluster_config(cfg)
    assert set(prepared["available_node_types"]) == set(cfg["available_node_types"])
    assert prepared["head_node_type"] == cfg["head_node_type"]
    with pytest.raises(Exception):
        compat.prepare_cluster_config({**cfg, "head_node_type": "no-such-type"})


def test_mlflow_tracking_uri(tmp_path: Path):  # mlflow.tracking._tracking_service.utils._use_tracking_uri
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with compat.mlflow_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_tracking_uri() == before
