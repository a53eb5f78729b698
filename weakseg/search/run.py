"""`weakseg search`: a Ray Tune search (Optuna TPE, optional ASHA) whose trials are `engine.fit` runs.

Local by default (`ray.init()` starts a Ray on this machine); `--address` or
RAY_ADDRESS connects to a cluster, where the same command runs unchanged.
Before anything starts, the space is validated and the per-trial resources are
checked against what the cluster can ever offer: a GPU request on a cluster
without GPUs would otherwise wait in PENDING forever.

Early stopping and TPE: trials ASHA stops early are told to Optuna as PRUNED,
not COMPLETE with their early score (see `searcher.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import weakseg
from weakseg.errors import UserError
from weakseg.search.results import OK_OUTCOMES
from weakseg.search.space import SearchSpace
from weakseg.search.trial import TrialSetup, run_trial


@dataclass
class SearchOutcome:
    results_dir: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    best_trial: str | None
    best_value: float  # the best trial's metric at its last evaluation
    export_path: Path | None = None
    model_uri: str | None = None  # models:/NAME/VERSION of the selected model
    interrupted: str | None = None  # the signal that stopped the search (SIGINT, SIGTERM); None: it ended
    trials_ok: int = 0  # trials that completed or were stopped early by the scheduler


def code_version() -> str:
    """weakseg's version plus the git commit when run from a checkout (fixed arguments only)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{weakseg.__version__}+{sha}" if sha else weakseg.__version__


def plan(space: SearchSpace) -> str:
    """The human-readable plan printed by --dry-run (and at the start of a search)."""
    s = space.settings
    lines = [
        f"search {space.name}: {s.samples} trials of {space.full_iterations} iterations, "
        f"{s.max_concurrent} at a time, each {{cpu: {s.resources.cpu:g}, gpu: {s.resources.gpu:g}}}",
        f"  base config   {space.base}",
        f"  optimise      {s.metric} ({s.mode}), Optuna {'TPE' if s.sampler == 'tpe' else 'grid'} sampler, "
        f"seed {s.seed}",
        f"  scheduler     " + (f"ASHA on iterations: grace {s.scheduler.grace}, max_t {s.scheduler.max_t}, "
                               f"reduction {s.scheduler.reduction_factor}" if s.scheduler.type == "asha" else "none"),
        f"  retries       {s.max_failures} per trial, from its last checkpoint",
        f"  ray storage   {s.storage_path}/{space.name}",
        f"  results       {space.results_dir}",
        f"  mlflow        {space.tracking_uri} (experiment {space.experiment!r})",
    ]
    if space.params:
        lines.append("  parameters:")
        w = max(len(p.key) for p in space.params)
        lines += [f"    {p.key:<{w}}  {p.describe()}" for p in space.params]
    if space.fixed:
        lines.append("  fixed:")
        lines += [f"    {k} = {v.value!r}" for k, v in space.fixed.items()]
    if s.pseudo_labels is not None:
        pl = s.pseudo_labels
        lines.append(f"  second stage  trials train on pseudo labels from {pl.checkpoint} (threshold {pl.threshold:g}, "
                     f"{'CRF' if pl.crf else 'no CRF'}), written first to {space.pseudo_root}")
    if space.export:
        lines.append(f"  then export the best model on split {space.export.split!r} for the VOC server")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ ray


def init_ray(address: str | None) -> None:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local Ray bound to this machine."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        try:
            ray.init(address=target, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(f"--address {target}: no Ray cluster answers there ({str(e).splitlines()[0]})") from None
        return
    # Ray's gRPC servers listen on every interface: token authentication (prepare_local_auth) guards them.
    ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False)


def probe_address(target: str) -> None:
    """Fail fast when nothing listens at HOST:PORT: ray.init would retry there for a very long time."""
    if target == "auto" or "://" in target:
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {target}: expected HOST:PORT, auto, or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5):
            pass
    except OSError as e:
        raise UserError(f"--address {target}: no Ray cluster answers there ({e.strerror or e})") from None


def prepare_local_auth(address: str | None) -> None:
    """Token authentication for a local Ray, made explicit (must run before ray is imported).

    Ray 2.60 switches token auth on implicitly when RAY_AUTH_MODE is unset; with the mode set
    explicitly it expects the token to exist already, so create it when needed. A cluster's
    own mode (--address / RAY_ADDRESS) is left alone.
    """
    if address or os.environ.get("RAY_ADDRESS"):
        return
    # nothing phones home from a local run unless the user asks for it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"].lower() == "token":
        ensure_auth_token()
    if "ray" in sys.modules:  # ray caches its config at import: refresh it
        from weakseg.compat import refresh_ray_config

        refresh_ray_config()


def ensure_auth_token() -> None:
    """Create Ray's default token file (~/.ray/auth_token, mode 0600) unless a token is configured."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path("~/.ray/auth_token").expanduser()
    if path.is_file() and path.read_text().strip():
        return
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the node types the cluster's autoscaler could still start.

    From the autoscaler's cluster config in the GCS (where Ray's autoscaler, `ray up`'s and KubeRay's,
    publishes its node groups), else from `ray up`'s bootstrap config on the head node.
    """
    out: list[dict[str, float]] = []
    try:
        from weakseg.compat import autoscaler_cluster_config

        config = autoscaler_cluster_config()
        for group in (config.node_group_configs if config is not None else []):
            if group.max_count != 0:
                out.append({k: float(v) for k, v in group.resources.items()})
    except Exception:  # a private Ray API (no GCS to ask, or moved): the bootstrap config below may still say
        pass
    path = Path("~/ray_bootstrap_config.yaml").expanduser()
    if path.is_file():
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            cfg = {}
        for t in (cfg.get("available_node_types") or {}).values():
            if (t.get("max_workers", 1) or 0) > 0 or t.get("min_workers"):
                out.append(dict(t.get("resources") or {}))
    return out


def check_resources(cpu: float, gpu: float) -> None:
    """Fail fast when no node of the cluster, now or after autoscaling, can run one trial."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    candidates = nodes + autoscaler_node_types()

    def fits(r: dict[str, float]) -> bool:
        return r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu

    if any(fits(r) for r in candidates):
        return
    have = ", ".join(sorted({f"{{CPU: {r.get('CPU', 0):g}, GPU: {r.get('GPU', 0):g}}}" for r in nodes})) or "none"
    hint = (" Set settings.resources.gpu: 0 to train on CPUs, or run on a cluster with GPU workers."
            if gpu > 0 and not any(r.get("GPU", 0) > 0 for r in candidates) else "")
    raise UserError(
        f"settings.resources asks {{cpu: {cpu:g}, gpu: {gpu:g}}} per trial, but no node of this Ray cluster "
        f"has that much (nodes: {have}); the trials would wait in PENDING forever.{hint}"
    )


# ---------------------------------------------------------------------------- search


def run_search(space: SearchSpace, *, resume: bool = False, address: str | None = None,
               check: bool = True, restart: bool = False, apply_safe_changes: bool = False) -> SearchOutcome:
    """Run (or resume) a search while holding its lock: one driver per experiment."""
    from weakseg.search.lifecycle import SearchLock

    if resume and restart:
        raise UserError("--resume and --restart contradict each other: pick one")
    lock = SearchLock(f"{space.settings.storage_path.rstrip('/')}/{space.name}", space.name)
    lock.acquire()
    try:
        return _run_search(space, resume=resume, address=address, check=check, restart=restart,
                           apply_safe_changes=apply_safe_changes, lock=lock)
    finally:
        lock.release()


def _run_search(space: SearchSpace, *, resume: bool, address: str | None, check: bool, restart: bool,
                apply_safe_changes: bool, lock: Any) -> SearchOutcome:
    """The search's phases: refuse or prepare, open the parent run, build the Tuner, run, summarise."""
    from weakseg.search.lifecycle import Interruption, write_space_record
    from weakseg.tracking.client import quiet_mlflow

    exp_path, previous, changes = _refuse_or_prepare(space, resume=resume, address=address, check=check,
                                                     restart=restart, apply_safe_changes=apply_safe_changes)
    parent = _open_parent_run(space, exp_path, previous=previous, resume=resume, restart=restart, changes=changes)
    started = time.time()
    try:
        tuner, callback = _build_tuner(space, parent, exp_path, resume=resume, changes=changes)
        with Interruption(lambda sig: _abandon(space, parent, sig, lock)) as interruption:
            grid = tuner.fit()
    except KeyboardInterrupt:  # a second signal: no summary, the parent run says so
        with quiet_mlflow():
            parent.tag("weakseg.outcome", "interrupted")
            parent.finish("KILLED", {}, {})
        raise
    if changes:
        write_space_record(exp_path, space)  # the applied changes are now the search's space
    unfinished = set()
    if interruption.signal:  # trials Tune had not finished when the signal came: cut, to be resumed
        unfinished = {t for t, st in callback.status.items() if st not in ("TERMINATED", "ERROR")}
    try:
        return _finish(space, parent, grid, time.time() - started, interruption.signal, unfinished)
    except UserError as e:  # e.g. no space left for the summaries: the parent run must not stay RUNNING
        import contextlib

        with quiet_mlflow(), contextlib.suppress(Exception):
            parent.tag("weakseg.error", str(e))
            parent.finish("FAILED", {}, {})
        raise


def _refuse_or_prepare(space: SearchSpace, *, resume: bool, address: str | None, check: bool, restart: bool,
                       apply_safe_changes: bool) -> tuple[str, bool, dict]:
    """Every check that can refuse the search, then Ray started: (experiment path, whether a previous
    search is there, the space changes a --resume applies)."""
    prepare_local_auth(address)
    # Ray's newer console output prints every reported metric (21 IoUs per line); the classic
    # reporter shows the columns chosen below. Read when ray.tune runs, so set it first.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # every reported checkpoint snapshots the experiment (what makes --resume lose nothing): not a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # a tracking server that is down must fail a call in seconds, not minutes (MLflow retries 7 times with
    # backoff): the callback buffers failed calls and reports the outage while training goes on
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from ray import tune

    from weakseg.data import build
    from weakseg.search import lifecycle
    from weakseg.tracking.client import check_reachable

    s = space.settings
    exp_path = f"{s.storage_path.rstrip('/')}/{space.name}"
    restorable = tune.Tuner.can_restore(exp_path)
    previous = restorable or _experiment_exists(exp_path)
    if resume and not restorable:
        raise UserError(f"--resume: no search to resume at {exp_path}")
    changes: dict = {}
    if resume:
        lifecycle.check_state(exp_path)
        recorded = lifecycle.read_space_record(exp_path)
        if recorded is None:
            print(f"note: {exp_path} has no record of the space it started with (an older weakseg); "
                  "resuming without comparing", flush=True)
        else:
            changes = lifecycle.check_space_changes(
                lifecycle.space_changes(recorded, lifecycle.space_record(space)), apply_safe_changes, space)
    if previous and not (resume or restart):
        raise UserError(
            f"a search named {space.name!r} already exists at {exp_path}: "
            "pass --resume to continue it, --restart to start it over, or change `name` in the space file"
        )

    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        probe_address(target)
    check_reachable(space.tracking_uri)  # before Ray starts: an unreachable server fails in a second
    if "://" not in s.storage_path:  # checkpoints go there: a search that would fill the disk does not start
        from weakseg.io import check_free_space

        Path(s.storage_path).mkdir(parents=True, exist_ok=True)
        check_free_space(Path(s.storage_path), 256 << 20, f"the search's checkpoints (settings.storage_path)")
    init_ray(address)
    if check:
        check_resources(s.resources.cpu, s.resources.gpu)
    cfg = space.base_config
    if cfg.data.dataset == "synthetic":
        build.ensure_synthetic(cfg.data)  # once here rather than racing in the first trials
    if s.pseudo_labels is not None:  # the second stage's labels, before anything reads the training set
        from weakseg.crf import CRFParams
        from weakseg.pseudo import ensure_pseudo_labels

        ensure_pseudo_labels(Path(s.pseudo_labels.checkpoint), space.pseudo_root,
                             data_root=build.ensure_synthetic(cfg.data), threshold=s.pseudo_labels.threshold,
                             crf=CRFParams() if s.pseudo_labels.crf else None, replace=not resume)
    return exp_path, previous, changes


def _open_parent_run(space: SearchSpace, exp_path: str, *, previous: bool, resume: bool, restart: bool,
                     changes: dict) -> Any:
    """The search's MLflow parent run (a --restart first retires the previous search), and search.json."""
    from weakseg.data.fingerprint import fingerprint
    from weakseg.search.tracking import SearchRun
    from weakseg.tracking.client import quiet_mlflow

    search_key = exp_path
    with quiet_mlflow():
        parent = SearchRun(space.tracking_uri, space.experiment, search_key)
        if restart:  # only now, after every check that could still refuse to start
            from weakseg.search.results import SUMMARY_FILES

            retired = parent.retire_previous()  # first: even if the Ray state is already gone
            if previous:
                _delete_experiment(exp_path)
            for stale in SUMMARY_FILES:  # the old search's tables name checkpoints that are gone
                (space.results_dir / stale).unlink(missing_ok=True)
            print(f"--restart: removed the previous search state at {exp_path}"
                  + (f"; MLflow keeps its run {retired} (anything left RUNNING is now KILLED)" if retired else ""),
                  flush=True)
        parent.start(
            resume,
            params={**{f"settings.{k}": v for k, v in _settings_params(space).items()},
                    **{f"space.{p.key}": p.describe() for p in space.params},
                    **{f"fixed.{k}": v.value for k, v in space.fixed.items()}},
            space_file=space.path,
            code_version=code_version(),
            data=fingerprint(space.base_config),
        )
        for key, (before, after) in changes.items():  # MLflow params are immutable: the change is a tag
            parent.tag(f"weakseg.resumed.{key}", f"{before} -> {after}")
    _write_search_json(space, parent, "running")  # export-voc --best refuses a running search
    print(plan(space), flush=True)
    print(f"MLflow parent run {parent.run_id}", flush=True)
    return parent


def _build_tuner(space: SearchSpace, parent: Any, exp_path: str, *, resume: bool, changes: dict) -> tuple[Any, Any]:
    """(Tuner, MlflowCallback): restored for --resume, else new (and the space recorded beside it)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from weakseg.search.callbacks import MlflowCallback
    from weakseg.search.lifecycle import write_space_record
    from weakseg.search.searcher import EarlyStopAwareOptunaSearch

    s = space.settings
    setup = TrialSetup(base_values=space.base_values(), metric=s.metric)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": s.resources.cpu, "gpu": s.resources.gpu},
    )
    full = space.full_iterations
    if resume:
        try:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
        except Exception as e:  # a truncated or foreign tuner.pkl: one line, no fresh search
            raise UserError(f"--resume: the search state at {exp_path} cannot be restored "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                            "--restart starts it over (MLflow keeps its runs)") from None
        callback = _mlflow_callback_of(tuner)
        if "settings.samples" in changes:
            from weakseg.search.searcher import resize_restored_search

            resize_restored_search(tuner, s.samples)
        return tuner, callback
    searcher = EarlyStopAwareOptunaSearch(
        space=space.optuna_space(), metric=s.metric, mode=s.mode, sampler=_sampler(space),
        full_iterations=full,
    )
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="iteration", metric=s.metric, mode=s.mode, max_t=s.scheduler.max_t,
            grace_period=s.scheduler.grace, reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    callback = MlflowCallback(parent, space.base_values(), full)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler,
            num_samples=s.samples,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=s.storage_path,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # only the latest checkpoint: the one a trial's final score is of (what the search
            # reports and exports) and the one a retry resumes from; none is picked on val
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[callback],
            progress_reporter=tune.CLIReporter(
                metric_columns={"iteration": "iter", s.metric: s.metric, "train/loss": "loss"},
                parameter_columns=[p.key for p in space.params],
                max_report_frequency=30,
                sort_by_metric=True,
                metric=s.metric,
                mode=s.mode,
            ),
            verbose=1,
        ),
    )
    write_space_record(exp_path, space)  # the Tuner has created the experiment folder
    return tuner, callback


def _abandon(space: SearchSpace, parent: Any, signal_name: str, lock: Any) -> None:
    """The last acts of a driver whose Ray is gone: no run left RUNNING, the status written, the lock freed."""
    import contextlib
    import shlex

    from weakseg.tracking.client import quiet_mlflow

    with quiet_mlflow(), contextlib.suppress(Exception):
        for trial_id, run in parent.children().items():
            if run.info.status == "RUNNING":
                parent.close_child(trial_id, "KILLED", "interrupted", error=f"interrupted by {signal_name}")
        parent.tag("weakseg.outcome", "interrupted")
        parent.tag("weakseg.error", f"interrupted by {signal_name}")
        parent.finish("KILLED", {}, {})
    with contextlib.suppress(Exception):
        _write_search_json(space, parent, "interrupted", interrupted_by=signal_name)
    lock.release()
    print(f"weakseg search: interrupted by {signal_name}: the search is incomplete; continue it with\n"
          f"  weakseg search {shlex.quote(str(space.path))} --resume", file=sys.stderr, flush=True)


def _mlflow_callback_of(tuner: Any) -> Any:
    """The MlflowCallback restored with the Tuner (Ray pickles the run config, callbacks included)."""
    from weakseg.search.callbacks import MlflowCallback

    from weakseg.compat import restored_run_config

    callbacks = restored_run_config(tuner).callbacks or []
    found = [c for c in callbacks if isinstance(c, MlflowCallback)]
    if not found:
        raise UserError("--resume: the restored search has no weakseg MLflow callback (not a weakseg search?)")
    return found[0]


def _write_search_json(space: SearchSpace, parent: Any, status: str, **fields: Any) -> None:
    """results/<name>/search.json: what the search is (status running | finished | interrupted | failed)."""
    from weakseg.io import atomic_write_text

    s = space.settings
    atomic_write_text(space.results_dir / "search.json", json.dumps({
        "name": space.name, "space": str(space.path), "tracking_uri": space.tracking_uri,
        "experiment": space.experiment, "parent_run_id": parent.run_id, "storage": f"{s.storage_path}/{space.name}",
        "status": status, "complete": status == "finished",
        "best_trial": None, "best_value": None, "best_checkpoint": None, **fields,
    }, indent=2) + "\n")


def _experiment_fs(exp_path: str):
    """(filesystem, path) of a Ray experiment folder, resolved as Ray Tune resolves storage paths
    (pyarrow, with fsspec for schemes pyarrow lacks), so weakseg and Tune agree on what is there."""
    from weakseg.compat import storage_fs_and_path

    return storage_fs_and_path(exp_path if "://" in exp_path else str(Path(exp_path).resolve()))


def _experiment_exists(exp_path: str) -> bool:
    """Anything at the experiment path, even a search too broken to restore."""
    import pyarrow.fs

    try:
        fs, path = _experiment_fs(exp_path)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except Exception as e:  # pyarrow raises OSError or ArrowInvalid (a ValueError), fsspec its own
        raise UserError(f"settings.storage_path: cannot read {exp_path} ({e})") from None


def _delete_experiment(exp_path: str) -> None:
    try:
        fs, path = _experiment_fs(exp_path)
        fs.delete_dir(path)
    except Exception as e:  # pyarrow raises OSError or ArrowInvalid, fsspec its own: each is the user's to see
        raise UserError(f"--restart: could not remove the previous search at {exp_path} ({e})") from None


def _sampler(space: SearchSpace):
    import optuna

    if space.settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=space.settings.seed)
    return optuna.samplers.TPESampler(seed=space.settings.seed)


def _settings_params(space: SearchSpace) -> dict[str, Any]:
    out = {}
    for k, v in dataclasses.asdict(space.settings).items():
        if k == "pseudo_labels" and v is None:
            continue  # unset: recorded as before it existed, so older searches resume unchanged
        if k == "mlflow":
            out.update(v)  # settings.tracking_uri, ...: recorded as before settings.mlflow was a dataclass
        elif isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _finish(space: SearchSpace, parent: Any, grid: Any, seconds: float, interrupted: str | None = None,
            unfinished: set[str] = frozenset()) -> SearchOutcome:
    from weakseg.config import build_config, mapping_settings
    from weakseg.search.results import chosen_trial, rows_from_results, write_summary
    from weakseg.tracking.client import quiet_mlflow

    s = space.settings
    rows = rows_from_results(grid, s.metric, s.mode, space.full_iterations)
    for r in rows:
        if r.trial_id in unfinished:  # cut by the signal, not stopped early: never a result, never the best
            r.outcome = "interrupted"
    best_cfg = None
    top = chosen_trial(rows, s.mode)
    if top is not None:
        best_cfg = build_config(mapping_settings({**space.base_values(), **top.params}, "best", None)).to_dict()
    incomplete = (f"interrupted by {interrupted}: resume with `weakseg search {space.path} --resume`"
                  if interrupted else None)
    summary = write_summary(rows, space.results_dir, metric=s.metric, mode=s.mode, best_config=best_cfg,
                            title=f"Search `{space.name}`", incomplete=incomplete)
    ok = sum(r.outcome in OK_OUTCOMES for r in rows)
    status = "interrupted" if interrupted else ("finished" if ok else "failed")
    _write_search_json(
        space, parent, status, interrupted_by=interrupted,
        best_trial=summary.best.trial_id if summary.best else None,
        # the chosen trial's last evaluation and last checkpoint (trials ranked by their final score)
        best_value=summary.best.final if summary.best else None,
        best_checkpoint=summary.best.checkpoint if summary.best else None,
        selection="trials ranked by the metric at their last evaluation; the reported model is the "
                  "chosen trial's last checkpoint",
        search_seconds=seconds, trials=len(rows), trials_ok=ok,
    )
    best = summary.best
    metrics = {}
    if best is not None:
        # the chosen trial's last evaluation: the score of the checkpoint the search reports and exports
        metrics = {f"final/{s.metric}": best.final, **{f"final/val/iou/{c}": v for c, v in best.per_class.items()}}
    metrics["trials"] = float(len(rows))
    metrics["trials_failed"] = float(sum(r.outcome in ("failed", "diverged") for r in rows))
    with quiet_mlflow():
        _reconcile_children(parent, rows, interrupted)
        parent.tag_checkpoints({r.trial_id: r.checkpoint for r in rows if r.checkpoint},
                               best.checkpoint if best is not None else None)
        if interrupted:
            parent.tag("weakseg.outcome", "interrupted")
            parent.tag("weakseg.error", f"interrupted by {interrupted}")
        elif not ok:
            parent.tag("weakseg.outcome", "failed")
            parent.tag("weakseg.error", "no trial succeeded")
        model_uri = None if interrupted else _log_model(space, parent, best)
        parent.finish("KILLED" if interrupted else ("FINISHED" if ok else "FAILED"), metrics, summary.files)
    export_path = None
    if space.export is not None and best is not None and not interrupted:
        from weakseg.export import export_voc, upload_instructions
        from weakseg.search.checkpoints import resolve_checkpoint

        crf = None
        if space.export.crf:
            from weakseg.crf import CRFParams

            crf = CRFParams()
        split = space.export.split
        export_path = export_voc(resolve_checkpoint(best.checkpoint), space.results_dir / f"voc_{split}_submission.tar.gz",
                                 split=split, crf=crf, force=True)
        print(upload_instructions(export_path, split))
    return SearchOutcome(space.results_dir, space.tracking_uri, space.experiment, parent.run_id,
                         best.trial_id if best else None, best.final if best else math.nan, export_path, model_uri,
                         interrupted, ok)


def _log_model(space: SearchSpace, parent: Any, best: Any) -> str | None:
    """The selected trial's checkpoint (the one trials.md names) as a registered MLflow model."""
    if best is None or not best.checkpoint:
        return None
    from weakseg.search.checkpoints import resolve_checkpoint

    uri = parent.log_model(best.trial_id, resolve_checkpoint(best.checkpoint), best.checkpoint, space.register_as)
    print(f"MLflow model: {uri} (trial {best.trial_id})", flush=True)
    return uri


def _reconcile_children(parent: Any, rows: list, interrupted: str | None = None) -> None:
    """No child run stays RUNNING: close any the callbacks missed (e.g. after a driver crash or a signal)."""
    by_id = {r.trial_id: r for r in rows}
    for trial_id, run in parent.children().items():
        row = by_id.get(trial_id)
        if row is not None and row.outcome == "interrupted":  # also one Tune closed as if it had finished
            parent.close_child(trial_id, "KILLED", "interrupted", error=f"interrupted by {interrupted}")
            continue
        if run.info.status != "RUNNING":
            continue
        if row is None:
            # started by a driver that died before saving it: the resumed search never had this trial
            parent.close_child(trial_id, "KILLED", "abandoned", role="abandoned")
        elif row.outcome in ("failed", "diverged"):
            parent.close_child(trial_id, "FAILED", row.outcome, error=row.error)
        else:
            parent.close_child(trial_id, "FINISHED", row.outcome)
