"""From a dataset plugin to training batches: transforms, caption choice, sampling, skips.

Determinism is by construction, so that a resumed run and a run on another number of ranks see
the same data: the sample order of epoch ``e`` is a permutation seeded by ``(seed, e)``; step
``s`` takes the ``s``-th slice of ``global_batch`` indices and rank ``r`` its ``r``-th part; the
caption picked for an image and its random augmentation are seeded by ``(seed, epoch, index)``.
A data position is therefore just the step.

A streaming dataset (:class:`registry.protocols.StreamingDataset`) has no indices: each rank and
loader worker reads its own slot of the stream, epoch after epoch, endlessly; the caption and
augmentation are seeded by ``(seed, epoch, key)``. Its position on resume is deterministic by
seed: each worker passes over (reads, without training on) the usable samples it had used before
the step resumed from: exact while world size and worker count stay the same, approximate otherwise.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from registry import VlframeError
from vlframe.config.root import DataConfig
from vlframe.data.samples import SampleError


class DataError(VlframeError):
    """The data cannot be used: too many unusable samples, or an empty split."""


def build_transform(cfg: DataConfig, image_size: int, *, train: bool) -> Any:
    """torchvision v2 pipeline: PIL image -> normalised float tensor ``(3, size, size)``."""
    # Imported here: torchvision's import pulls in torch._dynamo (a second), which commands that
    # never load an image (config validate, plugins list) should not pay for.
    from torchvision.transforms import v2
    # Resampled while still a PIL image: PIL's filters are what CLIP-family weights were trained on.
    mode = v2.InterpolationMode(cfg.interpolation)
    steps: list[Any] = []
    if train and cfg.crop_scale is not None:
        steps.append(v2.RandomResizedCrop(image_size, scale=cfg.crop_scale, interpolation=mode, antialias=True))
    else:
        steps += [v2.Resize(image_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    steps.append(v2.ToImage())
    if train and cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class ImageTextSource(torch.utils.data.Dataset):
    """A dataset plugin's samples as ``(image tensor, one caption)``, indexed by ``(epoch, index)``.

    An unusable sample (missing or corrupt image) is replaced by the next usable one, so batches
    keep their size on every rank; the replaced keys travel with the batch to be counted.
    """

    def __init__(self, dataset: Any, transform: Any, *, seed: int, random_caption: bool) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.random_caption = random_caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, index = item
        skipped: list[tuple[str, str]] = []
        n = len(self.dataset)
        for attempt in range(n):
            try:
                sample = self.dataset[(index + attempt) % n]
                break
            except SampleError as err:
                skipped.append((err.key, err.reason))
        else:
            raise DataError(f"no usable sample in {n}: {skipped[:3]}")
        rng = random.Random(_seed(self.seed, epoch, index))
        caption = rng.choice(sample.captions) if self.random_caption else sample.captions[0]
        # Seed the transform's randomness from the sample, not from the worker's global state:
        # the same (epoch, index) is augmented the same way after a resume or on another rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, epoch, index, "transform"))
            image = self.transform(sample.image)
        return {"image": image, "caption": caption, "captions": sample.captions, "key": sample.key,
                "index": index, "skipped": skipped}


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Yields, step after step from ``start_step``, this rank's share of each global batch.

    Every epoch drops its last partial batch; ``(epoch, index)`` pairs go to the source.
    """

    def __init__(self, length: int, global_batch: int, *, rank: int, world: int, seed: int, start_step: int = 0,
                 steps: int | None = None) -> None:
        if global_batch % world:
            raise ValueError(f"batch {global_batch} does not split over {world} ranks")
        if length < global_batch:
            raise DataError(f"the training split has {length} usable samples, fewer than one batch ({global_batch})")
        self.length, self.global_batch, self.rank, self.world = length, global_batch, rank, world
        self.seed, self.start_step, self.steps = seed, start_step, steps
        self.per_epoch = length // global_batch

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world
        step = self.start_step
        order, order_epoch = None, -1
        while self.steps is None or step < self.start_step + self.steps:
            epoch, within = self.position(step)
            if epoch != order_epoch:
                order = torch.randperm(self.length, generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
                order_epoch = epoch
            start = within * self.global_batch + self.rank * local
            yield [(epoch, int(i)) for i in order[start : start + local]]
            step += 1

    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.per_epoch


@dataclass
class Batch:
    images: Tensor
    text: Tensor
    text_mask: Tensor
    captions: list[str]
    keys: list[str]
    indices: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    all_captions: list[list[str]] = field(default_factory=list)


class Collate:
    """Stack images and tokenise captions (picklable, so it runs in loader workers)."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> Batch:
        text, mask = self.tokenizer.encode([it["caption"] for it in items], self.context_length)
        return Batch(
            images=torch.stack([it["image"] for it in items]),
            text=text,
            text_mask=mask,
            captions=[it["caption"] for it in items],
            keys=[it["key"] for it in items],
            indices=[it["index"] for it in items],
            skipped=[s for it in items for s in it["skipped"]],
            all_captions=[it["captions"] for it in items],
        )


def is_streaming(dataset: Any) -> bool:
    return getattr(dataset, "streaming", False) is True


class StreamSource(torch.utils.data.IterableDataset):
    """A streaming dataset's samples as training items, endless, this rank's and worker's slot.

    DataLoader takes whole batches from its workers in turn, so worker ``w`` makes batches
    ``w, w + workers, ...``: resuming at ``start_step``, it passes over the samples of its
    batches before that.
    """

    def __init__(self, source: ImageTextSource, *, rank: int, world: int, local_batch: int, start_step: int) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.local_batch, self.start_step = local_batch, start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        src = self.source
        passed = len(range(worker, self.start_step, workers)) * self.local_batch
        pending: list[tuple[str, str]] = []
        epoch = 0
        while True:
            read = 0
            for item in src.dataset.stream(slot, slots, epoch, src.seed):
                read += 1
                if passed:  # read before the resumed step (its unusable ones are in the ledger already)
                    passed -= not isinstance(item, SampleError)
                    continue
                if isinstance(item, SampleError):
                    pending.append((item.key, item.reason))
                    continue
                rng = random.Random(_seed(src.seed, epoch, item.key))
                caption = rng.choice(item.captions) if src.random_caption else item.captions[0]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed(src.seed, epoch, item.key, "transform"))
                    image = src.transform(item.image)
                yield {"image": image, "caption": caption, "captions": item.captions, "key": item.key, "index": -1,
                       "skipped": pending}
                pending = []
            if not read:
                raise DataError(f"streaming data: rank {self.rank}, loader worker {worker} got no samples in epoch "
                                f"{epoch}: the data has fewer shards than ranks x workers ({slots}); write more, "
                                "smaller shards, lower data.num_workers, or set resampled: true")
            epoch += 1


def train_loader(source: ImageTextSource, collate: Collate, cfg: DataConfig, *, global_batch: int, rank: int,
                 world: int, seed: int, start_step: int) -> DataLoader:
    if is_streaming(source.dataset):
        local = global_batch // world
        stream = StreamSource(source, rank=rank, world=world, local_batch=local, start_step=start_step)
        return DataLoader(stream, batch_size=local, collate_fn=collate, num_workers=cfg.num_workers,
                          persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
    sampler = StepSampler(len(source), global_batch, rank=rank, world=world, seed=seed, start_step=start_step)
    return DataLoader(source, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)


class _Ordered(Sampler[list[tuple[int, int]]]):
    def __init__(self, length: int, batch: int, limit: int | None) -> None:
        self.length, self.batch = length, batch
        self.count = -(-length // batch) if limit is None else min(limit, -(-length // batch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.count):
            yield [(0, i) for i in range(b * self.batch, min(self.length, (b + 1) * self.batch))]

    def __len__(self) -> int:
        return self.count


def eval_loader(source: ImageTextSource, collate: Collate, cfg: DataConfig, *, batch: int) -> DataLoader:
    """Every sample once, in order, first caption (the same batches every time)."""
    if is_streaming(source.dataset):
        raise DataError("a streaming dataset cannot be evaluated (evaluation reads each sample once, by index): "
                        "validate on local shards (indexed) or another dataset")
    return DataLoader(source, batch_sampler=_Ordered(len(source), batch, cfg.val_batches), collate_fn=collate,
                      num_workers=cfg.num_workers)


class SkipLedger:
    """Unusable samples seen so far; stops the run past the configured fraction. ``Stateful``: a
    resumed run remembers the samples skipped before (``skipped`` in a checkpoint's state)."""

    #: A stream's fraction is judged once this many samples have been read (no length to judge by).
    STREAM_MIN = 1000

    def __init__(self, dataset: Any, max_fraction: float, samples_per_step: int = 0) -> None:
        """``samples_per_step``: what this rank reads a step (a stream's count of samples read, for
        checkpoints that did not record it)."""
        self.samples_per_step = samples_per_step
        self.streaming = is_streaming(dataset)
        self.size = 0 if self.streaming else len(dataset) + len(getattr(dataset, "skipped", []))
        self.max_fraction = max_fraction
        self.reasons: dict[str, str] = {err.key: err.reason for err in getattr(dataset, "skipped", [])}

    def add(self, skipped: Sequence[tuple[str, str]], seen: int = 0) -> None:
        if self.streaming:
            self.size += seen + len(skipped)
        for key, reason in skipped:
            self.reasons.setdefault(key, reason)
        self.check()

    @property
    def count(self) -> int:
        return len(self.reasons)

    def check(self) -> None:
        if self.streaming and self.size < self.STREAM_MIN:
            return
        if self.size and self.count / self.size > self.max_fraction:
            names = "; ".join(f"{k} ({r})" for k, r in list(self.reasons.items())[:10])
            more = f" and {self.count - 10} more" if self.count > 10 else ""
            raise DataError(
                f"{self.count} of {self.size} samples are unusable ({self.count / self.size:.1%}, more than "
                f"data.max_skip_fraction {self.max_fraction:.1%}): {names}{more}"
            )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skipped": dict(self.reasons)}
        if self.streaming:  # a stream's fraction counts from the start of the run
            state["samples_read"] = self.size
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, reason in dict(state.get("skipped") or {}).items():
            self.reasons.setdefault(str(key), str(reason))
        if self.streaming:  # checkpoints of earlier versions: the steps taken times the samples of a step
            self.size = int(state.get("samples_read", int(state.get("step", 0)) * self.samples_per_step))

    def report(self) -> str:
        if not self.count:
            return "no unusable samples"
        names = ", ".join(list(self.reasons)[:5])
        return f"{self.count} unusable sample(s) skipped (e.g. {names})"
