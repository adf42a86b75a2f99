"""Each exported (or deployed) component as an MLflow logged model in the ONNX flavour: the
exported bytes unchanged, a signature of the graph's tensors, and the facts a submission needs
(backbone, weights, precision, the AI Hub deployment). A file already logged (same sha256) is
linked to the run instead of stored again."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput

from lpcvlab.config.schema import RunConfig

ONNX_SHA_TAG = "onnx_sha256"
COMPONENT_TAG = "component"


def onnx_signature(model: Any) -> Any:
    """The deployed tensors (names, shapes, dtypes) of an ONNX graph as an MLflow signature."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    weights = {t.name for t in model.graph.initializer}

    def specs(values: Any) -> Any:
        out = []
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(np.dtype(tensor_dtype_to_np_dtype(t.elem_type)), shape, v.name))
        return Schema(out)

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


@dataclass(frozen=True)
class ModelFacts:
    """What a logged model records besides its file: tags, params, and the AI Hub deployment
    (device, runtime) it is tagged with once compiled; a model tagged with another deployment is
    not reused for this one."""

    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    deployment: dict[str, str] = field(default_factory=dict)


def find_onnx_model(
    client: Any, experiment_id: str, sha256: str, deployment: dict[str, str] | None = None
) -> Any | None:
    """A READY logged model of the experiment holding this ONNX file (by content hash) whose
    deployment tags (e.g. ``aihub.device``) do not contradict ``deployment``; None if none."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.{ONNX_SHA_TAG} = '{sha256}'", max_results=50
    )
    for model in found:
        status = getattr(model.status, "name", str(model.status))
        tags = model.tags or {}
        if status.endswith("READY") and all(
            tags.get(k) in (None, v) for k, v in (deployment or {}).items()
        ):
            return model
    return None


def log_onnx_model(
    client: Any,
    run_id: str,
    experiment_id: str,
    component: str,
    path: Path,
    sha256: str,
    facts: ModelFacts | None = None,
) -> tuple[str, bool]:
    """Log ``path`` as an MLflow model (ONNX flavour) output by ``run_id``: (model ID, reused).

    A model already logged with the same sha256 (:func:`find_onnx_model`) is linked to the run
    instead: no second copy of the file. A new model holds the exported bytes unchanged (its
    ``onnx_sha256`` tag is the file's), a signature of its graph's inputs and outputs and fixed
    pip requirements (MLflow would otherwise spend seconds inferring them).
    """
    facts = facts or ModelFacts()
    existing = find_onnx_model(client, experiment_id, sha256, facts.deployment)
    if existing is not None:
        client.log_outputs(run_id, [LoggedModelOutput(existing.model_id, step=0)])
        return existing.model_id, True
    model = client.create_logged_model(
        experiment_id,
        name=component,
        source_run_id=run_id,
        tags=facts.tags | {COMPONENT_TAG: component, ONNX_SHA_TAG: sha256},
        params=facts.params or None,
        model_type="onnx",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="lpcvlab-model-") as tmp:
            local = Path(tmp) / "model"
            _save_onnx_flavour(Path(path), local, model, run_id)
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id, False


def _save_onnx_flavour(path: Path, dst: Path, logged: Any, run_id: str) -> None:
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import Model

    model = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        model_id=logged.model_id,
        run_id=run_id,
    )
    mlflow.onnx.save_model(
        model,
        str(dst),
        mlflow_model=meta,
        signature=onnx_signature(model),
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
        save_as_external_data=external,
    )
    if not external:  # the exported bytes themselves, not a re-serialisation
        shutil.copyfile(path, dst / "model.onnx")


def model_facts(s: RunConfig, component: str, weights: str) -> ModelFacts:
    """What a component's logged model records besides its file (see :class:`ModelFacts`); the
    file is the fp32 export, ``precision`` what the component is deployed in."""
    deployment = {}
    if s.hub.name == "aihub":
        deployment = {
            "aihub.device": str(s.device.aihub_name),
            "aihub.runtime": str(s.runtime.target_runtime),
        }
    return ModelFacts(
        tags={"track": s.track.name},
        params={
            "backbone": s.backbone.name,
            "preprocess": s.preprocess.name,
            "weights": weights,
            "precision": s.precision.of(component),
            "export.opset": str(s.export.opset),
        },
        deployment=deployment,
    )
