"""The shards dataset streamed through webdataset: the same samples as the index, a loopback HTTP
server, pipes, resampling, rank x worker splitting, unusable samples counted, training and resume."""

from __future__ import annotations

import functools
import http.server
import io
import re
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from registry import Kind, Registry
from vlframe.config import files as configfile
from vlframe.data.loading import Collate, ImageTextSource, build_transform, train_loader
from vlframe.data.samples import SampleError

from conftest import run_main
from numerics import assert_close
from training_configs import TINY, micro, sets

SHARDS = 8


def _build(registry: Registry, data: dict, split: str = "train"):
    entry = registry.catalog.get(Kind.DATASET, data["type"])
    return entry.spec.factory(registry.validate(entry.spec.config, data), split=split)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Path:
    """8 shards of 6 real PNG scenes each; shard 3 holds a corrupt image and one without caption."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("streaming_shards")
    scenes = _build(registry, {"type": "synthetic", "size": SHARDS * 6, "image_size": 64})
    for number in range(SHARDS):
        with wds.TarWriter(str(folder / f"shard-{number:06d}.tar")) as sink:
            for i in range(number * 6, number * 6 + 6):
                buf = io.BytesIO()
                scenes[i].image.save(buf, format="PNG")
                record = {"__key__": f"s{i:04d}", "png": buf.getvalue(), "txt": "\n".join(scenes[i].captions)}
                if i == 20:
                    record["png"] = b"not an image at all"
                if i == 21:
                    del record["txt"]
                sink.write(record)
    return folder


def _pattern(folder: Path | str) -> str:
    return f"{folder}/shard-{{000000..{SHARDS - 1:06d}}}.tar"


def _keys(items) -> tuple[list[str], list[str]]:
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, SampleError) else good).append(item.key.rsplit(":", 1)[-1])
    return good, bad


@pytest.fixture(scope="module")
def http_root(shards: Path):
    handler = functools.partial(_Quiet, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_streaming_reads_the_same_samples_as_the_index(registry: Registry, shards: Path) -> None:
    indexed = _build(registry, {"type": "shards", "urls": _pattern(shards)})
    assert not getattr(indexed, "streaming", False)
    index_keys = []
    for i in range(len(indexed)):
        try:
            index_keys.append(indexed[i].key.rsplit(":", 1)[-1])
        except SampleError:
            pass
    stream = _build(registry, {"type": "shards", "urls": _pattern(shards), "streaming": True, "shuffle_buffer": 0})
    assert stream.streaming is True
    good, bad = _keys(stream.stream(0, 1, 0, seed=0))
    assert sorted(good) == sorted(index_keys) and len(good) == SHARDS * 6 - 2
    assert sorted(bad) == ["s0020", "s0021"]
    sample = next(s for s in stream.stream(0, 1, 0, seed=0) if not isinstance(s, SampleError))
    assert sample.image.size == (64, 64) and sample.captions
    assert sorted(stream.captions()) == sorted(indexed.captions())


def test_an_epoch_over_two_ranks_by_two_workers_has_every_sample_once(registry: Registry, shards: Path) -> None:
    stream = _build(registry, {"type": "shards", "urls": _pattern(shards), "streaming": True})
    for epoch in (0, 1):
        seen: Counter[str] = Counter()
        for slot in range(4):  # rank r, worker w: slot r * 2 + w
            good, _ = _keys(stream.stream(slot, 4, epoch, seed=7))
            assert good, slot
            seen.update(good)
        assert len(seen) == SHARDS * 6 - 2 and set(seen.values()) == {1}, epoch
    # The shuffle differs by epoch and is the same for the same seed.
    first = _keys(stream.stream(0, 4, 0, seed=7))[0]
    assert first == _keys(stream.stream(0, 4, 0, seed=7))[0]
    assert first != _keys(stream.stream(0, 4, 1, seed=7))[0]


def test_the_loader_splits_over_ranks_and_workers_without_duplicates(registry: Registry, shards: Path) -> None:
    config, reg = configfile.load(TINY, micro(Path("/nonexistent"), **{"data.num_workers": 2}))
    stream = _build(registry, {"type": "shards", "urls": _pattern(shards), "streaming": True, "shuffle_buffer": 4})

    class Words:  # the loader's tokenizer, enough to batch
        def encode(self, texts, context_length):
            return torch.zeros(len(texts), context_length, dtype=torch.long), torch.ones(len(texts), context_length,
                                                                                          dtype=torch.bool)

    keys, skipped = [], []
    for rank in range(2):
        source = ImageTextSource(stream, build_transform(config.data, 64, train=True), seed=0, random_caption=True)
        loader = train_loader(source, Collate(Words(), 8), config.data, global_batch=8, rank=rank, world=2, seed=0,
                              start_step=0)
        batches = iter(loader)
        for _ in range(4):  # 4 batches of 4 per rank: two per worker, within one epoch of each slot
            batch = next(batches)
            assert batch.images.shape == (4, 3, 64, 64)
            keys += [k.rsplit(":", 1)[-1] for k in batch.keys]
            skipped += [k for k, _ in batch.skipped]
        del batches, loader
    assert len(keys) == 32 and len(set(keys)) == 32


def test_streams_from_a_loopback_http_server_and_a_pipe(registry: Registry, shards: Path, http_root: str) -> None:
    remote = _build(registry, {"type": "shards", "urls": _pattern(http_root), "shuffle_buffer": 0})
    assert remote.streaming is True  # URLs stream without being told
    good, bad = _keys(remote.stream(0, 1, 0, seed=0))
    assert len(good) == SHARDS * 6 - 2 and sorted(bad) == ["s0020", "s0021"]
    piped = _build(registry, {"type": "shards", "urls": [f"pipe:cat {shards}/shard-000000.tar"]})
    assert sorted(_keys(piped.stream(0, 1, 0, seed=0))[0]) == [f"s{i:04d}" for i in range(6)]
    missing = _build(registry, {"type": "shards", "urls": [f"{http_root}/no-such-shard.tar"]})
    good, bad = _keys(missing.stream(0, 1, 0, seed=0))
    assert good == [] and len(bad) == 1


def test_resampled_shards_are_endless_and_seeded(registry: Registry, shards: Path) -> None:
    stream = _build(registry, {"type": "shards", "urls": _pattern(shards), "resampled": True, "shuffle_buffer": 0})
    items = stream.stream(0, 2, 0, seed=3)
    first = [next(items) for _ in range(SHARDS * 6 * 2)]  # two epochs' worth: it does not end
    again = stream.stream(0, 2, 0, seed=3)
    assert _keys(first) == _keys([next(again) for _ in range(len(first))])
    other = stream.stream(1, 2, 0, seed=3)
    assert _keys(first) != _keys([next(other) for _ in range(len(first))])
    assert max(Counter(_keys(first)[0]).values()) > 1  # drawn with replacement


def _losses(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ loss ([\d.]+)", text, re.M)}


def test_trains_on_a_stream_counts_bad_samples_and_resumes_where_it_was(tmp_path: Path, shards: Path,
                                                                      http_root: str) -> None:
    data = {"type": "shards", "urls": _pattern(http_root), "shuffle_buffer": 8}
    overrides = micro(tmp_path, **{"data.train": data, "train.batch_size": 8, "train.steps": 12,
                                   "train.checkpoint_every": 6, "data.max_skip_fraction": 0.1})
    whole = run_main("train", str(TINY), "--run-dir", str(tmp_path / "whole"), *sets(overrides))
    assert whole.code == 0, whole.err[-2000:]
    assert "streamed through webdataset" in whole.err
    assert re.search(r"data: 2 unusable sample\(s\) skipped", whole.err), whole.err[-1000:]
    losses = _losses(whole.err)
    assert sorted(losses) == list(range(1, 13))
    import shutil

    shutil.copytree(tmp_path / "whole", tmp_path / "branch")
    shutil.rmtree(tmp_path / "branch" / "checkpoints" / "step_000012")
    (tmp_path / "branch" / ".lock").unlink(missing_ok=True)
    resumed = run_main("train", str(TINY), "--resume", str(tmp_path / "branch"), *sets(overrides))
    assert resumed.code == 0, resumed.err[-2000:]
    after = _losses(resumed.err)
    assert sorted(after) == list(range(7, 13))
    for step, loss in after.items():  # the same world size and workers: the same samples
        assert_close(loss, losses[step], depth="steps", printed=1e-3, what=f"step {step}")


def test_evaluating_a_stream_is_one_clear_line(tmp_path: Path, shards: Path) -> None:
    overrides = micro(tmp_path, **{"data.train": {"type": "shards", "urls": _pattern(shards)},
                                   "data.val": {"type": "shards", "urls": _pattern(shards), "streaming": True},
                                   "train.batch_size": 8, "train.steps": 2, "train.val_every": 1})
    result = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides))
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.val" in errors[0] and "a streaming dataset cannot be evaluated" in errors[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
