"""Search-space files: what to sample, what to fix, how to run the search.

    name: lambda_sweep              # MLflow experiment, results/<name>/, Ray experiment folder
    base: demo                      # training config: shipped name or path (relative to this file)
    fixed:                          # overrides applied to every trial (training-config keys)
      data.root: ../data/synthetic
    params:                         # sampled by Optuna's TPE, in this order
      loss.variant: {choice: [exp, mean]}
      loss.lam: {uniform: [0.0, 1.0]}
      loss.theta_alpha: {loguniform: [3, 60]}
      optim.batch_size: {int: [4, 16], step: 4}
      loss.w2: {uniform: [0, 10], when: {loss.variant: [exp, mean]}}   # conditional
    settings:
      sampler: tpe                  # tpe (Optuna's TPE) or grid (every combination of choice parameters)
      samples: 8                    # trials (grid: the number of combinations)
      metric: val/miou
      mode: max
      scheduler: {type: asha, grace: 100, max_t: 400, reduction_factor: 2}   # or: none; max_t (default and at
                                    # most optim.iterations) is a trial's full length: reaching it = completed
      max_concurrent: 2
      resources: {cpu: 1, gpu: 0}   # per trial; fractional gpu allowed (0.5: two trials per GPU)
      max_failures: 1               # retries of a crashed trial, from its last checkpoint
      seed: 0
      storage_path: ../results/ray  # local folder, s3://bucket/path or gs://bucket/path
      results_dir: ../results       # summary tables and plots go to results_dir/<name>/
      mlflow: {tracking_uri: null, experiment: null, register_as: null}   # default: sqlite in results_dir,
                                    # experiment = name; the selected model is registered as register_as (default: name)
      pseudo_labels: {checkpoint: ../runs/weak/checkpoints/best.pt, threshold: 0.8, crf: true}   # optional: a
                                    # second stage; the labels are written once, before the trials, into
                                    # results_dir/<name>/pseudo_labels, and every trial trains on them
                                    # (supervision: pseudo, data.pseudo_root set for it)
    export: {split: test}           # optional: export the best model for the VOC server at the end

Everything is checked before Ray starts: unknown keys, parameter names that are
not training-config keys, bad bounds and types each stop the search with the
file, line and key at fault. Relative paths are resolved against the file. The `settings:` and
`export:` blocks are declared by the dataclasses below and typed by the code that types a training
config (`weakseg.config.coerce_dataclass`), strictly: a value must already be what YAML parsed.
Bounds that keep a broken or hostile file from taking the machine down: at most 1 MiB, 100 000 YAML
nodes once aliases are expanded, no key repeated in a mapping (config.load_yaml), 1000 values per
`choice`, seeds in [0, 2**32 - 1].
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from weakseg.config import (
    MAX_SEED,
    Config,
    ConfigError,
    Setting,
    build_config,
    choices,
    coerce_dataclass,
    did_you_mean,
    file_settings,
    flatten,
    load_yaml,
    resolve_config_path,
    schema,
    within,
)

KINDS = ("uniform", "loguniform", "int", "choice")
TOP_KEYS = ("name", "base", "fixed", "params", "settings", "export")
PSEUDO_DIR = "pseudo_labels"  # under results_dir/<name>/: the second stage's labels
METRICS = ("val/miou", "val/boundary_iou", "val/pixel_acc", "val/object_iou", "val/image_auc", "val/image_map")
MAX_CHOICES = 1000  # values of one `choice` list: a search samples tens of trials, not millions


@dataclass(frozen=True)
class Param:
    key: str  # training-config key, e.g. "loss.lam"
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # sampled only if every (key, allowed values) holds
    line: int = 0

    def active(self, sampled: Mapping[str, Any]) -> bool:
        return all(k in sampled and sampled[k] in allowed for k, allowed in self.when)

    def describe(self) -> str:
        if self.kind == "choice":
            s = f"choice{list(self.values)}"
        elif self.kind == "int":
            s = f"int[{int(self.low)}, {int(self.high)}]" + (f" step {int(self.step)}" if self.step else "")
            s += " log" if self.log else ""
        else:
            s = f"{self.kind}[{self.low:g}, {self.high:g}]" + (f" step {self.step:g}" if self.step else "")
        if self.when:
            s += " when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when)
        return s


# The `settings:` and `export:` blocks, key for key: typed by config.coerce_dataclass, then resolved and
# range-checked by _parse_settings (a Config's values go the same way: config._coerce, then config._validate).


@dataclass(frozen=True)
class Scheduler:
    type: Literal["asha", "none"] = "none"  # in the file, a mapping's type defaults to asha; `none` stands alone
    grace: int = field(default=0, metadata=within(1))  # training iterations before a trial can be stopped
    max_t: int = field(default=0, metadata=within(0))  # training iterations of a full trial (0: optim.iterations)
    reduction_factor: int = field(default=2, metadata=within(2))


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class PseudoLabels:
    """A second stage: the trials train on label maps made from a weak model's checkpoint (weakseg.pseudo)."""

    checkpoint: str = ""  # required; absolute path of the weak model's .pt once parsed
    threshold: float = 0.8  # pixels whose refined winning probability is below it are ignored
    crf: bool = True  # refine with the dense CRF (its default parameters)


@dataclass(frozen=True)
class Mlflow:
    tracking_uri: str | None = None  # default: sqlite in results_dir (SearchSpace.tracking_uri)
    experiment: str | None = None  # default: the space's name
    register_as: str | None = None  # the selected model's registry name (default: the space's name)


@dataclass(frozen=True)
class Settings:
    sampler: Literal["tpe", "grid"] = "tpe"  # grid: every combination of the `choice` parameters, once
    samples: int = field(default=8, metadata=within(1))
    metric: str = "val/miou"
    mode: Literal["max", "min"] = "max"
    scheduler: Scheduler = Scheduler()
    max_concurrent: int = field(default=1, metadata=within(1))
    resources: Resources = Resources()
    max_failures: int = field(default=1, metadata=within(0))  # retries of a crashed trial
    seed: int = field(default=0, metadata=within(0, MAX_SEED))
    storage_path: str = ""  # default results_dir/ray; both resolved against the file when parsed
    results_dir: str = ""  # default ../results
    mlflow: Mlflow = Mlflow()
    pseudo_labels: PseudoLabels | None = None

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Settings":
        """The command line's --samples, --storage-path, --results-dir, --tracking-uri (an Mlflow field)."""
        ml = {k: v for k, v in overrides.items() if k in Mlflow.__dataclass_fields__}
        top = {k: v for k, v in overrides.items() if k not in ml}
        return dataclasses.replace(self, **top, mlflow=dataclasses.replace(self.mlflow, **ml))


@dataclass(frozen=True)
class Export:
    split: str = "test"
    crf: bool = False


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    name: str
    base: Path  # resolved training config file
    fixed: dict[str, Setting]
    params: tuple[Param, ...]
    settings: Settings
    export: Export | None = None
    base_config: Config = field(default=None, repr=False)  # type: ignore[assignment]

    @property
    def results_dir(self) -> Path:
        return Path(self.settings.results_dir) / self.name

    @property
    def pseudo_root(self) -> Path | None:
        """Where settings.pseudo_labels writes the labels every trial trains on (None: no second stage)."""
        return self.results_dir / PSEUDO_DIR if self.settings.pseudo_labels is not None else None

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: as configured, else sqlite under results/ (MLflow 3's default backend)."""
        if self.settings.mlflow.tracking_uri:
            return self.settings.mlflow.tracking_uri
        return f"sqlite:///{Path(self.settings.results_dir) / 'mlflow.db'}"

    @property
    def experiment(self) -> str:
        return self.settings.mlflow.experiment or self.name

    @property
    def register_as(self) -> str:
        """The Model Registry name the search's selected model is registered under."""
        return self.settings.mlflow.register_as or self.name

    @property
    def full_iterations(self) -> int:
        """A trial's full length: ASHA's max_t when ASHA is on (it stops every trial there), else optim.iterations.
        A trial that ends earlier was stopped early."""
        sched = self.settings.scheduler
        return sched.max_t if sched.type == "asha" else self.base_config.optim.iterations

    def trial_settings(self, sampled: Mapping[str, Any]) -> dict[str, Setting]:
        """The settings of one trial: base file <- fixed <- sampled."""
        out = dict(file_settings(self.base))
        out.update(self.fixed)
        for k, v in sampled.items():
            out[k] = Setting(v, f"{self.path} (sampled {k})", None)
        return out

    def base_values(self) -> dict[str, Any]:
        """The flat resolved base config (base file <- fixed) that every trial's sample is laid over.

        `loss.grad` stays `auto` unless the base or `fixed` names a mode, so a trial that
        samples `loss.variant` gets that variant's default gradient mode, not the base's.
        """
        values = self.base_config.flat()
        grad = self.trial_settings({}).get("loss.grad")
        if grad is None or grad.value == "auto":
            values["loss.grad"] = "auto"
        return values

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        return build_config(self.trial_settings(sampled))

    def grid(self) -> dict[str, list]:
        """For the grid sampler: every parameter's values."""
        return {p.key: list(p.values) for p in self.params}

    def optuna_space(self) -> "DefineByRun":
        """A define-by-run function for Ray's OptunaSearch: conditional parameters need one."""
        return DefineByRun(self.params)


class DefineByRun:
    """Samples the parameters in order, skipping those whose `when` does not hold.

    A class rather than a closure: Ray pickles the searcher, and this, with the experiment state.
    """

    def __init__(self, params: tuple[Param, ...]):
        self.params = params

    def __call__(self, trial) -> None:
        sampled: dict[str, Any] = {}
        for p in self.params:
            if not p.active(sampled):
                continue
            if p.kind == "choice":
                sampled[p.key] = trial.suggest_categorical(p.key, list(p.values))
            elif p.kind == "int":
                sampled[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                sampled[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.kind == "loguniform")


# -------------------------------------------------------------------------- parsing


class _Loc:
    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines = path, lines

    def at(self, key: str) -> str:
        line = self.lines.get(key)
        if line is None:  # fall back to the nearest enclosing key that has a line
            parts = key.split(".")
            while parts and line is None:
                parts.pop()
                line = self.lines.get(".".join(parts))
        return f"{self.path}:{line or 1}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.at(key)}: {key}: {message}")


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Parse and fully validate a search-space file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"search space {path}: no such file")
    data, lines = load_yaml(path)
    loc = _Loc(path, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a search space must be a mapping with keys {', '.join(TOP_KEYS)}")
    for k in data:
        if k not in TOP_KEYS:
            raise loc.error(str(k), f"unknown key{did_you_mean(str(k), TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise loc.error("name", "must be letters, digits, '-' or '_' (it names folders and the MLflow experiment)")
    base_raw = data.get("base")
    if not isinstance(base_raw, str):
        raise loc.error("base", "required: a training config name (demo, paper) or a YAML path")
    try:
        base = resolve_config_path(base_raw, relative_to=path.parent)
    except ConfigError as e:
        raise loc.error("base", str(e)) from None
    keys = schema()

    fixed_raw = data.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        raise loc.error("fixed", "must be a mapping of training-config keys to values")
    fixed: dict[str, Setting] = {}
    for k, v in flatten(fixed_raw).items():
        if k not in keys:
            raise loc.error(f"fixed.{k}", f"not a training-config key{did_you_mean(k, keys)}")
        fixed[k] = Setting(v, loc.at(f"fixed.{k}"), path.parent)

    params_raw = data.get("params") or {}
    if not isinstance(params_raw, dict):
        raise loc.error("params", "must be a mapping of training-config keys to distributions")
    params: list[Param] = []
    for k, spec in params_raw.items():
        params.append(_parse_param(str(k), spec, loc, keys, [p.key for p in params]))
    for p in params:
        if p.key in fixed:
            raise loc.error(f"params.{p.key}", "is both fixed and searched")

    settings = _parse_settings(data.get("settings") or {}, loc, path)
    export = _parse_export(data.get("export"), loc)
    if settings.pseudo_labels is not None:
        results_dir = (overrides or {}).get("results_dir", settings.results_dir)  # --results-dir moves them too
        fixed.update(_pseudo_fixed(Path(results_dir) / name / PSEUDO_DIR, fixed, params, loc))

    if settings.sampler == "grid":
        for p in params:
            if p.kind != "choice" or p.when:
                raise loc.error(f"params.{p.key}", "the grid sampler needs unconditional `choice` parameters")
        combos = math.prod(len(p.values) for p in params)
        if "samples" in (data.get("settings") or {}) and settings.samples != combos:
            raise loc.error("settings.samples", f"the grid has {combos} combinations; drop samples or set it to that")
        settings = dataclasses.replace(settings, samples=combos)
    space = SearchSpace(path, name, base, fixed, tuple(params), settings, export)
    base_cfg = _check_configs(space, loc)
    if settings.pseudo_labels is not None and base_cfg.data.dataset == "imagenet":
        raise loc.error("settings.pseudo_labels", "labels the VOC-layout training images: the trials' "
                        "data.dataset must be voc or synthetic, not imagenet")
    sched = settings.scheduler
    if sched.type == "asha":
        iters = base_cfg.optim.iterations
        max_t = sched.max_t or iters
        if max_t > iters:
            raise loc.error("settings.scheduler.max_t", f"{max_t} exceeds optim.iterations ({iters})")
        if not 0 < sched.grace < max_t:
            raise loc.error("settings.scheduler.grace", f"must lie in (0, max_t={max_t})")
        settings = dataclasses.replace(settings, scheduler=dataclasses.replace(sched, max_t=max_t))
    space = dataclasses.replace(space, settings=settings, base_config=base_cfg)
    if overrides:
        space = dataclasses.replace(space, settings=space.settings.with_overrides(overrides))
    return space


def _pseudo_fixed(root: Path, fixed: Mapping[str, Setting], params: list[Param], loc: _Loc) -> dict[str, Setting]:
    """The overrides settings.pseudo_labels adds to every trial; refused where the file sets them itself."""
    why = "is set by settings.pseudo_labels (every trial trains on its labels): drop it"
    for key in ("supervision", "data.pseudo_root"):
        if key in fixed:
            raise loc.error(f"fixed.{key}", why)
        if any(p.key == key for p in params):
            raise loc.error(f"params.{key}", why)
    origin = f"{loc.at('settings.pseudo_labels')} (settings.pseudo_labels)"
    return {"supervision": Setting("pseudo", origin, None), "data.pseudo_root": Setting(str(root), origin, None)}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_param(key: str, spec: Any, loc: _Loc, keys: dict, earlier: list[str]) -> Param:
    where = f"params.{key}"
    if key not in keys:
        raise loc.error(where, f"not a training-config key{did_you_mean(key, keys)}")
    if not isinstance(spec, dict):
        raise loc.error(where, "must be a mapping like {uniform: [low, high]} or {choice: [a, b]}")
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS + ("step", "log", "when")]
    if unknown:
        raise loc.error(f"{where}.{unknown[0]}", f"unknown option{did_you_mean(str(unknown[0]), KINDS)}")
    if len(kinds) != 1:
        raise loc.error(where, f"needs exactly one distribution of {', '.join(KINDS)}")
    kind = kinds[0]
    arg = spec[kind]
    tp, _ = keys[key]
    allowed = choices(key)
    line = loc.lines.get(where, 0)
    when = _parse_when(spec.get("when"), f"{where}.when", loc, earlier)
    if kind == "choice":
        if not isinstance(arg, list) or len(arg) < 1:
            raise loc.error(f"{where}.choice", "must be a non-empty list")
        if len(arg) > MAX_CHOICES:
            raise loc.error(f"{where}.choice", f"has {len(arg)} values; at most {MAX_CHOICES} are allowed")
        if len(set(map(repr, arg))) != len(arg):
            raise loc.error(f"{where}.choice", "has repeated values")
        if allowed is not None:
            bad = [v for v in arg if v not in allowed]
            if bad:
                raise loc.error(f"{where}.choice", f"{bad[0]!r} is not one of {list(allowed)}")
        return Param(key, "choice", values=tuple(arg), when=when, line=line)
    if allowed is not None or tp not in (int, float, int | None, float | None):
        raise loc.error(where, f"{kind} needs a numeric key; {key} takes {_type_name(tp)}: use choice")
    if not (isinstance(arg, list) and len(arg) == 2 and all(_number(a) for a in arg)):
        raise loc.error(f"{where}.{kind}", "must be [low, high] with two numbers")
    low, high = float(arg[0]), float(arg[1])
    if not low < high:
        raise loc.error(f"{where}.{kind}", f"low ({arg[0]}) must be below high ({arg[1]})")
    step = spec.get("step")
    if step is not None and (not _number(step) or step <= 0):
        raise loc.error(f"{where}.step", "must be a positive number")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise loc.error(f"{where}.log", "must be true or false")
    if kind == "int":
        if tp is float:
            pass  # an integer-valued float key is fine
        if not (float(arg[0]).is_integer() and float(arg[1]).is_integer()):
            raise loc.error(f"{where}.int", "bounds must be integers")
        if step is not None and not float(step).is_integer():
            raise loc.error(f"{where}.step", "must be an integer for int")
        if log and low < 1:
            raise loc.error(f"{where}.int", "log scale needs low >= 1")
        if log and step not in (None, 1):
            raise loc.error(f"{where}.step", "Optuna's log-scaled int supports step 1 only")
    else:
        if tp is int:
            raise loc.error(where, f"{key} is an integer: use {{int: [low, high]}}")
        if log:
            raise loc.error(f"{where}.log", "use loguniform instead of uniform with log")
        if kind == "loguniform" and low <= 0:
            raise loc.error(f"{where}.loguniform", f"low must be > 0 on a log scale (got {arg[0]})")
        if kind == "loguniform" and step is not None:
            raise loc.error(f"{where}.step", "a step is not supported on a log scale")
    return Param(key, kind, low=low, high=high, step=float(step) if step else None, log=log, when=when, line=line)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _parse_when(raw: Any, where: str, loc: _Loc, earlier: list[str]) -> tuple[tuple[str, tuple], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise loc.error(where, "must map earlier parameters to a value or list of values")
    out = []
    for k, v in raw.items():
        if k not in earlier:
            raise loc.error(f"{where}.{k}", "must name a parameter listed above this one")
        vals = tuple(v) if isinstance(v, list) else (v,)
        out.append((str(k), vals))
    return tuple(out)


def _parse_settings(raw: Any, loc: _Loc, path: Path) -> Settings:
    """settings: typed key for key by the dataclasses above, then resolved against the file and range-checked."""
    if isinstance(raw, dict):  # the file's shorthands: `mlflow:` empty, `scheduler: none`
        raw = {**raw, "mlflow": raw.get("mlflow") or {}}
        if "scheduler" in raw:
            raw["scheduler"] = _scheduler_shape(raw["scheduler"], loc)
    s = coerce_dataclass(Settings, raw, "settings", loc.at)
    _check_settings(s, loc)
    results_dir = _location(s.results_dir if "results_dir" in raw else "../results", "results_dir", loc, path)
    storage_path = _location(s.storage_path if "storage_path" in raw else str(Path(results_dir) / "ray"),
                             "storage_path", loc, path)
    uri = s.mlflow.tracking_uri
    if uri and "://" not in uri:  # a plain folder or file: resolve like the other paths
        uri = str((path.parent / Path(uri).expanduser()).resolve())
    return dataclasses.replace(s, results_dir=results_dir, storage_path=storage_path,
                               mlflow=dataclasses.replace(s.mlflow, tracking_uri=uri),
                               pseudo_labels=_pseudo_labels(s.pseudo_labels, loc, path))


def _scheduler_shape(raw: Any, loc: _Loc) -> Any:
    """settings.scheduler as written (none, or {type: asha, grace, max_t, reduction_factor}) to Scheduler's keys."""
    if raw in (None, "none"):
        return {"type": "none"}
    if raw == "asha":
        raise loc.error("settings.scheduler", "asha needs {type: asha, grace: N, max_t: N}")
    if not isinstance(raw, dict):
        raise loc.error("settings.scheduler", "must be none or {type: asha, grace: N, max_t: N}")
    if raw.get("type", "asha") == "none":  # {type: none}: the other options don't apply (unknown ones still fail)
        return {**{k: v for k, v in raw.items() if k not in Scheduler.__dataclass_fields__}, "type": "none"}
    return {"type": "asha", **raw}


def _check_settings(s: Settings, loc: _Loc) -> None:
    """What the types of Settings don't say: ranges, metric names, model names; each error names its key."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise loc.error(f"settings.{key}", message)

    check(s.metric in METRICS or s.metric.startswith("val/iou/"), "metric",
          f"must be one of {', '.join(METRICS)} or val/iou/<class> (got {s.metric!r})")
    if s.metric.startswith("val/iou/"):
        from weakseg.data.classes import VOC_CLASSES

        check(s.metric[len("val/iou/"):] in VOC_CLASSES, "metric", f"unknown class in {s.metric!r}")
    check(s.scheduler.type == "none" or s.scheduler.grace >= 1, "scheduler.grace", "required: an integer >= 1")
    cpu, gpu = s.resources.cpu, s.resources.gpu
    check(cpu > 0, "resources.cpu", f"must be a number > 0 (got {cpu!r})")
    check(gpu >= 0 and (gpu <= 1 or gpu.is_integer()), "resources.gpu",
          f"must be 0, a fraction in (0, 1], or a whole number (got {gpu!r})")
    check(s.mlflow.tracking_uri != "", "mlflow.tracking_uri", "must be a URI (http://host:port, sqlite:///path, ...)")
    register_as = s.mlflow.register_as
    check(register_as is None or re.fullmatch(r"[A-Za-z0-9_.-]+", register_as) is not None, "mlflow.register_as",
          "must be a model name of letters, digits, '.', '-' or '_'")
    if s.pseudo_labels is not None:
        threshold = s.pseudo_labels.threshold
        check(s.pseudo_labels.checkpoint != "", "pseudo_labels.checkpoint",
              "required: the weak model's checkpoint file (.pt)")
        check(0 <= threshold < 1, "pseudo_labels.threshold", f"must be a number in [0, 1) (got {threshold!r})")


def _location(v: str, k: str, loc: _Loc, path: Path) -> str:
    """settings.results_dir / storage_path: a URI as written, a local path resolved against the space file."""
    if not v:
        raise loc.error(f"settings.{k}", "must be a path or URI")
    if "://" in v:
        scheme = v.split("://", 1)[0]
        if k == "storage_path" and scheme not in ("s3", "gs", "gcs", "file", "abfs", "hdfs"):
            raise loc.error(f"settings.{k}", f"unsupported scheme {scheme!r} (local path, s3://, gs://)")
        if k == "results_dir":
            raise loc.error(f"settings.{k}", "must be a local folder")
        return v
    p = Path(v).expanduser()
    return str((path.parent / p).resolve() if not p.is_absolute() else p)


def _pseudo_labels(pl: PseudoLabels | None, loc: _Loc, path: Path) -> PseudoLabels | None:
    """settings.pseudo_labels with its checkpoint resolved against the file, which must exist."""
    if pl is None:
        return None
    ck_path = Path(pl.checkpoint).expanduser()
    ck_path = (path.parent / ck_path).resolve() if not ck_path.is_absolute() else ck_path
    if not ck_path.is_file():
        raise loc.error("settings.pseudo_labels.checkpoint", f"no such file: {ck_path}")
    return dataclasses.replace(pl, checkpoint=str(ck_path))


def _parse_export(raw: Any, loc: _Loc) -> Export | None:
    if raw is None:
        return None
    export = coerce_dataclass(Export, raw, "export", loc.at)
    if not export.split:
        raise loc.error("export.split", "must be a split name such as test")
    return export


def _check_configs(space: SearchSpace, loc: _Loc) -> Config:
    """Build the base config and the configs at each parameter's bounds: range errors surface now."""
    cfg = build_config(space.trial_settings({}))
    for p in space.params:
        candidates = list(p.values) if p.kind == "choice" else [p.low, p.high]
        for v in candidates:
            value = int(v) if p.kind == "int" else v
            try:
                build_config(space.trial_settings({p.key: value}))
            except ConfigError as e:
                msg = str(e).split(": ", 2)[-1]
                raise loc.error(f"params.{p.key}", f"value {value!r} is invalid: {msg}") from None
    # loss.grad's validity depends on loss.variant (free_energy is exp's): try every pair sampled
    choice = {p.key: list(p.values) for p in space.params if p.kind == "choice"}
    if {"loss.variant", "loss.grad"} & set(choice):
        for variant in choice.get("loss.variant", [cfg.loss.variant]):
            for grad in choice.get("loss.grad", [None]):
                sampled = {"loss.variant": variant, **({"loss.grad": grad} if grad is not None else {})}
                try:
                    build_config(space.trial_settings(sampled))
                except ConfigError as e:
                    msg = str(e).split(": ", 2)[-1]
                    raise loc.error("params.loss.grad" if grad is not None else "params.loss.variant",
                                    f"{sampled} is invalid: {msg}") from None
    return cfg

