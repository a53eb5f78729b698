"""Every private Ray, Optuna-through-Ray and MLflow internal weakseg relies on, behind one door.

Public APIs do not offer these (a restored Tuner's configs, Optuna's trials inside Ray's
OptunaSearch, the autoscaler's config preparation, ...), so an upgrade may move any of
them without notice. Each function here reaches exactly one, and tests/test_compat.py
checks each against the installed versions: an upgrade that moves one fails there, by
name, instead of in the middle of a search or a `ray up`.

At the top of the package rather than in `search/` because `cluster/` (the `ray up`
config validator) uses the autoscaler's internals too, and `cluster/` does not import
`search/`. Everything is imported inside the functions: importing this module imports
neither Ray nor MLflow.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

# The versions these internals were checked against: cluster/constraints.txt's pins
# (tests/test_compat.py keeps the two in step).
TESTED_WITH = {"ray": "2.60.0", "optuna": "5.1.0", "mlflow": "3.17.2"}


# ------------------------------------------------------------------ Ray core


def refresh_ray_config() -> None:
    """Re-read Ray's environment-driven config (`ray._raylet.Config`), which Ray caches when imported."""
    from ray._raylet import Config

    Config.initialize("")


def autoscaler_cluster_config() -> Any:
    """The autoscaler's cluster config in the GCS (`ray._private.state`): its node groups, or None."""
    import ray._private.state

    return ray._private.state.state.get_cluster_config()


def storage_fs_and_path(path: str) -> tuple[Any, str]:
    """(pyarrow file system, path) of a storage path, resolved as Ray Tune resolves it
    (`ray.train._internal.storage.get_fs_and_path`)."""
    from ray.train._internal.storage import get_fs_and_path

    return get_fs_and_path(path)


# ------------------------------------------------------------------ Ray Tune


def restored_run_config(tuner: Any) -> Any:
    """The RunConfig inside a `Tuner` (`tuner._local_tuner._run_config`); Tuner.restore has no accessor."""
    return tuner._local_tuner._run_config


def restored_tune_config(tuner: Any) -> Any:
    """The TuneConfig inside a `Tuner` (`tuner._local_tuner._tune_config`); Tuner.restore takes no new one."""
    return tuner._local_tuner._tune_config


def set_search_budget(generator: Any, samples: int) -> None:
    """Give a `SearchGenerator` a new trial budget (its `_total_samples`, `_finished` from `_counter`)."""
    generator._total_samples = samples
    generator._finished = generator._counter >= samples


def optuna_study(searcher: Any) -> Any:
    """The Optuna study inside Ray's OptunaSearch (`_ot_study`), or inside its saved state (a dict)."""
    return searcher["_ot_study"] if isinstance(searcher, dict) else searcher._ot_study


def optuna_trial(searcher: Any, trial_id: str) -> Any:
    """The Optuna trial OptunaSearch asked for a Tune trial (`_ot_trials`), or None."""
    return searcher._ot_trials.get(trial_id)


def completed_trials(searcher: Any) -> set[str]:
    """The Tune trial ids OptunaSearch has told Optuna about (`_completed_trials`); add to it after telling."""
    return searcher._completed_trials


# ------------------------------------------------------------------ Ray autoscaler (`ray up` configs)


def rsync_filter_args(rsync_exclude: Any, rsync_filter: Any) -> list[str]:
    """The rsync arguments `ray up` syncs file mounts with (`SSHCommandRunner._create_rsync_filter_args`)."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    return SSHCommandRunner._create_rsync_filter_args(
        None, {"rsync_exclude": rsync_exclude, "rsync_filter": rsync_filter})


def prepare_cluster_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A launcher config after Ray's credential-free preparation and check (`ray.autoscaler._private.util`)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cfg)
    validate_config(prepared)
    return prepared


# ------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def mlflow_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API on `uri`, the process's tracking URI restored afterwards
    (`mlflow.tracking._tracking_service.utils._use_tracking_uri`)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield
