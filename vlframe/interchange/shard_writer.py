"""Writing any dataset as WebDataset tar shards (read back by the ``shards`` dataset plugin)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vlframe.data.samples import SampleError


def write_shards(dataset: Any, out: Path, *, prefix: str = "train",
                 shard_size: int = 1000) -> tuple[list[Path], int, list[SampleError]]:
    """Write every usable sample of ``dataset`` as ``<key>.jpg`` + ``<key>.txt`` (one caption per line).

    Returns the shard paths, the samples written and the samples found unusable when read (those
    the dataset set aside when it was built are its ``skipped``).
    """
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for index in range(len(dataset)):
            try:
                sample = dataset[index]
            except SampleError as err:
                skipped.append(err)
                continue
            jpeg = io.BytesIO()
            sample.image.save(jpeg, format="JPEG", quality=95)
            sink.write({"__key__": f"{index:09d}", "jpg": jpeg.getvalue(), "txt": "\n".join(sample.captions)})
            written += 1
    return sorted(out.glob(f"{prefix}-*.tar")), written, skipped
