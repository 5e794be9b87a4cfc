"""Downstream evaluation of a trained model: captioning, retrieval and zero-shot classification.

Each task takes a :class:`~vlframe.pretrained.Trained` model and a dataset built by a dataset
plugin, and returns an :class:`EvalResult`: metrics in percent (as papers report them), a few
counts, and the files it wrote. :func:`log_result` files a result under the training run in
MLflow. Probes and the multimodal-understanding head live in :mod:`vlframe.probes`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from registry import ConfigError, Kind, Problem
from vlframe.datasets import Sample, SampleError
from vlframe.generation import GenerationConfig
from vlframe.metrics import retrieval_recall
from vlframe.pretrained import Trained


@dataclass
class EvalResult:
    """One evaluation: ``metrics`` in percent, ``info`` (counts, settings), ``files`` written."""

    task: str
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        values = "  ".join(f"{k} {v:.2f}" for k, v in self.metrics.items())
        return f"{self.task}: {values}"


# -- datasets ------------------------------------------------------------------------------


def dataset_block(trained: Trained, block: dict[str, Any], where: str) -> Any:
    """A dataset block (``{type: ..., ...}``) validated against its plugin's config; errors name ``where``."""
    from pydantic import ValidationError

    if not isinstance(block, dict) or "type" not in block:
        raise ConfigError([Problem("type", "a dataset block is a mapping with a 'type' key", where)])
    slot = trained.registry.catalog.get(Kind.DATASET, str(block["type"]))
    try:
        return slot.spec.config.model_validate(block)
    except ValidationError as exc:
        raise ConfigError([Problem(".".join(map(str, e["loc"])), e["msg"], where) for e in exc.errors()]) from None


def dataset_config(spec: str | Path | None, trained: Trained) -> Any:
    """The dataset config ``spec`` names (``--data`` on the command line).

    ``None``: the run's validation split (its training split if it had none). ``synthetic``: the
    built-in scenes' validation split. A ``.yaml`` file: a dataset block (``type: ...``). A
    ``.jsonl``/``.csv`` file: a manifest. A COCO ``captions_*.json``: COCO, with images in the
    folder named after it (``captions_val2017.json`` -> ``val2017/`` beside ``annotations/``).
    A folder: ImageFolder classes.
    """
    data = trained.config.data
    if spec is None:
        if trained.missing_files:
            raise ConfigError([Problem("data", f"the run's data is not where its config says ({trained.missing_files[0]}); "
                                       "pass --data", str(trained.checkpoint / "config.yaml"))])
        block = (data.val or data.train) if data is not None else None
        if block is None:
            raise ConfigError([Problem("data", "the run's config names no dataset; pass --data")])
        return block
    if str(spec) == "synthetic":
        if data is not None and data.val is not None and data.val.type == "synthetic":
            return data.val
        return dataset_block(trained, {"type": "synthetic"}, "synthetic")
    path = Path(spec)
    if not path.exists():
        raise ConfigError([Problem("", f"no such file or folder: {path}", "--data")])
    if path.is_dir():
        return dataset_block(trained, {"type": "imagefolder", "root": str(path)}, str(path))
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return dataset_block(trained, yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    if suffix in (".jsonl", ".csv"):
        return dataset_block(trained, {"type": "manifest", "path": str(path)}, str(path))
    if suffix == ".json":
        name = path.stem.removeprefix("captions_")
        for images in (path.parent.parent / name, path.parent / name):
            if images.is_dir():
                return dataset_block(trained, {"type": "coco", "annotations": str(path), "images": str(images)}, str(path))
        raise ConfigError([Problem("", f"COCO images for {path.name} not found in {path.parent.parent / name}; "
                                   "write a dataset YAML (type: coco, annotations, images)", str(path))])
    raise ConfigError([Problem("", f"cannot tell what dataset {path} is (.yaml, .jsonl, .csv, .json or a folder)",
                               "--data")])


def build_dataset(trained: Trained, spec: str | Path | None, split: str = "val") -> Any:
    """The dataset ``spec`` names (see :func:`dataset_config`); the run's own data when None."""
    config = dataset_config(spec, trained)
    data = trained.config.data
    if spec is None and data is not None and data.val is None:
        split = "train"  # the run had no validation split: say so in the result (see describe())
    return trained.registry.catalog.build(Kind.DATASET, config, path="--data", split=split)


def describe(dataset: Any) -> str:
    return dataset.describe() if hasattr(dataset, "describe") else type(dataset).__name__


def iter_samples(dataset: Any, limit: int | None = None, skipped: list[str] | None = None) -> Iterator[Sample]:
    """Usable samples in order (map-style or iterable), at most ``limit``; unusable ones are listed."""
    count = 0
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        def source() -> Iterator[Sample | SampleError]:
            for i in range(len(dataset)):
                try:
                    yield dataset[i]
                except SampleError as err:
                    yield err
    else:
        def source() -> Iterator[Sample | SampleError]:
            yield from dataset
    for item in source():
        if limit is not None and count >= limit:
            return
        if isinstance(item, SampleError):
            if skipped is not None:
                skipped.append(str(item))
            continue
        count += 1
        yield item


def batched(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- captioning ------------------------------------------------------------------------------


def _thumbnail(image: Any, side: int = 160) -> str:
    picture = image.copy()
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_caption_table(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """A self-contained HTML page: each image beside its generated caption and references."""
    cells = []
    for row in rows:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
        cells.append(
            f"<tr><td><img src='data:image/jpeg;base64,{row['thumbnail']}'></td>"
            f"<td><b>{html.escape(row['caption'])}</b><ul>{refs}</ul><small>{html.escape(row['key'])}</small></td></tr>"
        )
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}ul{color:#555}</style>"
            f"<h2>{html.escape(title)}</h2><table>{''.join(cells)}</table>")
    path.write_text(page, encoding="utf-8")
    return path


def evaluate_captions(
    trained: Trained,
    dataset: Any,
    *,
    generation: GenerationConfig | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    out_dir: Path | None = None,
    table_rows: int = 32,
    metrics: Sequence[str] | None = None,
) -> EvalResult:
    """Caption every image and score against its references: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

    Writes ``captions.jsonl`` (every caption) and ``captions.html`` (the first ``table_rows``
    images with their captions, to look at) into ``out_dir`` when given. ``metrics`` limits the
    scores computed (METEOR starts a Java process of its own).
    """
    from vlframe.caption_metrics import UNAVAILABLE, score_captions

    generation = generation or GenerationConfig()
    candidates: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    began = time.perf_counter()
    for batch in batched(iter_samples(dataset, limit, skipped), batch_size):
        images = trained.load_images([s.image for s in batch])
        captions = trained.caption(images, generation)
        for sample, caps in zip(batch, captions):
            key = sample.key if sample.key not in candidates else f"{sample.key}#{len(candidates)}"
            candidates[key], references[key] = caps[0], list(sample.captions)
            row = {"key": key, "caption": caps[0], "references": list(sample.captions)}
            if len(rows) < table_rows:
                row["thumbnail"] = _thumbnail(sample.image)
            rows.append(row)
    if not candidates:
        raise ValueError(f"no usable image to caption ({len(skipped)} skipped: {skipped[:3]})")
    seconds = time.perf_counter() - began
    scores = score_captions(candidates, references, metrics=metrics)
    result = EvalResult(
        "caption",
        {name: 100.0 * value for name, value in scores.items()},
        {"data": describe(dataset), "images": len(candidates), "skipped": len(skipped), "seconds": round(seconds, 2),
         "generation": generation.model_dump(), "unavailable": dict(UNAVAILABLE)},
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "captions.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({k: v for k, v in row.items() if k != "thumbnail"}) + "\n")
        result.files.append(out_dir / "captions.jsonl")
        title = f"{trained.run_dir.name} ({trained.checkpoint.name}): {len(candidates)} images"
        result.files.append(write_caption_table([r for r in rows if "thumbnail" in r], out_dir / "captions.html", title))
    return result


# -- retrieval -----------------------------------------------------------------------------------


def embed_dataset(trained: Trained, dataset: Any, *, limit: int | None = None, batch_size: int = 64,
                  skipped: list[str] | None = None) -> tuple[Tensor, Tensor, Tensor, list[str], list[str]]:
    """Image embeddings, caption embeddings, each caption's image index, image keys and captions."""
    image_embeds, texts, owners, keys = [], [], [], []
    for batch in batched(iter_samples(dataset, limit, skipped), batch_size):
        image_embeds.append(trained.embed_images(trained.load_images([s.image for s in batch])))
        for sample in batch:
            owners += [len(keys)] * len(sample.captions)
            texts += sample.captions
            keys.append(sample.key)
    if not keys:
        raise ValueError("no usable image to embed")
    return torch.cat(image_embeds), trained.embed_texts(texts), torch.tensor(owners), keys, texts


def evaluate_retrieval(trained: Trained, dataset: Any, *, limit: int | None = None, batch_size: int = 64) -> EvalResult:
    """Image->text and text->image recall@1/5/10 with all of each image's captions."""
    skipped: list[str] = []
    images, texts, owners, keys, _ = embed_dataset(trained, dataset, limit=limit, batch_size=batch_size, skipped=skipped)
    metrics = retrieval_recall(images, texts, owners.to(images.device))
    return EvalResult("retrieval", metrics, {"data": describe(dataset), "images": len(keys), "captions": len(owners),
                                             "skipped": len(skipped)})


# -- zero-shot classification ------------------------------------------------------------------


class _Subset:
    """Every ``stride``-th item of a map-style dataset: ImageFolder lists images class by class, so
    a limit taken from the front would hold one or two classes; evenly spaced picks hold all."""

    def __init__(self, dataset: Any, limit: int) -> None:
        self.dataset, self.indices = dataset, [i * len(dataset) // limit for i in range(limit)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.dataset[self.indices[i]]


def labelled_images(dataset: Any, *, limit: int | None = None) -> tuple[list[Sample], Tensor]:
    """Samples that carry ``meta['label']`` and their labels (ImageFolder-style datasets).

    ``limit`` takes that many evenly spaced images of a map-style dataset (all classes)."""
    if limit is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and limit < len(dataset):
        dataset, limit = _Subset(dataset, limit), None
    samples = list(iter_samples(dataset, limit))
    if not samples or "label" not in samples[0].meta:
        raise ValueError("this dataset has no class labels (use an ImageFolder folder: --data DIR)")
    return samples, torch.tensor([s.meta["label"] for s in samples])


def evaluate_zeroshot(trained: Trained, dataset: Any, *, templates: Sequence[str] | None = None,
                      limit: int | None = None, batch_size: int = 64) -> EvalResult:
    """Top-1/top-5 accuracy of a text classifier built from class names x prompt templates."""
    from vlframe.zeroshot import PROMPT_TEMPLATES, classify, topk_accuracy, zero_shot_classifier

    classes = getattr(dataset, "classes", None)
    if not classes:
        raise ValueError("zero-shot needs a dataset with class names (an ImageFolder folder: --data DIR)")
    templates = list(templates or PROMPT_TEMPLATES)
    classifier = zero_shot_classifier(trained.embed_texts, classes, templates)
    samples, labels = labelled_images(dataset, limit=limit)
    embeds = torch.cat([trained.embed_images(trained.load_images([s.image for s in batch]))
                        for batch in batched(iter(samples), batch_size)])
    accuracy = topk_accuracy(classify(embeds, classifier.to(embeds.device)), labels.to(embeds.device))
    return EvalResult("zeroshot", {k: 100.0 * v for k, v in accuracy.items()},
                      {"data": describe(dataset), "images": len(samples), "classes": len(classes),
                       "templates": len(templates)})


# -- tracking ------------------------------------------------------------------------------------


def save_result(result: EvalResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps({"task": result.task, "metrics": result.metrics, "info": result.info}, indent=2,
                               default=str), encoding="utf-8")
    if path not in result.files:
        result.files.append(path)
    return path


def log_result(trained: Trained, result: EvalResult, *, tracking_uri: str | None = None, name: str | None = None,
               step: int | None = None) -> tuple[str | None, str]:
    """Log ``result`` to MLflow; return ``(run id, message)``.

    Metrics go to the training run as ``eval/<name>/<metric>`` (``name`` defaults to the task)
    and files under the artifact folder ``eval/<name>``. A run trained without tracking gets a
    new run in the same experiment, tagged with the checkpoint it evaluated. If MLflow cannot be
    reached, nothing is lost: the result stays in the files written beside the run, and the
    message says so.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from vlframe.tracking import experiment_id

    uri = tracking_uri or trained.tracking_uri
    name = name or result.task
    step = step if step is not None else trained.step
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = trained.run_id
        if run_id is None:
            experiment = experiment_id(client, trained.config.tracking.experiment)
            run = client.create_run(experiment, run_name=f"eval-{trained.run_dir.name}",
                                    tags={"vlframe.checkpoint": str(trained.checkpoint.resolve())})
            run_id = run.info.run_id
            client.set_terminated(run_id)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{name}/{k}", float(v), now, step)
                                          for k, v in result.metrics.items()])
        client.set_tag(run_id, f"vlframe.eval.{name}", json.dumps(result.info, default=str)[:4000])
        for path in result.files:
            client.log_artifact(run_id, str(path), f"eval/{name}")
    except Exception as exc:  # noqa: BLE001 - the store is optional; the files are the record
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = result.files[0].parent if result.files else "the run folder"
        return None, f"MLflow at {uri} could not be reached ({first}); the result is kept in {where}"
    return run_id, f"logged to MLflow run {run_id} at {uri} (metrics eval/{name}/*)"


def default_out_dir(trained: Trained, task: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return trained.run_dir / "eval" / f"{task}-{trained.checkpoint.name}-{stamp}"


__all__ = [
    "EvalResult",
    "batched",
    "build_dataset",
    "dataset_config",
    "default_out_dir",
    "embed_dataset",
    "evaluate_captions",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "iter_samples",
    "labelled_images",
    "log_result",
    "save_result",
    "write_caption_table",
]
