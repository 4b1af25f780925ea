"""What an unlearned model looks like in MLflow: the saved model folder behind a LoggedModel (`models:/<id>`).

`tracking.Tracker.model` creates the LoggedModel and uploads what these functions save:

- classifiers: the `pytorch` flavor (pickled module), input example `zeros(1, *input_shape)` float32 and the
  signature inferred from it and the model's logits; `mlflow.pytorch.load_model("models:/<id>")` reloads it.
- causal LMs: the same flavor (the Hugging Face module, adapters merged), input example token ids (1, L) int64,
  output its next-token logits; the tokenizer is the job's (`dataset.tokenizer`, else the facts corpus's).
- diffusion (`ConditionalDDPM`): a pyfunc (`DiffusionNoisePredictor`) whose input is a dict of arrays `noise`
  (N, C, H, W) float32 (the denoiser's `noise_shape`: latents for a latent pipeline, whose VAE is pickled along),
  `timestep` (N,) int64 and `labels` (N,) int64 and whose output is the predicted noise;
  `mlflow.pyfunc.load_model(uri).unwrap_python_model().module` is the torch module.
- adapters (`tracking.log_models: adapter`): `adapter_weights.pt`, the adapter state dict only (a model that
  exposes adapters: a PEFT model, or one with `adapter_state_dict()`); no flavor, download it.

`load_module(uri, tracking_uri)` gives the torch module back for either flavor (`download` a local copy).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

ADAPTER_FILE = "adapter_weights.pt"


# The input is a dict of three arrays, which no predict type hint describes: the signature, inferred from the
# input example, says it. MLflow's note asking for type hints (at class creation, under its own "once" filter,
# which an "ignore" filter cannot override) is recorded and dropped.
with warnings.catch_warnings(record=True):

    class DiffusionNoisePredictor(mlflow.pyfunc.PythonModel):
        """pyfunc over a class-conditional noise predictor: {noise, timestep, labels} -> predicted noise."""

        def __init__(self, module: torch.nn.Module) -> None:
            self.module = module

        def predict(self, context, model_input, params=None):  # noqa: ANN001: pyfunc's signature
            x = torch.as_tensor(np.asarray(model_input["noise"], dtype=np.float32))
            t = torch.as_tensor(np.asarray(model_input["timestep"], dtype=np.int64))
            y = torch.as_tensor(np.asarray(model_input["labels"], dtype=np.int64))
            self.module.eval()
            with torch.no_grad():
                return self.module(x, t, y).cpu().numpy()


def input_example(input_shape: tuple[int, ...], task: str) -> Any:
    """A one-sample input of the model's shape: zeros (diffusion: zero noise at timestep 0, label 0; a causal LM:
    token ids (1, L) int64, L the packed rows' length)."""
    if task == "language_modelling":
        return np.zeros((1, input_shape[-1]), dtype=np.int64)
    x = np.zeros((1, *input_shape), dtype=np.float32)
    if task == "diffusion":
        return {"noise": x, "timestep": np.zeros(1, dtype=np.int64), "labels": np.zeros(1, dtype=np.int64)}
    return x


def save_full(model: torch.nn.Module, path: Path, logged: Any, run_id: str, input_shape: tuple[int, ...] | None,
              task: str) -> None:
    """The whole model in an MLflow model folder at `path`, stamped with the LoggedModel's id."""
    import mlflow.pytorch
    from mlflow.models import Model, infer_signature

    mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                         model_id=logged.model_id)
    was_training = model.training
    model = model.cpu().eval()
    if task == "diffusion" and hasattr(model, "noise_shape"):
        input_shape = model.noise_shape  # what the denoiser takes: latents for a latent pipeline
    example = input_example(tuple(input_shape), task) if input_shape else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pickle-format caution, chosen knowingly
            if task == "diffusion":
                predictor = DiffusionNoisePredictor(model)
                signature = (infer_signature(example, predictor.predict(None, example))
                             if example is not None else None)
                mlflow.pyfunc.save_model(str(path), python_model=predictor, mlflow_model=mlflow_model,
                                         signature=signature, input_example=example,
                                         pip_requirements=["torch", "diffusers"])
            else:
                signature = None
                if example is not None:
                    with torch.no_grad():
                        output = model(torch.from_numpy(example))
                    output = getattr(output, "logits", output)  # a causal LM: token ids -> next-token logits
                    signature = infer_signature(example, output.numpy())
                mlflow.pytorch.save_model(model, str(path), mlflow_model=mlflow_model, signature=signature,
                                          input_example=example, pip_requirements=["torch"],
                                          serialization_format="pickle")
    finally:
        model.train(was_training)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's adapter weights (PEFT's adapter state dict, or `model.adapter_state_dict()`); None without."""
    if hasattr(model, "peft_config"):
        try:
            from peft import get_peft_model_state_dict
        except ImportError:
            return None
        state = get_peft_model_state_dict(model)
    elif callable(getattr(model, "adapter_state_dict", None)):
        state = model.adapter_state_dict()
    else:
        return None
    return {k: v.detach().cpu() for k, v in state.items()} or None


def save_adapter(state: dict[str, torch.Tensor], path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / ADAPTER_FILE)


def download(uri: str, tracking_uri: str | None = None) -> str:
    """A local copy of a model: `models:/<id>`, `models:/<name>/<version>`, `models:/<name>@<alias>` or any
    artifact URI, resolved in `tracking_uri` (MLflow 3.17 resolves `models:/` in the global tracking URI
    whatever `download_artifacts` is told, so the URI is turned into its artifact location here first)."""
    import mlflow.artifacts
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    if tracking_uri and uri.startswith("models:/"):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        found = get_model_name_and_version(client, uri)
        uri = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
               else client.get_model_version_download_uri(*found))
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)


def load_module(uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """The torch module a full LoggedModel holds (`models:/<id>`), whichever flavor it was logged with."""
    import mlflow.pytorch
    from mlflow.models import Model

    local = download(uri, tracking_uri)
    if "pytorch" in Model.load(local).flavors:
        return mlflow.pytorch.load_model(local)
    return mlflow.pyfunc.load_model(local).unwrap_python_model().module
