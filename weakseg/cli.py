"""The `weakseg` command line: one verb per stage (train, evaluate, search, export-voc, make-synthetic).

Each verb parses its arguments, calls one library function and prints where
its outputs are. Bad input ends with one line naming the culprit and exit
status 2; nothing here shells out.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from weakseg.errors import UserError

if TYPE_CHECKING:  # the CLI imports its verbs' modules when they run
    from weakseg.crf import CRFParams

EXIT_USER_ERROR = 2
VOC2012_VAL_IMAGES = 1449  # `evaluate` shows the paper's reference numbers on this set only
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- verbs


def cmd_train(args: argparse.Namespace) -> int:
    from weakseg.config import load_config
    from weakseg.engine import fit

    cfg = load_config(args.config, args.set)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.resume and args.out is None:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_dir.resolve()
    resume_from = None
    if args.resume:
        resume_from = run_dir / "checkpoints" / "last.pt"
        _check_resumable(resume_from, cfg)
    elif (run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or another --out")
    reporter = ConsoleReporter()
    if cfg.tracking.uri or cfg.tracking.experiment:
        from weakseg.tracking.runs import TrainRunReporter

        reporter = TrainRunReporter(cfg, run_dir, inner=reporter, resume=args.resume)
    print(f"weakseg train: {cfg.name} -> {run_dir}", flush=True)
    with ClosingReporter(reporter):
        state = fit(cfg, run_dir, resume_from=resume_from, reporter=reporter)
    # The result is the last evaluation, of the model in last.pt; the peak is picked on the same
    # val images, so it is shown only as labelled information (docs/method.md, "Model selection").
    print(f"done: {state.iteration} iterations, val mIoU {_pct(state.final_miou)} (last evaluation; "
          f"peak over evaluations {_pct(state.best_miou)}, picked on val: not a result)")
    print(f"checkpoint: {run_dir / 'checkpoints' / 'last.pt'}  tables and plots: {run_dir / 'eval'}")
    return 0


def _check_resumable(path: Path, cfg) -> None:
    """Resuming with a different model or loss would silently mix two experiments."""
    from weakseg.checkpoint import checkpoint_config, load_checkpoint

    state = load_checkpoint(path)
    old = checkpoint_config(state, path).flat()
    new = cfg.flat()
    # how the run executes or reports may change; what it computes may not (train.seed picks the data stream)
    free = tuple(f"train.{k}" for k in ("device", "amp", "channels_last", "compile", "pin_memory",
                                        "persistent_workers", "eval_every", "checkpoint_every", "log_every", "progress",
                                        "overlays", "collapse_after", "collapse_auc"))
    free += ("optim.iterations", "data.workers", "data.val_limit", "tracking.")
    diff = [k for k in new if not k.startswith(free) and old.get(k) != new[k]]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff[:4])
        raise UserError(f"--resume: the config differs from the run in {path.parent.parent} ({shown})")


class ConsoleReporter:
    """One line per evaluation on stdout."""

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        pass

    def evaluated(self, iteration, scalars, result, final) -> None:
        b = scalars.get("val/boundary_iou", float("nan"))
        print(
            f"iter {iteration:>6}  val mIoU {_pct(result.metrics.miou)}  boundary IoU {_pct(b)}  "
            f"({result.images} images, {result.seconds:.1f} s)",
            flush=True,
        )


class ClosingReporter:
    """Close a reporter (e.g. end its MLflow run with the right status) however training ends."""

    def __init__(self, reporter) -> None:
        self.reporter = reporter

    def __enter__(self):
        return self.reporter

    def __exit__(self, exc_type, exc, tb) -> None:
        close = getattr(self.reporter, "close", None)
        if close is not None:
            close(error=exc)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from weakseg.checkpoint import load_model
    from weakseg.data import build
    from weakseg.data.classes import VOC_CLASSES
    from weakseg.engine import amp_dtype, evaluate, resolve_device
    from weakseg.report import CLASSES_MD, write_eval_artifacts

    crf = _crf_params(args) if args.crf else None  # first: a missing extra fails before anything is loaded
    device = resolve_device(args.device)
    ckpt = _model_checkpoint(args.checkpoint, args.tracking_uri) or Path(args.checkpoint)
    model, cfg, _ = load_model(ckpt, device)
    root = Path(args.data).resolve() if args.data else None
    try:
        ds = build.eval_dataset(cfg, split=args.split, root=root)
    except UserError as e:
        if "mask file(s) missing" not in str(e) or _split_has_masks(cfg, args.split, root):
            raise
        raise UserError(f"split {args.split!r} has no masks to score against{' (VOC test masks are not public)' if args.split == 'test' else ''}: "
                        f"write a submission with `weakseg export-voc {args.checkpoint} --split {args.split}` "
                        "and score it on the PASCAL VOC evaluation server") from None
    voc_val = len(ds) == VOC2012_VAL_IMAGES and args.limit == 0  # the paper's numbers are for this set only
    ds = build.limit(ds, args.limit)
    loader = build.eval_loader(ds, build.LoaderOptions(workers=args.workers, pin_memory=device.type == "cuda"))
    result = evaluate(
        model, loader, device, cfg.model.num_classes, amp=amp_dtype(cfg, device), crf=crf,
        crf_workers=args.crf_workers, overlays=args.overlays, progress=sys.stderr.isatty(),
    )
    tag = f"eval-{args.split}" + ("-crf" if crf else "")
    if args.out:
        out = Path(args.out).resolve()
    elif args.checkpoint.startswith(MODELS):  # not the download's temporary folder
        out = Path("runs").resolve() / args.checkpoint[len(MODELS):].replace("/", "-").replace("@", "-") / tag
    else:
        out = ckpt.resolve().parent.parent / tag
    names = list(VOC_CLASSES[: cfg.model.num_classes])
    reference = None
    if cfg.data.dataset != "synthetic" and voc_val and cfg.model.num_classes == 21:
        from weakseg.report import PAPER_TABLE1_OURS

        reference = PAPER_TABLE1_OURS
    files = write_eval_artifacts(result, names, out, reference=reference, iou_bars=True)
    scalars = result.scalars(args.split)
    _write_json(out / "metrics.json", scalars)
    print(files[CLASSES_MD].read_text(), end="")
    uri = args.tracking_uri or cfg.tracking.uri
    if uri:
        from weakseg.tracking.client import quiet_mlflow
        from weakseg.tracking.runs import log_evaluation

        params = {**cfg.flat(), "checkpoint": args.checkpoint if args.checkpoint.startswith(MODELS)
                  else str(ckpt.resolve()), "split": args.split, "crf": bool(crf)}
        with quiet_mlflow():
            run_id = log_evaluation(uri, args.experiment or cfg.tracking.experiment or cfg.name, tag, params,
                                    scalars, files)
        print(f"MLflow: run {run_id} at {uri}")
    print(f"\n{args.split}: mIoU {_pct(result.metrics.miou)} on {result.images} images"
          f"{' with dense CRF' if crf else ''}; tables and plots in {out}")
    return 0


MODELS = "models:/"


def _model_checkpoint(source: str, tracking_uri: str | None) -> Path | None:
    """The checkpoint inside an MLflow model (models:/NAME/VERSION, models:/NAME@ALIAS); None for other sources."""
    if not source.startswith(MODELS):
        return None
    from weakseg.tracking.models import checkpoint_of_model
    from weakseg.tracking.client import quiet_mlflow

    with quiet_mlflow():
        return checkpoint_of_model(source, tracking_uri)


def _split_has_masks(cfg, split: str, root: Path | None) -> bool:
    """Whether any image of the split has a mask (none: a test split, to be scored by the server)."""
    from weakseg.data import build
    from weakseg.data.voc import VOCSegmentation

    ds = VOCSegmentation(root if root is not None else build.voc_root(cfg.data), split, with_masks=False,
                         with_labels=False)
    return any((ds.root / d / f"{i}.png").is_file() for i in ds.ids
               for d in ("SegmentationClass", "SegmentationClassAug"))


def _crf_params(args: argparse.Namespace) -> CRFParams:
    import dataclasses

    from weakseg.crf import CRFParams, _densecrf

    _densecrf()  # pydensecrf2 (the crf extra) is installed
    params = CRFParams()
    changes = {}
    for item in args.crf_set or []:
        key, sep, raw = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(CRFParams)}
        if not sep or key not in fields:
            raise UserError(f"--crf-set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            changes[key] = type(getattr(params, key))(raw)
        except ValueError:
            raise UserError(f"--crf-set {item!r}: {raw!r} is not a valid {type(getattr(params, key)).__name__}")
    return dataclasses.replace(params, **changes)


def cmd_search(args: argparse.Namespace) -> int:
    from weakseg.search.space import load_space

    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples {args.samples}: must be at least 1")
    overrides: dict = {"samples": args.samples} if args.samples is not None else {}
    for key in ("storage_path", "results_dir", "tracking_uri"):
        value = getattr(args, key)
        if value:  # a cluster's shared storage, an absolute results folder on the head, its MLflow server
            overrides[key] = value if "://" in value else str(Path(value).expanduser().resolve())
    space = load_space(args.space, overrides or None)
    if args.dry_run:
        from weakseg.search.run import plan

        print(plan(space))
        print("space is valid; nothing was started (--dry-run)")
        return 0
    from weakseg.search.run import run_search

    if args.apply_safe_changes and not args.resume:
        raise UserError("--apply-safe-changes goes with --resume (it applies edits made since the search started)")
    out = run_search(space, resume=args.resume, address=args.address, check=not args.no_resource_check,
                     restart=args.restart, apply_safe_changes=args.apply_safe_changes)
    print()
    print(f"best trial: {out.best_trial or '–'}  {space.settings.metric} = {_pct(out.best_value)} "
          "(its last evaluation; trials ranked by their last evaluation)")
    print(f"results:    {out.results_dir}  (trials.md, best_config.yaml, plots)")
    print(f"MLflow:     experiment {out.experiment!r}, parent run {out.parent_run_id}")
    print(f"MLflow UI:  {ui_command(out.tracking_uri)}")
    if out.export_path is not None:
        print(f"VOC submission: {out.export_path}")
    if out.interrupted:
        print(f"weakseg search: interrupted by {out.interrupted}: the search is incomplete; continue it with\n"
              f"  {_resume_command(args)}", file=sys.stderr)
        return 128 + int(getattr(signal, out.interrupted))
    if not out.trials_ok:
        print(f"weakseg search: error: no trial succeeded (see {out.results_dir / 'trials.md'})", file=sys.stderr)
        return 1
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The exact command that continues this search (same space and overrides), quoted for a shell."""
    prog = ["weakseg"] if Path(sys.argv[0]).name == "weakseg" else [sys.executable, "-m", "weakseg"]
    argv = [*prog, "search", str(Path(args.space).resolve()), "--resume"]
    for flag in ("address", "samples", "storage_path", "results_dir", "tracking_uri"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.no_resource_check:
        argv.append("--no-resource-check")
    return shlex.join(argv)


def cmd_export_voc(args: argparse.Namespace) -> int:
    from weakseg.export import export_voc, upload_instructions

    crf = _crf_params(args) if args.crf else None
    sources = [x for x in (args.checkpoint, args.best, args.mlflow_run) if x]
    if len(sources) != 1:
        raise UserError("give exactly one source: CHECKPOINT, --best SEARCH or --mlflow-run RUN_ID")
    if args.checkpoint and args.checkpoint.startswith(MODELS):
        location = str(_model_checkpoint(args.checkpoint, args.tracking_uri))
    elif args.checkpoint:
        location = args.checkpoint
    elif args.best:
        from weakseg.search.checkpoints import best_of_search

        location = best_of_search(Path(args.best), allow_incomplete=args.allow_incomplete)
    else:
        from weakseg.tracking.runs import checkpoint_of_run

        if not args.tracking_uri:
            raise UserError("--mlflow-run needs --tracking-uri (e.g. sqlite:///results/mlflow.db or http://host:5000)")
        location = checkpoint_of_run(args.tracking_uri, args.mlflow_run)
    if Path(location).suffix == ".pt" and "://" not in location:
        ckpt = Path(location)
    else:
        from weakseg.search.checkpoints import resolve_checkpoint

        ckpt = resolve_checkpoint(location)
    out = Path(args.out) if args.out else Path(f"voc2012_{args.split}_{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")
    path = export_voc(
        ckpt, out.resolve(), data_root=Path(args.data).resolve() if args.data else None, split=args.split, crf=crf,
        crf_workers=args.crf_workers, device=args.device, force=args.force, workers=args.workers,
    )
    print(upload_instructions(path, args.split))
    return 0


def cmd_pseudo_labels(args: argparse.Namespace) -> int:
    from weakseg.pseudo import write_pseudo_labels

    out = Path(args.out).resolve()
    write_pseudo_labels(
        Path(args.checkpoint), out, data_root=Path(args.data).resolve() if args.data else None, split=args.split,
        threshold=args.threshold, crf=None if args.no_crf else _crf_params(args), device=args.device,
        force=args.force, limit=args.limit,
    )
    print(f"train on them with: weakseg train CONFIG --set supervision=pseudo --set data.pseudo_root={out}")
    return 0


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    from weakseg.cluster.validate import validate_cluster_config

    for f in args.files:
        print(validate_cluster_config(Path(f), strict=args.strict))
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from weakseg.data.synthetic import make_synthetic

    from weakseg.config import load_config
    from weakseg.data.build import synthetic_difficulty

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    out = Path(args.out).resolve()
    knobs = [f"data.synthetic_preset={args.preset}"]
    for item in args.set:
        if not item.startswith("data.synthetic_"):
            raise UserError(f"make-synthetic --set {item!r}: only the data.synthetic_* difficulty keys can be set here")
        knobs.append(item)
    difficulty = synthetic_difficulty(load_config("demo", knobs).data)
    voc = make_synthetic(
        out, n_train=args.train, n_val=args.val, n_test=args.test, size=args.size,
        seed=args.seed, classes=classes, test_masks=args.test_masks, overwrite=args.force, difficulty=difficulty,
    )
    print(f"synthetic VOC 2012 layout written to {voc}")
    print(f"train with: weakseg train demo --set data.root={out} " + " ".join(f"--set {k}" for k in knobs))
    return 0


# ---------------------------------------------------------------------------- helpers


def _pct(x: float | None) -> str:
    from weakseg.report import format_percent

    return format_percent(x, width=5)


def _write_json(path: Path, data: dict) -> None:
    import json

    from weakseg.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def user_message(e: BaseException) -> str:
    """One line for the user, also when a DataLoader worker re-raised our error with its traceback."""
    text = str(e).strip()
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


# ----------------------------------------------------------------------------- parser


def ui_command(tracking_uri: str) -> str:
    """How to look at a search's runs: a shell-quoted `mlflow ui` for a local store (its path may hold
    spaces or quotes), else the server's address."""
    if not tracking_uri.startswith("sqlite"):
        return tracking_uri
    return shlex.join(["mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", "5000"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weakseg",
        description="Weakly supervised semantic segmentation from image-level labels "
        "(Pandey & Dukkipati) with Ray Tune + Optuna + MLflow hyperparameter search.",
    )
    from weakseg import __version__

    p.add_argument("--version", action="version", version=f"weakseg {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser("train", help="train one model from a config (name or YAML path)")
    t.add_argument("config", help="shipped config name (paper, demo, demo_weak) or a YAML file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="mIoU, per-class IoU and boundary quality of a checkpoint")
    e.add_argument("checkpoint", help="a weakseg checkpoint (.pt), or an MLflow model: models:/NAME/VERSION, "
                   "models:/NAME@ALIAS (with --tracking-uri or MLFLOW_TRACKING_URI)")
    e.add_argument("--data", help="VOC root (default: the checkpoint's data.root)")
    e.add_argument("--split", default="val")
    e.add_argument("--crf", action="store_true", help="dense-CRF post-processing (pydensecrf)")
    e.add_argument("--crf-set", action="append", metavar="KEY=VALUE", help="override a CRF parameter")
    e.add_argument("--crf-workers", type=int, default=2, help="CRF worker processes")
    e.add_argument("--workers", type=int, default=2, help="data-loading workers")
    e.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    e.add_argument("--overlays", type=int, default=8, help="prediction overlays to save")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="output folder (default: <run>/eval-<split>[-crf])")
    e.add_argument("--tracking-uri", help="also log the evaluation as an MLflow run (default: the run's tracking.uri)")
    e.add_argument("--experiment", help="MLflow experiment (default: the run's tracking.experiment or config name)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("search", help="hyperparameter search on Ray Tune (Optuna TPE, optional ASHA), logged to MLflow")
    s.add_argument("space", help="search-space YAML (see search_spaces/)")
    again = s.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted search")
    again.add_argument("--restart", action="store_true",
                       help="discard a previous search of this name and start over (its MLflow runs stay, closed)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--dry-run", action="store_true", help="validate the space and print the plan")
    s.add_argument("--samples", type=int, help="override settings.samples")
    s.add_argument("--storage-path", help="override settings.storage_path (e.g. s3://bucket/weakseg/ray)")
    s.add_argument("--results-dir", help="override settings.results_dir")
    s.add_argument("--tracking-uri", help="override settings.mlflow.tracking_uri (e.g. http://127.0.0.1:5000)")
    s.add_argument("--apply-safe-changes", action="store_true",
                   help="with --resume: apply the edits to the space file that are safe (more samples); "
                        "any other edit is refused")
    s.add_argument("--no-resource-check", action="store_true",
                   help="skip the check that the cluster can run one trial (autoscalers unknown to weakseg)")
    s.set_defaults(func=cmd_search)

    x = sub.add_parser("export-voc", help="write the PASCAL VOC 2012 evaluation server's submission tarball")
    x.add_argument("checkpoint", nargs="?", help="a weakseg checkpoint (.pt), Tune checkpoint folder, "
                   "or MLflow model models:/NAME/VERSION or models:/NAME@ALIAS (with --tracking-uri)")
    x.add_argument("--best", metavar="SEARCH", help="the model of a search's best trial (its last checkpoint): "
                   "results/<name>/ or its space file")
    x.add_argument("--mlflow-run", metavar="RUN_ID", help="the checkpoint recorded on an MLflow run")
    x.add_argument("--tracking-uri", help="MLflow tracking URI for --mlflow-run and models:/ sources")
    x.add_argument("--allow-incomplete", action="store_true",
                   help="with --best: also export from a search that was interrupted or is still running")
    x.add_argument("--data", help="VOC root (default: the checkpoint's data.root)")
    x.add_argument("--split", default="test")
    x.add_argument("--crf", action="store_true", help="dense-CRF post-processing")
    x.add_argument("--crf-set", action="append", metavar="KEY=VALUE", help="override a CRF parameter")
    x.add_argument("--crf-workers", type=int, default=2)
    x.add_argument("--workers", type=int, default=2)
    x.add_argument("--device", default="auto")
    x.add_argument("--out", help="the .tar.gz to write (default: voc2012_<split>_<time>.tar.gz)")
    x.add_argument("--force", action="store_true", help="replace an existing archive")
    x.set_defaults(func=cmd_export_voc)

    pl = sub.add_parser("pseudo-labels", help="CRF-refined label maps of the training images from a weak model "
                                              "(second stage: train with supervision=pseudo)")
    pl.add_argument("checkpoint")
    pl.add_argument("--out", required=True, help="folder for <id>.png label maps (255: uncertain, ignored)")
    pl.add_argument("--data", help="VOC root (default: the checkpoint's data.root)")
    pl.add_argument("--split", default="train")
    pl.add_argument("--threshold", type=float, default=0.8,
                    help="pixels whose refined winning probability is below this are ignored (255)")
    pl.add_argument("--no-crf", action="store_true", help="skip the dense CRF (the model's own probabilities)")
    pl.add_argument("--crf-set", action="append", metavar="KEY=VALUE", help="override a CRF parameter")
    pl.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    pl.add_argument("--device", default="auto")
    pl.add_argument("--force", action="store_true", help="replace earlier pseudo labels in --out")
    pl.set_defaults(func=cmd_pseudo_labels)

    c = sub.add_parser("cluster", help="cluster-launcher configs (see cluster/README.md)")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cv = csub.add_parser("validate", help="check `ray up` configs and KubeRay manifests before launching")
    cv.add_argument("files", nargs="+", metavar="FILE")
    cv.add_argument("--strict", action="store_true",
                    help="fail on <your-...> placeholders left in (use it before `ray up` / `kubectl apply`)")
    cv.set_defaults(func=cmd_cluster_validate)

    m = sub.add_parser("make-synthetic", help="write a synthetic data set in the VOC 2012 devkit layout")
    m.add_argument("out")
    m.add_argument("--train", type=int, default=200)
    m.add_argument("--val", type=int, default=50)
    m.add_argument("--test", type=int, default=50)
    m.add_argument("--size", type=int, default=128, help="longer image side in pixels")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--classes", help="comma-separated VOC class names (default: a built-in subset)")
    m.add_argument("--test-masks", action="store_true", help="also write test masks (real VOC has none)")
    m.add_argument("--force", action="store_true", help="replace an existing data set")
    m.add_argument("--preset", choices=("default", "small", "clutter"), default="default",
                   help="difficulty: today's set, small objects (2 classes of ~5-8 %% each), heavy clutter")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a difficulty knob, as the data.synthetic_* config keys (e.g. data.synthetic_clutter=2)")
    m.set_defaults(func=cmd_make_synthetic)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        print(f"weakseg {args.verb}: error: {user_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"weakseg {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `weakseg search X --dry-run | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RuntimeError as e:
        # a DataLoader worker re-raises our UserError as a RuntimeError subclass in some versions
        if "UserError: " in str(e):
            print(f"weakseg {args.verb}: error: {user_message(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
