"""Datasets for evaluation: what ``--data`` names, and iterating a dataset's samples.

A ``--data`` spec is resolved through the registry, never by naming a dataset plugin here:

- none: the run's validation split (its training split if it had none);
- a mapping: a dataset block (``{type: ..., ...}``);
- a registered dataset's name: that dataset with its defaults, or the run's own block of that
  type when the run used one (``--data synthetic`` on a run trained on synthetic scenes);
- a ``.yaml`` file: a dataset block;
- any other path: the dataset whose config accepts it (``DatasetConfig.from_path``); when
  several do, the user writes a dataset block to choose.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from registry import Catalog, ComponentConfig, ConfigError, Kind, Problem
from vlframe.data.samples import Sample, SampleError

if TYPE_CHECKING:
    from vlframe.inference.trained import Trained


def dataset_block(catalog: Catalog, block: Any, where: str) -> ComponentConfig:
    """A dataset block validated against its plugin's config; errors name ``where``."""
    from vlframe.config.files import component_block

    return component_block(catalog, Kind.DATASET, block, where)


def _from_path(catalog: Catalog, path: Path) -> ComponentConfig:
    offers, objections = [], []
    for entry in catalog.entries(Kind.DATASET):
        reader = getattr(entry.spec.config, "from_path", None)
        if not callable(reader):
            continue
        try:
            block = reader(path)
        except ValueError as exc:  # it recognises the path but something is missing: said if no one reads it
            objections.append(f"{entry.spec.name}: {exc}")
            continue
        if block is not None:
            offers.append((entry, block))
    if not offers and objections:
        raise ConfigError([Problem("", "; ".join(objections), str(path))])
    if not offers:
        readers = [e.spec.name for e in catalog.entries(Kind.DATASET)
                   if callable(getattr(e.spec.config, "from_path", None))]
        raise ConfigError([Problem("", f"no registered dataset reads {path} (datasets that read paths: "
                                   f"{', '.join(readers) or 'none'}); write a dataset YAML (type: ...)", "--data")])
    if len(offers) > 1:
        names = " and ".join(f"'{e.spec.name}' [{e.plugin}]" for e, _ in offers)
        raise ConfigError([Problem("", f"{path} can be read by {names}; write a dataset YAML naming one "
                                   "(type: ...)", "--data")])
    entry, block = offers[0]
    return dataset_block(catalog, block, str(path))


def dataset_config(spec: str | Path | Mapping[str, Any] | None, trained: Trained) -> ComponentConfig:
    """The dataset config ``spec`` names (see the module docstring)."""
    from vlframe.config.files import read_yaml

    catalog = trained.registry.catalog
    data = trained.config.data
    own = [b for b in ((data.val, data.train) if data is not None else ()) if b is not None]
    if spec is None:
        if trained.missing_files:
            raise ConfigError([Problem("data", f"the run's data is not where its config says "
                                       f"({trained.missing_files[0]}); pass --data", str(trained.config_file))])
        if not own:
            raise ConfigError([Problem("data", "the run's config names no dataset; pass --data")])
        return own[0]
    if isinstance(spec, Mapping):
        return dataset_block(catalog, spec, "dataset block")
    path = Path(spec)
    if not path.exists() and str(spec) in catalog.names(Kind.DATASET):
        same = [b for b in own if b.type == str(spec)]
        return same[0] if same else dataset_block(catalog, {"type": str(spec)}, f"--data {spec}")
    if not path.exists():
        raise ConfigError([Problem("", f"no such file or folder, and no dataset named '{spec}': {path}", "--data")])
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return dataset_block(catalog, read_yaml(path), str(path))
    return _from_path(catalog, path)


def build_dataset(trained: Trained, spec: str | Path | Mapping[str, Any] | None, split: str = "val") -> Any:
    """The dataset ``spec`` names, built; the run's own data when None."""
    config = dataset_config(spec, trained)
    data = trained.config.data
    if spec is None and data is not None and data.val is None:
        split = "train"  # the run had no validation split: describe() says so in the result
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
