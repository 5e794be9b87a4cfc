"""A trained model, loaded back from its run folder, a checkpoint, or its MLflow run id.

Every checkpoint holds the resolved config, the tokenizer and the weights, so a run can be
reloaded without the YAML it started from. :class:`Trained` bundles the three with the image
transform of evaluation and the calls downstream tasks need: load images, embed, caption.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from registry import ConfigError, Registry, VlframeError
from vlframe import checkpoint, configfile
from vlframe.config import DataConfig, VlframeConfig
from vlframe.data import build_transform
from vlframe.datasets import load_image
from vlframe.generation import GenerationConfig, caption

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class LoadError(VlframeError):
    """What was named is not a run folder, a checkpoint, or a reachable MLflow run with one."""


@dataclass
class Trained:
    """A trained model ready for downstream work (on ``device``, in eval mode)."""

    model: nn.Module
    tokenizer: Any
    config: VlframeConfig
    checkpoint: Path
    run_id: str | None
    registry: Registry
    device: torch.device
    precision: str = "fp32"
    step: int = 0
    #: The MLflow store a run id was loaded from (evaluations are logged there too).
    source_uri: str | None = None
    #: Config entries that named files no longer there (the training data, a tokenizer or weights
    #: file): the model does not need them, but "the run's validation split" is then unknown.
    missing_files: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return checkpoint.run_dir_of(self.checkpoint)

    @property
    def tracking_uri(self) -> str:
        """Where the training run was tracked: as its run folder recorded it (``tracking/run.json``),
        else its configured URI, else the embedded store of its output folder."""
        if self.source_uri:
            return self.source_uri
        try:
            recorded = json.loads((self.run_dir / "tracking" / "run.json").read_text(encoding="utf-8"))["uri"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        return recorded or self.config.tracking.uri or f"sqlite:///{self.run_dir.resolve().parent / 'mlflow.db'}"

    @property
    def image_size(self) -> int:
        return self.model.image_encoder.image_size

    def autocast(self) -> Any:
        """bf16 autocast when ``precision`` asks for it, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def transform(self) -> Any:
        return build_transform(self.config.data or DataConfig(), self.image_size, train=False)

    def load_images(self, images: Sequence[str | Path | Image.Image]) -> Tensor:
        """Files or PIL images -> the normalised batch ``(B, 3, S, S)`` the model expects."""
        transform = self.transform()
        pictures = [im.convert("RGB") if isinstance(im, Image.Image) else load_image(im) for im in images]
        return torch.stack([transform(p) for p in pictures]).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode(list(texts), self.config.model.context_length)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
    def embed_images(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """Normalised contrastive image embeddings (float32)."""
        with self.autocast():
            out = [self.model.encode_image(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Normalised contrastive text embeddings (float32)."""
        out = []
        with self.autocast():
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[i : i + batch_size])
                out.append(self.model.encode_text(ids, mask).float())
        return F.normalize(torch.cat(out), dim=-1)

    def caption(self, images: Tensor, config: GenerationConfig | None = None, **overrides: Any) -> list[list[str]]:
        """Generated captions, ``num_return_sequences`` per image, best first."""
        with self.autocast():
            return caption(self.model, self.tokenizer, images, config, **overrides)


def mlflow_uri(tracking_uri: str | None) -> str:
    """The store to look a run id up in: the given URI, $MLFLOW_TRACKING_URI, or ./runs/mlflow.db."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


def _checkpoint_from_mlflow(run_id: str, tracking_uri: str | None) -> Path:
    """The run's checkpoint: its run folder when still on this machine, else its logged artifact."""
    import shutil
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = mlflow_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise LoadError(f"MLflow run {run_id} not found at {uri} ({exc.message.splitlines()[0]}); "
                        "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to name its store") from None
    local = run.data.tags.get("vlframe.run_dir")
    if local and (found := checkpoint.find(Path(local))) is not None:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlframe" / "mlflow" / run_id
    target = cache / "checkpoint"
    if checkpoint.find(target) is None:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        # Into a temporary folder first: an interrupted download never looks like a checkpoint.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                client.download_artifacts(run_id, "checkpoint", tmp)
            except Exception as exc:  # noqa: BLE001 - any store failure means the same thing here
                raise LoadError(f"MLflow run {run_id} at {uri} has no usable 'checkpoint' artifact ({exc})") from None
            os.replace(Path(tmp) / "checkpoint", target)
    found = checkpoint.find(target)
    if found is None:
        raise LoadError(f"MLflow run {run_id}: the downloaded 'checkpoint' artifact in {target} is incomplete")
    return found


def resolve_checkpoint(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A checkpoint folder from a run folder, a checkpoint folder, or an MLflow run id."""
    path = Path(source)
    if path.exists():
        found = checkpoint.find(path)
        if found is None:
            raise LoadError(f"{path}: no checkpoint here (expected a step_* folder with {checkpoint.STATE}, "
                            "or a run folder holding checkpoints/)")
        return found
    if _RUN_ID.match(str(source)):
        return _checkpoint_from_mlflow(str(source), tracking_uri)
    raise LoadError(f"{source}: neither a run folder, a checkpoint folder nor an MLflow run id")


def load_trained(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    registry: Registry | None = None,
    tracking_uri: str | None = None,
) -> Trained:
    """Load a trained model from a run folder (its newest checkpoint), a checkpoint, or an MLflow run id.

    ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 where the hardware computes it
    natively). ``tracking_uri`` names the MLflow store of a run id (default: $MLFLOW_TRACKING_URI,
    else ./runs/mlflow.db).
    """
    from vlframe.api import build_model, build_tokenizer
    from vlframe.trainer import resolve_precision

    ckpt = resolve_checkpoint(source, tracking_uri)
    registry = registry or Registry.discover()
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise LoadError(f"{ckpt}: no config.yaml (not a vlframe checkpoint?)")
    missing: tuple[str, ...] = ()
    try:
        config, _ = configfile.load(config_file, (), registry)
    except ConfigError as err:
        # Files the config names may have moved (or the run may come from another machine). The
        # checkpoint holds the weights and the tokenizer, so only the data is really lost.
        fixes: dict[str, Any] = {}
        for problem in err.problems:
            if problem.path.startswith(("data.train", "data.val")):
                fixes.update({"data.train": {"type": "synthetic"}, "data.val": None})
            elif problem.path == "tokenizer.path" or problem.path.endswith(".pretrained_path"):
                fixes[problem.path] = None
            else:
                raise
        config, _ = configfile.load(config_file, fixes, registry)
        missing = tuple(sorted({str(p) for p in err.problems}))
    device = torch.device(device)
    model = build_model(config, registry=registry)
    state = checkpoint.load(ckpt, model)
    tokenizer = build_tokenizer(config, registry, path=ckpt / "tokenizer.model")
    model.to(device).eval()
    from_mlflow = not Path(source).exists()
    return Trained(model, tokenizer, config, ckpt, state.get("run_id"), registry, device,
                   resolve_precision(precision, device), step=int(state.get("step", 0)),
                   source_uri=mlflow_uri(tracking_uri) if from_mlflow else None, missing_files=missing)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with gradients off and in eval mode, restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
