"""WebDataset tar shards: samples are files sharing a key (``0001.jpg`` + ``0001.txt``).

Two ways to read them, one config:

- **indexed** (local files, the default there): an index of member offsets is built once from
  the tar headers and each sample is read with one seek: random access, exact resume.
- **streaming** (``streaming: true``, and always for ``pipe:`` commands and URLs: ``https://``,
  ``s3://``, ``gs://``...): read front to back through the webdataset library (its ``gopen``
  opens each URL), shards split over ranks and loader workers, a shuffle buffer, and with
  ``resampled: true`` shards drawn with replacement (an endless stream, for data larger than
  an epoch). Samples that cannot be used are skipped and counted either way.

Shards are written by ``vlframe data write-shards`` (with webdataset's writer) or any WebDataset
tool. Captions come from ``<key>.txt`` (one caption per line) or ``<key>.json`` (``captions``
list or ``caption`` string).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from registry import ComponentSpec, DatasetConfig, hookimpl, in_one_line, raise_problems
from vlframe.sdk import Sample, SampleError, clean_captions, load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _is_local(url: str) -> bool:
    return ":" not in url.split("/", 1)[0] or url.startswith("file:")


class ShardsConfig(DatasetConfig):
    urls: str | list[str] = Field(description="Shards: paths or URLs (https://, s3://, gs://, pipe:COMMAND), with brace "
                                  "patterns like data/train-{000000..000009}.tar, or a list of them.")
    caption_ext: str = Field("txt", description="txt (one caption per line) or json.")
    streaming: bool | None = Field(
        None, description="Read front to back through webdataset instead of through an index; default: "
        "streaming exactly when some shard is not a local file.")
    resampled: bool = Field(False, description="Streaming: draw shards with replacement, endlessly (each rank and "
                                               "worker its own seeded draw), instead of each shard once per epoch.")
    shuffle_buffer: int = Field(1000, ge=0, description="Streaming: samples shuffled in a buffer of this size "
                                                        "(0: shard order only).")

    @classmethod
    def from_path(cls, path: Path) -> dict[str, Any] | None:
        """A ``.tar`` shard, or a folder holding ``.tar`` shards."""
        if path.is_file() and path.suffix.lower() == ".tar":
            return {"type": "shards", "urls": [str(path)]}
        if path.is_dir():
            shards = sorted(str(p) for p in path.glob("*.tar"))
            return {"type": "shards", "urls": shards} if shards else None
        return None

    @field_validator("urls")
    @classmethod
    def _expand(cls, urls: str | list[str]) -> list[str]:
        from braceexpand import braceexpand

        paths = [p for pattern in ([urls] if isinstance(urls, str) else urls) for p in braceexpand(pattern)]
        local = [p.removeprefix("file:") for p in paths if _is_local(p)]
        missing = [p for p in local if not Path(p).is_file()]
        if not paths:
            raise ValueError("no shard paths")
        if missing:
            raise ValueError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}")
        return paths

    @model_validator(mode="after")
    def _resampling_streams(self) -> ShardsConfig:
        if self.resampled and self.streaming is False:
            raise_problems("ShardsConfig", [(("resampled",), "resampled shards are read as a stream: "
                                             "leave streaming unset (or true)")])
        return self

    def is_streaming(self) -> bool:
        if self.streaming is not None:
            return self.streaming
        return self.resampled or not all(_is_local(u) for u in self.urls)


def _captions_of(data: bytes, ext: str, name: str) -> list[str]:
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(name, f"caption .{ext} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                                f"at offset {exc.start})") from None
    if ext == "json":
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SampleError(name, f"bad caption JSON: {exc}") from None
        captions = (record.get("captions") or [record.get("caption", "")]) if isinstance(record, dict) else None
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise SampleError(name, "caption JSON must be {\"captions\": [strings]} or {\"caption\": string}, "
                                    f"got {raw[:80]}")
    else:
        captions = raw.splitlines()
    return clean_captions(captions, name)


class ShardDataset:
    def __init__(self, cfg: ShardsConfig, split: str) -> None:
        self.cfg = cfg
        self.shards = [Path(p) for p in cfg.urls]
        self.index: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        self.skipped: list[SampleError] = []
        for number, shard in enumerate(self.shards):
            for key, members in self._members(shard).items():
                name = f"{shard}:{key}"
                if cfg.caption_ext not in members:
                    self.skipped.append(SampleError(name, f"no .{cfg.caption_ext} caption"))
                elif not any(ext in members for ext in IMAGE_EXTS):
                    self.skipped.append(SampleError(name, "no image member"))
                else:
                    self.index.append((number, key, members))
        self.split = split

    @staticmethod
    def _members(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
        """``{key: {extension: (data offset, size)}}`` from the tar headers alone."""
        grouped: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = f"{directory}/{stem}" if directory else stem
                    grouped.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
        except tarfile.TarError as exc:
            raise ValueError(f"{shard}: not a readable tar shard ({exc})") from None
        return grouped

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        offset, size = where
        with self.shards[shard].open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def _captions(self, shard: int, members: dict[str, tuple[int, int]], name: str) -> list[str]:
        return _captions_of(self._read(shard, members[self.cfg.caption_ext]), self.cfg.caption_ext, name)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        shard, key, members = self.index[i]
        name = f"{self.shards[shard]}:{key}"
        ext = next(e for e in IMAGE_EXTS if e in members)
        image = load_image(io.BytesIO(self._read(shard, members[ext])), key=name)
        return Sample(image, self._captions(shard, members, name), name)

    def captions(self):
        for shard, key, members in self.index:
            try:
                yield from self._captions(shard, members, f"{self.shards[shard]}:{key}")
            except SampleError:
                continue

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"{len(self.shards)} tar shard(s) ({self.split}): {len(self.index)} samples{skipped}"


class ShardStream:
    """Shards read front to back through webdataset: the streaming dataset of the contract
    (:class:`registry.protocols.StreamingDataset`): ``stream(slot, slots, epoch, seed)``."""

    streaming = True

    def __init__(self, cfg: ShardsConfig, split: str) -> None:
        self.cfg, self.split, self.urls = cfg, split, list(cfg.urls)

    def _shards(self, slot: int, slots: int, epoch: int, seed: int) -> Iterator[str]:
        if self.cfg.resampled:  # endless, each slot its own seeded draw
            rng = random.Random(f"{seed}/{slot}/{epoch}")
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        random.Random(f"{seed}/{epoch}").shuffle(order)  # every slot agrees on the order, takes its share
        yield from order[slot::slots]

    def _raw(self, slot: int, slots: int, epoch: int, seed: int) -> Iterator[dict[str, Any] | SampleError]:
        import webdataset as wds

        errors: list[SampleError] = []

        def handler(exc: Exception) -> bool:  # a shard that cannot be read: counted, the stream goes on
            url = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else "a shard"  # webdataset appends it
            errors.append(SampleError(url, f"unreadable shard data ({type(exc).__name__}: "
                                           f"{in_one_line(exc.args[0] if exc.args else exc, 200)})"))
            return True

        sources = ({"url": url} for url in self._shards(slot, slots, epoch, seed))
        samples = wds.tarfile_to_samples(handler=handler)(sources)
        if self.cfg.shuffle_buffer:
            samples = wds.filters._shuffle(samples, bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                                           rng=random.Random(f"{seed}/{slot}/{epoch}/buffer"))
        for sample in samples:
            while errors:
                yield errors.pop(0)
            yield sample
        while errors:
            yield errors.pop(0)

    def stream(self, slot: int, slots: int, epoch: int, seed: int) -> Iterator[Sample | SampleError]:
        """This slot's share (rank x loader worker) of one epoch, shuffled by ``seed``; an unusable
        sample comes as the :class:`SampleError` saying why."""
        for raw in self._raw(slot, slots, epoch, seed):
            if isinstance(raw, SampleError):
                yield raw
                continue
            name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            try:
                ext = next((e for e in IMAGE_EXTS if e in raw), None)
                if self.cfg.caption_ext not in raw:
                    raise SampleError(name, f"no .{self.cfg.caption_ext} caption")
                if ext is None:
                    raise SampleError(name, "no image member")
                captions = _captions_of(raw[self.cfg.caption_ext], self.cfg.caption_ext, name)
                yield Sample(load_image(io.BytesIO(raw[ext]), key=name), captions, name)
            except SampleError as err:
                yield err

    def captions(self) -> Iterator[str]:
        """Every caption of one pass (for training a tokenizer), in shard order."""
        for raw in self._raw(0, 1, 0, 0) if not self.cfg.resampled else ():
            if isinstance(raw, dict) and self.cfg.caption_ext in raw:
                try:
                    yield from _captions_of(raw[self.cfg.caption_ext], self.cfg.caption_ext, str(raw.get("__key__")))
                except SampleError:
                    continue

    def describe(self) -> str:
        how = "resampled" if self.cfg.resampled else "each once per epoch"
        return f"{len(self.urls)} tar shard(s) ({self.split}), streamed through webdataset, {how}"


def build(cfg: ShardsConfig, split: str) -> ShardDataset | ShardStream:
    return ShardStream(cfg, split) if cfg.is_streaming() else ShardDataset(cfg, split)


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [ComponentSpec("shards", ShardsConfig, build, "WebDataset tar shards: indexed when local, streamed "
                          "through webdataset from URLs, pipes or on request (resampling, shuffle buffer).")]
