"""Self-describing checkpoints: weights, optimiser, schedule, iteration and the resolved config.

A checkpoint alone rebuilds its model (`load_model`), so `weakseg evaluate` and
`weakseg export-voc` need nothing else. Files are written atomically and read
with `torch.load(weights_only=True)`: a checkpoint can't run code on load.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import weakseg
from weakseg.config import Config, config_from_dict
from weakseg.errors import UserError
from weakseg.io import atomic_write_bytes
from weakseg.model import SegNet

FORMAT = "weakseg-checkpoint"
FORMAT_VERSION = 2  # 2: decoder convolutions have a bias (1: they had none; read as a zero bias)


def save_checkpoint(
    path: Path,
    *,
    cfg: Config,
    model: nn.Module,
    iteration: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    best_miou: float = float("nan"),  # peak val mIoU so far: information, never the reported score
    metrics: dict[str, float] | None = None,
) -> None:
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weakseg_version": weakseg.__version__,
        "config": cfg.to_dict(),
        "iteration": iteration,
        "best_miou": float(best_miou),
        "metrics": dict(metrics or {}),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": {"torch": torch.get_rng_state()},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint; bad files are a UserError naming them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch file ({first})") from None
    except Exception as e:  # weights_only refuses pickled objects: not ours
        raise UserError(f"checkpoint {path} can't be loaded safely ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a weakseg checkpoint (no '{FORMAT}' header)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {state['format_version']}; "
            f"this weakseg reads up to {FORMAT_VERSION}: upgrade weakseg"
        )
    return state


def checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    try:
        return config_from_dict(state["config"], origin=f"checkpoint {path}")
    except UserError as e:
        raise UserError(f"checkpoint {path}: its config is not valid for this weakseg version: {e}") from None


def model_from_config(cfg: Config, pretrained: bool = True) -> SegNet:
    from weakseg.model import build_model

    m = cfg.model
    return build_model(
        m.backbone, m.num_classes, m.decoder_channels, m.skip_channels, m.pretrained if pretrained else "none",
        m.padding,
    )


def load_weights(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load weights strictly; a checkpoint of another architecture is a clear error."""
    own = unwrap(model).state_dict()
    theirs = dict(state["model"])
    if state.get("format_version", 1) < 2:  # decoder convs without bias: a zero bias is the same model
        for k, v in own.items():
            if k not in theirs and k.endswith(".0.bias") and k.removesuffix("bias") + "weight" in theirs:
                theirs[k] = torch.zeros_like(v)
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [k for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch in {wrong[:3]}")
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        raise UserError(f"checkpoint {path} does not fit this model config: " + "; ".join(parts))
    unwrap(model).load_state_dict(theirs)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[SegNet, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from, in eval mode."""
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)
    model = model_from_config(cfg, pretrained=False)
    load_weights(model, state, path)
    model.to(device).eval()
    return model, cfg, state


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)
