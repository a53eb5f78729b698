"""A search's MLflow runs: one experiment per search, a parent run per search, a child run per trial.

Every MLflow call of a search happens on the driver, in a Ray Tune callback
(`weakseg.search.callbacks.MlflowCallback`): trials report to Tune only, with their metrics and a
checkpoint folder that also holds the evaluation's tables and plots. So worker
nodes never need to reach the tracking server (which can stay bound to
localhost on the head node) and a local SQLite store has a single writer.

Child runs are created with `MlflowClient` and the `mlflow.parentRunId` tag
(what `mlflow.start_run(parent_run_id=...)` writes) plus a `weakseg.trial_id`
tag, and are found again by that tag when a trial is retried or a search is
resumed: a trial never gets two runs. The driver, which alone knows whether a
trial completed, was stopped early by ASHA, diverged or failed, sets the final
status. Ray's `MLflowLoggerCallback` is not used: it creates a second run for
every trial after `Tuner.restore`.

The talking to MLflow and the tags every run carries are `weakseg.tracking`'s. `SearchRun` stays
at this path: Ray pickles it, inside the callback, with a search's experiment state.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from weakseg.tracking.client import (check_reachable, ensure_experiment, log_files, log_metrics, log_params,
                                     make_sqlite_folder, mlflow_client, retry)
from weakseg.tracking.runs import (PARENT_TAG, TAG_CHECKPOINT, TAG_ERROR, TAG_MODEL, TAG_OUTCOME, TAG_ROLE,
                                   TAG_SEARCH, TAG_TRIAL, finish_system_metrics, lineage_tags, log_dataset,
                                   start_system_metrics)


class SearchRun:
    """The parent run of a search, created on the driver; found again on resume."""

    def __init__(self, uri: str, experiment: str, search_key: str):
        self.uri, self.experiment_name, self.search_key = uri, experiment, search_key
        self.experiment_id = ""
        self.run_id = ""
        self.monitor = None  # MLflow's system metrics of the driver's node, on the parent run

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles the callback holding this with the experiment state: not the sampler thread."""
        return {**self.__dict__, "monitor": None}

    def start(self, resume: bool, params: Mapping[str, Any], space_file: Path, code_version: str,
              data: Any = None) -> str:
        """Create (or, resuming, reopen) the parent run; `data`: the base config's DataFingerprint."""
        self.run_id = self._start(resume, params, space_file, code_version)
        client = mlflow_client(self.uri)
        for k, v in lineage_tags().items():
            retry(lambda: client.set_tag(self.run_id, k, v), "tagging the search run")
        if data is not None:
            log_dataset(client, self.run_id, data)
        self.monitor = start_system_metrics(self.uri, self.run_id, resume=resume)
        return self.run_id

    def _start(self, resume: bool, params: Mapping[str, Any], space_file: Path, code_version: str) -> str:
        check_reachable(self.uri)
        make_sqlite_folder(self.uri)
        client = mlflow_client(self.uri)
        self.experiment_id = ensure_experiment(self.uri, self.experiment_name)
        found = self._find_parent(client)
        if found is not None and resume:
            self.run_id = found
            retry(lambda: client.update_run(found, status="RUNNING"), "reopening the search run")
            return self.run_id
        run = retry(
            lambda: client.create_run(
                self.experiment_id,
                tags={TAG_SEARCH: self.search_key, TAG_ROLE: "search", "weakseg.code_version": code_version},
                run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            ),
            "creating the search run",
        )
        self.run_id = run.info.run_id
        log_params(client, self.run_id, params)
        log_files(client, self.run_id, {"space": space_file}, None)
        return self.run_id

    def _find_parent(self, client) -> str | None:
        key = self.search_key.replace("'", "\\'")
        runs = retry(
            lambda: client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_SEARCH}` = '{key}' and tags.`{TAG_ROLE}` = 'search'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            ),
            "looking up the search run",
        )
        return runs[0].info.run_id if runs else None

    def retire_previous(self) -> str | None:
        """Before a --restart: close the old search's parent and trial runs that are still RUNNING
        (a driver killed mid-search leaves them so) as KILLED, and move their checkpoint tags,
        which name deleted checkpoints, to `weakseg.checkpoint_deleted`. Returns the old parent's id."""
        client = mlflow_client(self.uri)
        self.experiment_id = ensure_experiment(self.uri, self.experiment_name)
        old = self._find_parent(client)
        if old is None:
            return None
        runs = retry(lambda: client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{old}'"),
                     "listing the previous search's trial runs")
        for run in [*runs, client.get_run(old)]:
            rid = run.info.run_id
            location = run.data.tags.get(TAG_CHECKPOINT)
            if location:
                retry(lambda: client.set_tag(rid, TAG_CHECKPOINT + "_deleted", location), "retagging a run")
                retry(lambda: client.delete_tag(rid, TAG_CHECKPOINT), "retagging a run")
            if run.info.status == "RUNNING":
                retry(lambda: client.set_tag(rid, TAG_OUTCOME, "restarted"), "tagging a run")
                retry(lambda: client.set_terminated(rid, status="KILLED"), "closing a run of the previous search")
        return old

    def tag(self, key: str, value: str) -> None:
        """Set a tag on the search run (e.g. how it ended, what --resume changed)."""
        client = mlflow_client(self.uri)
        retry(lambda: client.set_tag(self.run_id, key, value[:5000]), "tagging the search run")

    def children(self) -> dict[str, Any]:
        """trial id -> child run (one per trial, by construction)."""
        client = mlflow_client(self.uri)
        runs = retry(
            lambda: client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'"),
            "listing trial runs",
        )
        return {r.data.tags.get(TAG_TRIAL, r.info.run_id): r for r in runs}

    def finish(self, status: str, metrics: Mapping[str, float], files: Mapping[str, Path]) -> None:
        if self.monitor is not None:
            finish_system_metrics(self.monitor)
            self.monitor = None
        client = mlflow_client(self.uri)
        if metrics:
            log_metrics(client, self.run_id, metrics, step=0)
        log_files(client, self.run_id, files, "summary")
        retry(lambda: client.set_terminated(self.run_id, status=status), "closing the search run")

    def _runs_of_trial(self, client, trial_id: str) -> list:
        return retry(
            lambda: client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
            ),
            f"looking up the run of trial {trial_id}",
        )

    def child(self, trial_id: str, trial_name: str) -> str:
        """The run of one trial, created on first sight and found again by its tag ever after."""
        client = mlflow_client(self.uri)
        runs = self._runs_of_trial(client, trial_id)
        if runs:
            return runs[0].info.run_id
        run = retry(
            lambda: client.create_run(
                self.experiment_id,
                tags={PARENT_TAG: self.run_id, TAG_TRIAL: trial_id, TAG_ROLE: "trial", **lineage_tags()},
                run_name=trial_name,
            ),
            f"creating the run of trial {trial_id}",
        )
        return run.info.run_id

    def tag_checkpoints(self, by_trial: Mapping[str, str], best: str | None) -> None:
        """Record each trial's last checkpoint, and the chosen trial's on the parent (`export-voc --mlflow-run`)."""
        client = mlflow_client(self.uri)
        for trial_id, run in self.children().items():
            if trial_id in by_trial:
                retry(lambda: client.set_tag(run.info.run_id, TAG_CHECKPOINT, by_trial[trial_id]), "tagging a run")
        if best:
            retry(lambda: client.set_tag(self.run_id, TAG_CHECKPOINT, best), "tagging the search run")

    def log_model(self, trial_id: str, checkpoint: Path, location: str, register_as: str) -> str:
        """Log the selected trial's checkpoint as the model of its run, register it as `register_as`
        (tagged with the search, its parent run and the trial) and note it on the parent run."""
        from weakseg.tracking.models import log_checkpoint_model

        run = self.children()[trial_id]
        tags = {TAG_SEARCH: self.search_key, "weakseg.search_run_id": self.run_id, TAG_TRIAL: trial_id,
                "weakseg.trial_run_id": run.info.run_id, TAG_CHECKPOINT: location}
        uri = log_checkpoint_model(self.uri, run.info.run_id, checkpoint, register_as, tags,
                                   f"The selected trial ({trial_id}, run {run.info.run_name}) of the search "
                                   f"{self.search_key}: checkpoint {location}")
        retry(lambda: mlflow_client(self.uri).set_tag(self.run_id, TAG_MODEL, uri), "tagging the search run")
        return uri

    def close_child(self, trial_id: str, status: str, outcome: str, error: str | None = None,
                    role: str | None = None) -> None:
        """Set a trial run's final status (driver side); `role` re-tags it (e.g. "abandoned": not a trial)."""
        client = mlflow_client(self.uri)
        for r in self._runs_of_trial(client, trial_id):
            retry(lambda: client.set_tag(r.info.run_id, TAG_OUTCOME, outcome), "tagging a trial run")
            if role:
                retry(lambda: client.set_tag(r.info.run_id, TAG_ROLE, role), "tagging a trial run")
            if error:
                retry(lambda: client.set_tag(r.info.run_id, TAG_ERROR, error[:4000]), "tagging a trial run")
            retry(lambda: client.set_terminated(r.info.run_id, status=status), "closing a trial run")
