"""weakseg models in MLflow: log a checkpoint as an MLflow model, register it, and load it back.

The logged model is a `pyfunc` whose only artifact is a weights-only weakseg checkpoint
(the weights and the resolved config, no optimiser state). `mlflow.pyfunc.load_model(uri)`
gives a model whose `predict` maps an image batch (N, H, W, 3) uint8 RGB to label maps
(N, H, W) int64 of class indices (VOC order). Loading needs weakseg and MLflow only: not Ray,
nor the search's storage folder. `weakseg evaluate` and `weakseg export-voc` accept
`models:/NAME/VERSION` and `models:/NAME@ALIAS` through `checkpoint_of_model`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from weakseg.compat import mlflow_tracking_uri
from weakseg.errors import UserError
from weakseg.tracking.client import retry

ARTIFACT = "checkpoint"  # the pyfunc artifact key (and file stem) of the weights-only checkpoint
MODEL_NAME = "model"  # the logged model's name within its run


class Segmenter(PythonModel):
    """The pyfunc flavour: image batch -> label maps. Runs on a GPU when there is one."""

    def load_context(self, context: Any) -> None:
        from weakseg.checkpoint import load_model
        from weakseg.engine import resolve_device

        self.device = resolve_device("auto")
        self.model, self.cfg, _ = load_model(Path(context.artifacts[ARTIFACT]), self.device)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from weakseg.engine import predict_probs

        x = np.asarray(model_input)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images (N, H, W, 3) uint8 RGB, got shape {x.shape}")
        image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).permute(0, 3, 1, 2).to(self.device)
        return predict_probs(self.model, image).argmax(dim=1).cpu().numpy().astype(np.int64)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]))


def input_example() -> np.ndarray:
    """One 32x32 RGB gradient image: small, and a valid input for every backbone."""
    r = np.linspace(0, 255, 32, dtype=np.uint8)
    return np.stack(np.broadcast_arrays(r[None, :], r[:, None], r[::-1, None]), axis=-1)[None].copy()


def _quiet_pickle_warning():
    """The pickled object is a `Segmenter`, a class of the weakseg package (pickled by reference), which
    MLflow's warning about serialising arbitrary Python objects does not concern."""
    import logging

    from weakseg.tracking.client import quiet_mlflow

    return quiet_mlflow(logging.ERROR)


def _requirements() -> list[str]:
    import torch

    import weakseg

    return [f"weakseg=={weakseg.__version__}", f"mlflow>={mlflow.__version__}", f"torch>={torch.__version__.split('+')[0]}"]


def log_checkpoint_model(uri: str, run_id: str, checkpoint: Path, register_as: str | None = None,
                         tags: Mapping[str, str] | None = None, description: str = "") -> str:
    """Log `checkpoint` as the run's model (and register it under `register_as`, tagged with `tags`).
    Returns models:/NAME/VERSION when registered, else the logged model's models:/ID URI."""
    from weakseg.checkpoint import load_model, save_checkpoint

    model, cfg, state = load_model(Path(checkpoint), "cpu")
    with tempfile.TemporaryDirectory(prefix="weakseg-model-") as tmp:
        slim = Path(tmp) / f"{ARTIFACT}.pt"
        save_checkpoint(slim, cfg=cfg, model=model, iteration=int(state.get("iteration", 0)),
                        best_miou=float(state.get("best_miou", float("nan"))), metrics=state.get("metrics"))

        def log():
            with mlflow_tracking_uri(uri), _quiet_pickle_warning(), mlflow.start_run(run_id=run_id):
                return mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=Segmenter(), artifacts={ARTIFACT: str(slim)},
                    signature=_signature(), input_example=input_example(), pip_requirements=_requirements(),
                    registered_model_name=register_as, await_registration_for=60,
                )

        info = retry(log, f"logging the model of run {run_id}", attempts=2)
    if not register_as:
        return info.model_uri
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for k, v in (tags or {}).items():
        retry(lambda: client.set_model_version_tag(register_as, version, k, v), "tagging the model version")
    if description:
        retry(lambda: client.update_model_version(register_as, version, description), "describing the model version")
    return f"models:/{register_as}/{version}"


def checkpoint_of_model(model_uri: str, tracking_uri: str | None) -> Path:
    """The weights-only checkpoint inside a logged or registered model, downloaded to a temporary folder."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"{model_uri}: a models:/ source needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    from weakseg.tracking.client import check_reachable

    check_reachable(uri)
    target = Path(tempfile.mkdtemp(prefix="weakseg-model-"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target), tracking_uri=uri)
    except Exception as e:  # MlflowException: no such model, version or alias
        raise UserError(f"{model_uri}: cannot load it from {uri} ({str(e).splitlines()[0]})") from None
    found = sorted(Path(local).rglob(f"{ARTIFACT}.pt"))
    if not found:
        raise UserError(f"{model_uri}: not a weakseg model (no {ARTIFACT}.pt among its artifacts)")
    return found[0]
