"""WebDataset-style tar shards: samples are files sharing a key (``0001.jpg`` + ``0001.txt``).

For data larger than memory: only an index of member offsets is kept, built once by reading
the tar headers, and each sample is read with one seek. Shards are written by
``vlframe data write-shards`` (with the webdataset library) or by any WebDataset tool.
Captions come from ``<key>.txt`` (one caption per line) or ``<key>.json`` (``captions`` list or
``caption`` string).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from registry import ComponentSpec, DatasetConfig, hookimpl
from vlframe.sdk import Sample, SampleError, clean_captions, load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardsConfig(DatasetConfig):
    urls: str | list[str] = Field(description="Shard paths: a brace pattern like data/train-{000000..000009}.tar, or a list.")
    caption_ext: str = Field("txt", description="txt (one caption per line) or json.")

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
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths:
            raise ValueError("no shard paths")
        if missing:
            raise ValueError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}")
        return paths


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
        data = self._read(shard, members[self.cfg.caption_ext])
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleError(name, f"caption .{self.cfg.caption_ext} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                                    f"at offset {exc.start})") from None
        if self.cfg.caption_ext == "json":
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


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [ComponentSpec("shards", ShardsConfig, ShardDataset, "WebDataset-style tar shards, read through an index.")]
