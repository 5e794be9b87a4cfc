"""A trained model, loaded back from its run folder, a checkpoint, or its tracked run's id.

Every checkpoint holds the resolved config, the tokenizer and the weights, so a run can be
reloaded without the YAML it started from. :class:`Trained` bundles the three with the image
transform of evaluation and the calls downstream tasks need: load images, embed, caption. It
uses only the model contract (:mod:`registry.protocols`): any model builder's models load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from registry import Capability, ConfigError, Problem, Registry, VlframeError, in_one_line, one_line, require_capabilities
from registry.config import UNKNOWN_COMPONENT
from vlframe.config import files as configfile
from vlframe.config.root import DataConfig, VlframeConfig
from vlframe.data.loading import build_transform
from vlframe.data.samples import load_image, set_max_image_pixels
from vlframe.inference.generation import GenerationConfig, caption
from vlframe.runs import checkpoint, formats, sinks, tags
from vlframe.runs.folder import RunDir
from vlframe.runtime.precision import autocast, resolve_precision

class LoadError(VlframeError):
    """What was named is not a run folder, a checkpoint, or a reachable tracked run with one."""


@dataclass
class Trained:
    """A trained model ready for downstream work (on ``device``, in eval mode).

    ``checkpoint`` is None for a model that lives only in memory (training's validation)."""

    model: nn.Module
    tokenizer: Any
    config: VlframeConfig
    registry: Registry
    device: torch.device
    precision: str = "fp32"
    checkpoint: Path | None = None
    run: RunDir | None = None
    run_id: str | None = None
    step: int = 0
    #: The tracking store a run id was loaded from (evaluations are logged there too).
    source_uri: str | None = None
    #: Config entries that named files no longer there (the training data, a tokenizer or weights
    #: file): the model does not need them, but "the run's validation split" is then unknown.
    missing_files: tuple[str, ...] = ()
    #: Newer checkpoints of the run folder passed over (truncated, corrupt), each with why.
    passed_over: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = RunDir.of(self.checkpoint) if self.checkpoint is not None else RunDir(".")

    @property
    def checkpoint_name(self) -> str:
        return self.checkpoint.name if self.checkpoint is not None else f"step_{self.step:06d}"

    @property
    def config_file(self) -> Path:
        return (self.checkpoint / checkpoint.CONFIG) if self.checkpoint is not None else self.run.config_file

    @property
    def tracking_uri(self) -> str:
        """Where the training run was tracked: the store it was loaded from, else as its run folder
        recorded it, else its configured URI, else the embedded store of its output folder."""
        return (self.source_uri or self.run.tracking_uri
                or sinks.store_uri(configured=self.config.tracking.uri, output_dir=self.run.path.resolve().parent,
                                   catalog=self.registry.catalog))

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def autocast(self) -> Any:
        """bf16 autocast when ``precision`` asks for it, else nothing."""
        return autocast(self.precision, self.device)

    def transform(self) -> Any:
        return build_transform(self.config.data or DataConfig(), self.image_size, train=False)

    def load_images(self, images: Sequence[str | Path | Image.Image]) -> Tensor:
        """Files or PIL images -> the normalised batch ``(B, 3, S, S)`` the model expects."""
        transform = self.transform()
        pictures = [im.convert("RGB") if isinstance(im, Image.Image) else load_image(im) for im in images]
        return torch.stack([transform(p) for p in pictures]).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode(list(texts), int(self.model.context_length))
        return ids.to(self.device), mask.to(self.device)

    def require(self, capability: str, what: str) -> None:
        require_capabilities(self.model, {capability}, what)

    @torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
    def embed_images(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """Normalised contrastive image embeddings (float32)."""
        self.require(Capability.CONTRASTIVE, "embedding images")
        with self.autocast():
            out = [self.model.encode_image(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Normalised contrastive text embeddings (float32)."""
        self.require(Capability.CONTRASTIVE, "embedding texts")
        out = []
        with self.autocast():
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[i : i + batch_size])
                out.append(self.model.encode_text(ids, mask).float())
        return F.normalize(torch.cat(out), dim=-1)

    def caption(self, images: Tensor, config: GenerationConfig | None = None, **overrides: Any) -> list[list[str]]:
        """Generated captions, ``num_return_sequences`` per image, best first; without a
        ``config``, from the captioning defaults (``GenerationConfig.for_captions``)."""
        self.require(Capability.CAPTIONING, "generating captions")
        if config is None:
            config = GenerationConfig.for_captions()
        with self.autocast():
            return caption(self.model, self.tokenizer, images, config, **overrides)


def _run_folder_of(run_id: str, tagged: str | None) -> Path | None:
    """The run's local folder, from its tag, only if that folder says it is this run (its own
    tracking record holds the same run id): a tag alone never chooses what is loaded."""
    if not tagged:
        return None
    folder = RunDir(tagged)
    if folder.run_id != run_id:
        return None
    return folder.newest_checkpoint()


def _checkpoint_from_store(run_id: str, tracking_uri: str | None) -> tuple[Path, str]:
    """The run's checkpoint: its run folder when still on this machine, else its tracked artifact."""
    import shutil
    import tempfile

    uri = sinks.store_uri(given=tracking_uri)
    sink = sinks.sink_for(uri)
    try:
        run = sink.get_run(run_id)
    except LookupError as exc:
        hint = "" if tracking_uri else ("; pass --tracking-uri (or set the store's environment variable, e.g. "
                                        "MLFLOW_TRACKING_URI) to name its store")
        raise LoadError(f"{exc}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - the store is down or not a store
        raise LoadError(f"{uri} could not be reached ({one_line(exc, 200, hint=False)})") from None
    local = _run_folder_of(run_id, run.tags.get(tags.RUN_DIR))
    if local is not None:
        return local, uri
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlframe" / "runs" / run_id
    target = cache / "checkpoint"
    if checkpoint.find(target) is None:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        # Into a temporary folder first: an interrupted download never looks like a checkpoint.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                sink.download(run_id, "checkpoint", Path(tmp))
            except Exception as exc:  # noqa: BLE001 - any store failure means the same thing here
                raise LoadError(f"run {run_id} at {uri} has no usable 'checkpoint' artifact "
                                f"({in_one_line(exc, 200)})") from None
            os.replace(Path(tmp) / "checkpoint", target)
    found = checkpoint.find(target)
    if found is None:
        raise LoadError(f"run {run_id}: the downloaded 'checkpoint' artifact in {target} is incomplete")
    return found, uri


def resolve_checkpoint(source: str | Path, tracking_uri: str | None = None) -> tuple[Path, str | None, list[str]]:
    """A checkpoint folder from a run folder, a checkpoint folder, or a tracked run's id; the store
    it came from (for a run id); and the newer checkpoints of a run folder passed over because
    they could not be read, each with why."""
    path = Path(source)
    if path.exists():
        if checkpoint.is_checkpoint(path):  # named itself: used as it is (an unreadable one is an error)
            return path, None, []
        found, passed = checkpoint.find_readable(path)  # a run folder: its newest readable checkpoint
        if found is None:
            why = f" ({'; '.join(passed)})" if passed else ""
            raise LoadError(f"{path}: no {'readable ' if passed else ''}checkpoint here{why} (expected a step_* "
                            f"folder with {checkpoint.STATE}, or a run folder holding checkpoints/)")
        return found, None, passed
    uri = sinks.store_uri(given=tracking_uri)
    entry = sinks.sink_entry(uri)  # its sink says what its run ids look like
    if re.fullmatch(entry.spec.config.run_id, str(source)):
        return (*_checkpoint_from_store(str(source), tracking_uri), [])
    raise LoadError(f"{source}: neither a run folder, a checkpoint folder nor a run id of the {entry.spec.name} "
                    f"tracking sink at {uri}")


def read_checkpoint_config(ckpt: Path, registry: Registry | None = None) -> tuple[VlframeConfig, Registry, tuple[str, ...]]:
    """The config a checkpoint holds, validated with the plugins its own ``plugins:`` section names.

    Files the config names may have moved (or the run may come from another machine). The
    checkpoint holds the weights and the tokenizer, so only the data is really lost: entries
    naming missing files are dropped and listed.
    """
    config_file = ckpt / checkpoint.CONFIG
    if not config_file.is_file():
        raise LoadError(f"{ckpt}: no {checkpoint.CONFIG} (not a vlframe checkpoint?)")
    data = configfile.read_yaml(config_file)
    registry = registry or configfile.registry_for(data, str(config_file))
    if data.get("tokenizer") is None:
        raise LoadError(f"{config_file}: names no tokenizer (a checkpoint written before vlframe required one); add "
                        f"the block it was trained with, e.g. tokenizer: {{type: sentencepiece}}, the former default")
    try:
        config, _ = configfile.load(data, (), registry)
        return config, registry, ()
    except ConfigError as err:
        if any(p.code == UNKNOWN_COMPONENT and not p.path.startswith("train.parallel") for p in err.problems):
            built = (checkpoint.read_state(ckpt).get("plugins") or {}) if checkpoint.is_checkpoint(ckpt) else {}
            if built:
                hint = ", ".join(f"{name} ({source.split(', source')[0]})" for name, source in built.items())
                err = ConfigError([*err.problems, Problem("", f"this run was built with the plugins {hint}: "
                                                              "is each installed, and not blocked?", str(config_file))])
                raise err from None
        fixes: dict[str, Any] = {}
        for problem in err.problems:
            if problem.path.startswith(("data.train", "data.val")):
                fixes.update({"data.train": None, "data.val": None})
            elif problem.path.startswith("train.parallel"):  # how it was trained: the model does not need it
                fixes["train.parallel"] = None
            elif problem.path == "tokenizer.path" or problem.path.endswith(".pretrained_path"):
                fixes[problem.path] = None
            else:
                raise ConfigError([p if p.file else Problem(p.path, p.message, str(config_file))
                                   for p in err.problems]) from None
        config, _ = configfile.load(data, fixes, registry)
        return config, registry, tuple(sorted({f"{p.path}: {p.message}" for p in err.problems
                                               if not p.path.startswith("train.parallel")}))


def load_trained(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    registry: Registry | None = None,
    tracking_uri: str | None = None,
) -> Trained:
    """Load a trained model from a run folder (its newest checkpoint), a checkpoint, or a tracked run's id.

    ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 where the hardware computes it
    natively). ``tracking_uri`` names the store of a run id (default: the default sink's, MLflow's
    $MLFLOW_TRACKING_URI, else ./runs/mlflow.db). The model is built with the plugins the run's
    config names.
    """
    from vlframe.api import build_model, build_tokenizer

    ckpt, source_uri, passed = resolve_checkpoint(source, tracking_uri)
    config, registry, missing = read_checkpoint_config(ckpt, registry)
    set_max_image_pixels((config.data or DataConfig()).max_image_pixels)
    device = torch.device(device)
    model = build_model(config, registry=registry)
    state = formats.load(ckpt, model)
    tokenizer = build_tokenizer(config, registry, path=ckpt / checkpoint.TOKENIZER)
    model.to(device).eval()
    # A run trained offline has no id in its checkpoints; its folder's record has one once synced.
    run_id = state.get("run_id") or RunDir.of(ckpt).run_id
    return Trained(model, tokenizer, config, registry, device, resolve_precision(precision, device), checkpoint=ckpt,
                   run_id=run_id, step=int(state.get("step", 0)), source_uri=source_uri, missing_files=missing,
                   passed_over=tuple(passed))


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
