"""Configuration: YAML defaults -> `--set key=value` overrides -> frozen, validated dataclasses.

Every training knob is a dotted key (`loss.lam`, `optim.lr_new`, `supervision`),
so the same names serve the YAML files, `--set` on the command line and the
parameter names of a search space. A config file may start from another with
`base: NAME_OR_PATH`. Relative paths inside a YAML file are resolved against
that file's folder; relative paths given on the command line against the
current directory (the user's intent in both cases). Every value remembers
where it was set, so a bad one is reported as `file.yaml:LINE: key: problem`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from weakseg.errors import UserError

PATH = {"path": True}
MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take 32-bit seeds  # field metadata: relative values are resolved against their origin


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["vgg16", "tiny"] = "vgg16"
    # "imagenet": torchvision's VGG16_Weights.IMAGENET1K_V1 (downloaded once to the torch hub cache);
    # "none": random init; anything else: path to a local VGG16 state dict (.pth).
    pretrained: str = "imagenet"
    num_classes: int = 21
    decoder_channels: int = 256  # width of the stride-16 decoder block; halves at each upsampling
    skip_channels: int = 64  # output channels of the 1x1 skip convolutions
    # how the 3x3 convolutions pad: "zeros" (the paper's VGG16) or "replicate" (beyond the paper). Zero padding
    # tells every pixel where the image border is; from image labels alone a model can use that to write a
    # class it detected anywhere into a fixed strip along a border (results/difficulty.md). Replicate padding
    # leaves no such marker (Islam et al., "How much position information do CNNs encode?", ICLR 2020).
    padding: Literal["zeros", "replicate"] = "zeros"


@dataclass(frozen=True)
class DataConfig:
    # voc: VOC 2012 devkit (weak labels from the XML annotations); imagenet: the paper's
    # ImageNet subset (one folder per class) for training, VOC val for evaluation;
    # synthetic: the generated VOC-layout set, created under `root` when missing.
    dataset: Literal["voc", "imagenet", "synthetic"] = "voc"
    root: str | None = field(default=None, metadata=PATH)  # VOC root (training and evaluation)
    train_root: str | None = field(default=None, metadata=PATH)  # ImageNet-subset root (dataset=imagenet)
    synset_mapping: str | None = field(default=None, metadata=PATH)  # wnid -> VOC class TSV (default: shipped)
    labels_file: str | None = field(default=None, metadata=PATH)  # image-level labels TSV instead of XML
    sbd_root: str | None = field(default=None, metadata=PATH)  # SBD benchmark_RELEASE/dataset for train_aug
    train_split: str = "train"
    val_split: str = "val"
    val_limit: int = 0  # evaluate on the first N val images only (0: all); for quick search trials
    max_pixels: int = 40_000_000  # larger images are refused by name (decoding one takes GBs); VOC's are 0.2 M
    crop_size: int = 224
    train_mode: Literal["resize", "scale_crop"] = "resize"
    scale_min: float = 1.0
    scale_max: float = 1.0
    flip: bool = True
    workers: int = 2
    # synthetic data set generated when dataset=synthetic and `root` does not exist yet
    synthetic_train: int = 200
    synthetic_val: int = 50
    synthetic_test: int = 50
    synthetic_size: int = 128
    synthetic_seed: int = 0
    # difficulty of the generated set: a named preset, each knob overridable (unset: the preset's value)
    synthetic_preset: Literal["default", "small", "clutter"] = "default"
    synthetic_object_area_min: float | None = None  # target area of one object, fraction of the image
    synthetic_object_area_max: float | None = None
    synthetic_objects_min: int | None = None  # objects per image (unset with the default preset: 1-3)
    synthetic_objects_max: int | None = None
    synthetic_distinct: bool | None = None  # the objects of an image have distinct classes
    synthetic_clutter: float | None = None  # multiplies the number of clutter shapes
    synthetic_clutter_textured: float | None = None  # share of clutter shapes wearing an object texture
    synthetic_texture_similarity: float | None = None  # 0: own texture per class; 1: a random class's
    # supervision=pseudo: label maps written by `weakseg pseudo-labels` (<id>.png, 255 = ignore)
    pseudo_root: str | None = field(default=None, metadata=PATH)


def default_grad(variant: str) -> str:
    """The gradient mode `loss.grad: auto` stands for: the one each variant's derivation supports.

    exp (eq. 12) comes from the mean-field free energy, whose gradient is the detached
    KL's; differentiating through p̄ makes uniform p a global minimum (docs/method.md).
    mean has no such derivation and measures better with the gradient through p̄.
    """
    return "both" if variant == "mean" else "detach"


@dataclass(frozen=True)
class LossConfig:
    lam: float = 0.3  # λ of eq. 18; the paper's best `exp` model uses 0.3
    lam_warmup: int = 0  # iterations over which λ ramps linearly from 0 (0: the paper's constant λ)
    variant: Literal["exp", "mean", "none"] = "exp"  # eq. 12, eq. 10, or no neighbourhood loss
    # How the neighbourhood term is differentiated (docs/method.md, "Gradient modes"):
    # both: through p and p̄; detach: p̄ is a constant target; free_energy (exp only): the
    # mean-field free energy, whose gradient is detach's for a symmetric kernel; auto: the
    # variant's default (exp -> detach, mean -> both), resolved when the config is built.
    grad: Literal["auto", "both", "detach", "free_energy"] = "auto"
    backend: Literal["auto", "dense", "permutohedral"] = "auto"
    c_bg: float = 0.4  # eq. 7: minimum background coverage
    c_fg: float = 0.2  # eq. 7: minimum coverage of each object class present
    w1: float = 10.0  # eq. 11 kernel weights and widths (Krähenbühl's defaults)
    theta_alpha: float = 13.0  # colour, 0-255 units
    theta_beta: float = 80.0  # position (bilateral), input pixels; divided by the output stride
    w2: float = 3.0
    theta_gamma: float = 3.0  # position (smoothness), input pixels; divided by the output stride
    # beyond the paper (weakseg.losses.image_level): BCE of the image labels against softmax probabilities
    # pooled over the pixels, so object classes compete with background pixel by pixel
    cls_weight: float = 0.0  # weight of the image-level loss added to eq. 18 (0: off)
    # log-sum-exp (sharpness cls_lse_r), average, max, or the mean of the top object_fraction of the pixels
    cls_pool: Literal["lse", "avg", "max", "topk"] = "lse"
    cls_lse_r: float = 5.0
    cls_only_iters: int = 0  # first train the image-level loss alone, for at most this many iterations
    cls_switch_auc: float = 0.0  # ... switching earlier at the first evaluation with val image AUC >= this (0: off)
    # object-size-aware prior: the demand of each present class is c_fg (fixed), object_fraction (size: a
    # dataset statistic), or its share of confident pixels p >= 0.5, clamped to [object_fraction, c_fg] (confident)
    c_fg_mode: Literal["fixed", "size", "confident"] = "fixed"
    object_fraction: float = 0.1

    def __post_init__(self) -> None:
        # `auto` is resolved when the section is built, so every saved config, checkpoint and
        # MLflow run names the concrete mode (a search that samples the variant leaves it `auto`).
        if self.grad == "auto":
            object.__setattr__(self, "grad", default_grad(self.variant))


@dataclass(frozen=True)
class OptimConfig:
    """Paper §5.3: SGD, batch 20, momentum 0.9, wd 5e-5, lr 1e-3/1e-2, halved every 4000 of 40000."""

    batch_size: int = 20
    # sgd: the paper's. adamw (beyond the paper): for a backbone trained from random init, where SGD learns
    # image classification from image labels too slowly (results/difficulty.md); momentum is then AdamW's beta1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-5
    lr_pretrained: float = 1e-3
    lr_new: float = 1e-2
    lr_step: int = 4000
    lr_gamma: float = 0.5
    iterations: int = 40000
    grad_clip: float = 0.0  # max gradient norm; 0: off


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    compile: bool = False  # torch.compile the model
    pin_memory: Literal["auto", "on", "off"] = "auto"  # page-locked batches for async host-to-GPU copies; auto: CUDA
    persistent_workers: bool = True  # keep the evaluation loader's workers between evaluations
    seed: int = 0
    eval_every: int = 2000
    checkpoint_every: int = 0  # also save last.pt every this many iterations between evaluations (0: off)
    log_every: int = 20
    progress: Literal["auto", "on", "off"] = "auto"  # progress bar; auto: when stderr is a terminal
    overlays: int = 4  # prediction overlays saved at each evaluation
    # collapse check (weakseg.diagnostics): from this share of optim.iterations on, an evaluation with val image
    # AUC below collapse_auc or next to no predicted foreground reports val/collapsed = 1 and warns
    collapse_after: float = 0.25
    collapse_auc: float = 0.6


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; with `experiment`, `weakseg train` logs a run
    experiment: str | None = None


@dataclass(frozen=True)
class Config:
    name: str = "weakseg"
    supervision: Literal["weak", "full", "pseudo"] = "weak"  # full: pixel masks, the upper bound; pseudo: data.pseudo_root
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. {"loss.lam": 0.3, ...}: what MLflow logs as params."""
        return flatten(self.to_dict())


# ------------------------------------------------------------------- key registry


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def schema() -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every valid dotted key with its type and dataclass field."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = get_type_hints(Config)
    for f in fields(Config):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub_hints = get_type_hints(tp)
            for g in fields(tp):
                out[f"{f.name}.{g.name}"] = (sub_hints[g.name], g)
        else:
            out[f.name] = (tp, f)
    return out


def choices(key: str) -> tuple | None:
    """The allowed values of a Literal-typed key (None for free values)."""
    tp = schema()[key][0]
    return get_args(tp) if get_origin(tp) is Literal else None


# --------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Setting:
    value: Any
    origin: str  # "file.yaml:12", "--set", "search space demo.yaml:30", ...
    base_dir: Path | None  # folder relative paths are resolved against (None: leave as is)


class ConfigError(UserError):
    pass


def config_dir() -> Path:
    """Folder of the named configs shipped inside the package."""
    return Path(str(resources.files("weakseg") / "configs"))


def named_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config file path, or the name of a shipped config (`paper`, `demo`)."""
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and relative_to is not None:
        p = relative_to / p
    if p.is_file():
        return p.resolve()
    shipped = config_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config {str(name_or_path)!r}: no such file and no shipped config of that name "
        f"(shipped: {', '.join(named_configs())})"
    )


# Config and space files are a few KB: these bounds stop a hostile or broken file from taking the machine down
MAX_YAML_BYTES = 1 << 20  # file size, checked before reading
MAX_YAML_NODES = 100_000  # nodes after expanding aliases (an alias bomb is tiny on disk, huge in memory)


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML safely and return (data, {dotted key: line number}).

    Refused: files over MAX_YAML_BYTES, more than MAX_YAML_NODES nodes once aliases are expanded,
    and a key repeated in one mapping (YAML would silently keep the last value)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: file is {size} bytes; config and space files are limited to {MAX_YAML_BYTES}")
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_nodes(node, path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines)
    return data, lines


def _check_nodes(root: yaml.Node, path: Path) -> None:
    """Count nodes as loading would expand them (aliases included) and reject duplicate keys."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(f"{path}: more than {MAX_YAML_NODES} YAML nodes once aliases are expanded "
                              "(an alias bomb?); refusing to load it")
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise ConfigError(f"{path}:{k.start_mark.line + 1}: duplicate key {k.value!r} "
                                          f"(first at line {seen[k.value]})")
                    seen[k.value] = k.start_mark.line + 1
                stack += [k, v]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def _collect_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _collect_lines(v, key + ".", out)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested YAML sections to dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def file_settings(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Setting]:
    """The settings of one config file, after those of its `base` chain."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base` chain loops back to this file")
    data, lines = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config file must be a mapping of keys to values")
    settings: dict[str, Setting] = {}
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}:{lines.get('base', 1)}: base: must be a config name or path")
        try:
            base_path = resolve_config_path(base, relative_to=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path}:{lines.get('base', 1)}: base: {e}") from None
        settings.update(file_settings(base_path, _seen + (path,)))
    for key, value in flatten(data).items():
        settings[key] = Setting(value, f"{path}:{lines.get(key, 1)}", path.parent)
    return settings


def parse_overrides(items: list[str], origin: str = "--set") -> dict[str, Setting]:
    """`key=value` strings from the command line; values are parsed as YAML scalars."""
    out: dict[str, Setting] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{origin} {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key] = Setting(value, origin, Path.cwd())
    return out


def mapping_settings(values: Mapping[str, Any], origin: str, base_dir: Path | None) -> dict[str, Setting]:
    """Settings from an in-memory mapping (search trials, tests)."""
    return {k: Setting(v, origin, base_dir) for k, v in flatten(values).items()}


def load_config(
    name_or_path: str | os.PathLike,
    overrides: list[str] | None = None,
    extra: Mapping[str, Setting] | None = None,
) -> Config:
    """Defaults <- config file (and its bases) <- `extra` <- `--set` overrides."""
    settings = file_settings(resolve_config_path(name_or_path))
    if extra:
        settings.update(extra)
    if overrides:
        settings.update(parse_overrides(overrides))
    return build_config(settings)


def build_config(settings: Mapping[str, Setting]) -> Config:
    """Validate settings against the schema and build the frozen Config."""
    keys = schema()
    values: dict[str, Any] = {}
    for key, s in settings.items():
        if key not in keys:
            raise ConfigError(f"{s.origin}: unknown key {key!r}{did_you_mean(key, keys)}")
        tp, f = keys[key]
        value = _coerce(key, s.value, tp, s.origin)
        if value is not None and f.metadata.get("path"):
            value = _resolve_path(value, s.base_dir)
        values[key] = value
    origins = {k: s.origin for k, s in settings.items()}
    try:
        cfg = _assemble(values)
    except _Invalid as e:
        raise ConfigError(f"{origins.get(e.key, 'default')}: {e.key}: {e.message}") from None
    return cfg


def _resolve_path(value: str, base_dir: Path | None) -> str:
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p.resolve()) if p.is_absolute() else str(p)


def did_you_mean(key: str, options) -> str:
    """" (did you mean 'x'?)" for the option closest to a misspelt key, else ""."""
    hint = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def within(low: float, high: float | None = None) -> dict[str, Any]:
    """Field metadata of a number's inclusive range, checked (and named in errors) by `coerce_dataclass`."""
    return {"within": (low, high)}


def _coerce(key: str, value: Any, tp: Any, origin: str, strict: bool = False,
            bounds: tuple[float, float | None] | None = None) -> Any:
    """`value` as type `tp` (a number within `bounds`), or a ConfigError `origin: key: expected ..., got ...`.

    strict (a search space's settings): the value must already have the type, as YAML parsed it: no
    numeric strings, no integer-valued floats for integers, no numbers for strings, no NaN or infinity.
    Otherwise (configs and `--set`) those are converted: YAML 1.1 reads 1e-3 as a string."""
    low, high = bounds or (None, None)
    span = "" if bounds is None else f" >= {low}" if high is None else f" in [{low}, {high}]"

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: {key}: expected {expected}{span}, got {value!r}")

    def checked(number: float, expected: str) -> Any:
        if bounds is not None and not (number >= low and (high is None or number <= high)):
            raise bad(expected)
        return number

    origin_t = get_origin(tp)
    if origin_t in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], origin, strict, bounds)
    if origin_t is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in allowed:
            raise bad("one of " + ", ".join(repr(a) for a in allowed))
        return value
    if isinstance(value, str) and tp in (int, float) and not strict:
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; users write it that way
            value = float(value)
        except ValueError:
            pass
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int if strict else (int, float)):
            raise bad("an integer")
        if isinstance(value, float) and not value.is_integer():
            raise bad("an integer")
        return checked(int(value), "an integer")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if strict and not math.isfinite(value):
            raise bad("a finite number")
        return checked(float(value), "a number")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None or (strict and not isinstance(value, str)):
            raise bad("a string")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


D = TypeVar("D")


def coerce_dataclass(cls: type[D], raw: Any, key: str, at: Callable[[str], str]) -> D:
    """The frozen dataclass `cls` from the YAML mapping `raw` found at dotted `key` (a search space's
    settings): each value strictly typed by `_coerce`, nested dataclasses in turn, absent keys at their
    defaults. An unknown key, a wrong type or a number outside its field's `within` range is a ConfigError
    `FILE:LINE: key: problem`; `at(key)` gives the FILE:LINE of a key. Other checks are the caller's, as
    `_validate` checks a Config's."""
    names = [f.name for f in fields(cls)]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{at(key)}: {key}: expected a mapping with keys {', '.join(names)}, got {raw!r}")
    for k in raw:
        if k not in names:
            raise ConfigError(f"{at(f'{key}.{k}')}: {key}.{k}: unknown key{did_you_mean(str(k), names)}; "
                              f"allowed: {', '.join(names)}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in (f for f in fields(cls) if f.name in raw):
        name = f.name
        sub, tp, value = f"{key}.{name}", hints[name], raw[name]
        inner = [a for a in (get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if inner:  # a section, or an optional one (X | None)
            none_ok = value is None and type(None) in get_args(tp)
            values[name] = None if none_ok else coerce_dataclass(inner[0], value, sub, at)
        else:
            values[name] = _coerce(sub, value, tp, at(sub), strict=True, bounds=f.metadata.get("within"))
    return cls(**values)


class _Invalid(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _assemble(values: Mapping[str, Any]) -> Config:
    sections = _sections()
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, v in values.items():
        head, _, rest = key.partition(".")
        if rest:
            per_section[head][rest] = v
        else:
            top[key] = v
    for name, cls in sections.items():
        top[name] = cls(**per_section[name])
    cfg = Config(**top)
    _validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


def _validate(cfg: Config) -> None:
    """Range and consistency checks; each names the key at fault."""
    m, d, l, o, t = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.train
    _check(m.num_classes >= 2, "model.num_classes", "must be at least 2")
    _check(m.decoder_channels >= 8, "model.decoder_channels", "must be at least 8")
    _check(m.skip_channels >= 1, "model.skip_channels", "must be at least 1")
    _check(d.crop_size >= 16, "data.crop_size", "must be at least 16")
    _check(0 < d.scale_min <= d.scale_max, "data.scale_min", "need 0 < scale_min <= scale_max")
    _check(d.workers >= 0, "data.workers", "must be >= 0")
    _check(d.val_limit >= 0, "data.val_limit", "must be >= 0 (0: all)")
    _check(d.max_pixels >= 1, "data.max_pixels", "must be at least 1")
    for k in ("synthetic_train", "synthetic_val", "synthetic_test"):
        _check(getattr(d, k) >= 1, f"data.{k}", "must be at least 1")
    _check(d.synthetic_size >= 32, "data.synthetic_size", "must be at least 32")
    _check(l.lam >= 0, "loss.lam", f"must be >= 0 (got {l.lam})")
    _validate_beyond_paper(cfg)
    _check(l.lam_warmup >= 0, "loss.lam_warmup", "must be >= 0")
    _check(0 <= l.c_bg <= 1, "loss.c_bg", f"must lie in [0, 1] (got {l.c_bg})")
    _check(0 <= l.c_fg <= 1, "loss.c_fg", f"must lie in [0, 1] (got {l.c_fg})")
    for k in ("theta_alpha", "theta_beta", "theta_gamma"):
        _check(getattr(l, k) > 0, f"loss.{k}", f"must be > 0 (got {getattr(l, k)})")
    for k in ("w1", "w2"):
        _check(getattr(l, k) >= 0, f"loss.{k}", f"must be >= 0 (got {getattr(l, k)})")
    _check(l.grad != "free_energy" or l.variant in ("exp", "none"), "loss.grad",
           f"free_energy is the free energy of the exp variant (eq. 12); with loss.variant: {l.variant} "
           "use both or detach")
    if l.variant != "none" and l.lam > 0:
        _check(l.w1 + l.w2 > 0, "loss.w1", "w1 + w2 must be > 0 when the neighbourhood loss is on")
    _check(o.batch_size >= 1, "optim.batch_size", "must be at least 1")
    _check(0 <= o.momentum < 1, "optim.momentum", "must lie in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.lr_pretrained >= 0, "optim.lr_pretrained", "must be >= 0")
    _check(o.lr_new > 0, "optim.lr_new", "must be > 0")
    _check(o.lr_step >= 1, "optim.lr_step", "must be at least 1")
    _check(0 < o.lr_gamma <= 1, "optim.lr_gamma", "must lie in (0, 1]")
    _check(o.iterations >= 1, "optim.iterations", "must be at least 1")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)")
    for key, seed in (("train.seed", t.seed), ("data.synthetic_seed", d.synthetic_seed)):
        _check(0 <= seed <= MAX_SEED, key, f"must lie in [0, {MAX_SEED}] (got {seed})")
    _check(t.eval_every >= 1, "train.eval_every", "must be at least 1")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: only at evaluations)")
    _check(t.log_every >= 1, "train.log_every", "must be at least 1")
    _check(t.overlays >= 0, "train.overlays", "must be >= 0")
    _check(
        t.device == "auto" or t.device == "cpu" or t.device == "cuda" or t.device.startswith("cuda:"),
        "train.device",
        f"must be auto, cpu, cuda or cuda:N (got {t.device!r})",
    )


def _validate_beyond_paper(cfg: Config) -> None:
    """The image-level loss, the size-aware prior, the collapse check and pseudo labels."""
    l, t = cfg.loss, cfg.train
    _check(l.cls_weight >= 0, "loss.cls_weight", f"must be >= 0 (got {l.cls_weight})")
    _check(l.cls_lse_r > 0, "loss.cls_lse_r", f"must be > 0 (got {l.cls_lse_r})")
    _check(l.cls_only_iters >= 0, "loss.cls_only_iters", "must be >= 0")
    _check(0 <= l.cls_switch_auc <= 1, "loss.cls_switch_auc", "must lie in [0, 1] (0: off)")
    _check(l.cls_only_iters == 0 or l.cls_weight > 0, "loss.cls_only_iters",
           "an image-level phase needs loss.cls_weight > 0")
    _check(l.cls_switch_auc == 0 or l.cls_only_iters > 0, "loss.cls_switch_auc",
           "switches out of the image-level phase: set loss.cls_only_iters (its longest length) too")
    _check(0 < l.object_fraction <= 1, "loss.object_fraction", f"must lie in (0, 1] (got {l.object_fraction})")
    if l.c_fg_mode == "confident":
        _check(l.object_fraction <= l.c_fg, "loss.object_fraction", "confident mode clamps to "
               f"[object_fraction, c_fg]: needs object_fraction <= c_fg (got {l.object_fraction} > {l.c_fg})")
    _check(0 <= t.collapse_after <= 1, "train.collapse_after", "must lie in [0, 1] (a share of optim.iterations)")
    _check(0 <= t.collapse_auc <= 1, "train.collapse_auc", "must lie in [0, 1]")
    _check(cfg.supervision != "pseudo" or cfg.data.pseudo_root is not None, "supervision",
           "supervision=pseudo needs data.pseudo_root (a folder written by `weakseg pseudo-labels`)")


def config_from_dict(d: Mapping[str, Any], origin: str = "checkpoint") -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints, run folders)."""
    return build_config(mapping_settings(d, origin, None))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (atomically) next to a run's outputs."""
    from weakseg.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
