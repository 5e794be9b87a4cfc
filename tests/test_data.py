"""Tokenizer and dataset plugins on real files: SentencePiece, JSONL/CSV manifests, COCO, tar shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from registry import ConfigError, Kind, Registry
from vlframe import load_config
from vlframe.config import files as configfile
from vlframe.data.loading import StepSampler
from vlframe.data.samples import SampleError
from vlframe.interchange.shard_writer import write_shards

from conftest import ROOT
from training_configs import TINY, micro

SHARED = ROOT.parent / "shared" / "data"


def build(registry: Registry, kind: Kind, data: dict, **kwargs):
    entry = registry.catalog.get(kind, data["type"])
    return entry.spec.factory(registry.validate(entry.spec.config, data), **kwargs)


@pytest.fixture(scope="module")
def scenes(registry: Registry):
    return build(registry, Kind.DATASET, {"type": "synthetic", "size": 24, "image_size": 64}, split="train")


def test_sentencepiece_trains_encodes_decodes_and_reloads(tmp_path: Path, registry: Registry, scenes) -> None:
    tok = build(registry, Kind.TOKENIZER, {"type": "sentencepiece"}, vocab_size=512)
    assert not tok.trained
    path = tok.train(scenes.captions(), tmp_path)
    assert path == tmp_path / "tokenizer.model" and tok.vocab_size <= 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.cls_id) == (0, 1, 2, 4)
    captions = [scenes[0].captions[0], "A Large RED circle."]
    ids, mask = tok.encode(captions, context_length=32)
    assert ids[:, 0].tolist() == [1, 1]
    assert ids[0, mask[0].sum() - 1] == tok.eos_id and torch.equal(mask, ids != 0)
    assert tok.decode(ids[0]) == captions[0]
    assert tok.decode(ids[1]) == "a large red circle."  # lower-cased, as configured
    short, _ = tok.encode(["a small blue square at the top left and a large red circle."], context_length=6)
    assert short.shape == (1, 6) and short[0, -1] == tok.eos_id  # cut, with its end kept
    again = build(registry, Kind.TOKENIZER, {"type": "sentencepiece", "path": str(path)}, vocab_size=512)
    assert torch.equal(again.encode(captions, 32)[0], ids)
    with pytest.raises(ValueError, match="more than the model's vocab_size 8"):
        build(registry, Kind.TOKENIZER, {"type": "sentencepiece", "path": str(path)}, vocab_size=8)


def test_tokenizer_train_command(tmp_path: Path, cli) -> None:
    result = cli("tokenizer", "train", str(TINY), "--out", str(tmp_path), "--set", "data.train.size=50")
    assert result.code == 0, result.err
    assert (tmp_path / "tokenizer.model").is_file()
    assert f"use it with: --set tokenizer.path={tmp_path / 'tokenizer.model'}" in result.out


def _save_images(scenes, folder: Path, n: int) -> list[tuple[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sample = scenes[i]
        sample.image.save(folder / f"{i}.jpg")
        rows.append((f"{folder.name}/{i}.jpg", sample.captions))
    return rows


def test_jsonl_and_csv_manifests(tmp_path: Path, registry: Registry, scenes) -> None:
    rows = _save_images(scenes, tmp_path / "img", 5)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p, "captions": c}) + "\n" for p, c in rows))
    ds = build(registry, Kind.DATASET, {"type": "manifest", "path": str(jsonl)}, split="train")
    assert len(ds) == 5 and ds[2].captions == rows[2][1]
    assert ds[2].image.size == (64, 64) and ds[2].image.mode == "RGB"
    with (tmp_path / "m.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for path, captions in rows:
            for caption in captions:
                writer.writerow([path, caption])
    ds_csv = build(registry, Kind.DATASET, {"type": "manifest", "path": str(tmp_path / "m.csv"),
                                            "caption_key": "caption"}, split="val")
    assert [ds_csv[i].captions for i in range(5)] == [c for _, c in rows]
    assert list(ds_csv.captions()) == [c for _, caps in rows for c in caps]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "img/0.jpg", "captions": ["x"]}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        build(registry, Kind.DATASET, {"type": "manifest", "path": str(bad)}, split="train")


def test_coco_captions_format(tmp_path: Path, registry: Registry, scenes) -> None:
    rows = _save_images(scenes, tmp_path / "val2017", 3)
    ann = {"images": [{"id": 10 + i, "file_name": Path(p).name} for i, (p, _) in enumerate(rows)],
           "annotations": [{"image_id": 10 + i, "id": 100 * i + j, "caption": c}
                           for i, (_, caps) in enumerate(rows) for j, c in enumerate(caps)]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(ann))
    ds = build(registry, Kind.DATASET, {"type": "coco", "annotations": str(path), "images": str(tmp_path / "val2017")},
               split="val")
    assert len(ds) == 3 and [ds[i].captions for i in range(3)] == [c for _, c in rows]


@pytest.mark.skipif(not (SHARED / "coco-tiny").is_dir(), reason="../shared/data/coco-tiny is not on this machine")
def test_real_coco_tiny_and_flickr8k(registry: Registry) -> None:
    coco = build(registry, Kind.DATASET, {"type": "coco", "annotations": str(SHARED / "coco-tiny/annotations/captions_val2017.json"),
                                          "images": str(SHARED / "coco-tiny/val2017")}, split="val")
    assert len(coco) == 50 and not coco.skipped
    assert len(coco[0].captions) >= 5 and max(coco[0].image.size) == 320
    flickr = build(registry, Kind.DATASET, {"type": "manifest", "path": str(SHARED / "flickr8k/val.jsonl")}, split="val")
    assert len(flickr) == 399 and flickr[0].image.size == (128, 128) and len(flickr[0].captions) == 5


def test_shards_round_trip_and_train(tmp_path: Path, registry: Registry, scenes) -> None:
    paths, written, skipped = write_shards(scenes, tmp_path / "shards", shard_size=10)
    assert (len(paths), written, skipped) == (3, 24, [])
    ds = build(registry, Kind.DATASET, {"type": "shards", "urls": str(tmp_path / "shards/train-{000000..000002}.tar")},
               split="train")
    assert len(ds) == 24
    for i in (0, 13, 23):
        assert ds[i].captions == scenes[i].captions
        original = torch.from_numpy(np.array(scenes[i].image)).float()
        decoded = torch.from_numpy(np.array(ds[i].image)).float()
        assert (original - decoded).abs().mean() < 3  # JPEG round trip
    assert list(ds.captions()) == list(scenes.captions())
    with pytest.raises(ConfigError, match="1 shard\\(s\\) not found"):
        load_config(TINY, ["data.train={type: shards, urls: " + str(tmp_path / "nope.tar") + "}"])
    # And a few real training steps read from the shards.
    from vlframe.training.trainer import Trainer

    overrides = micro(tmp_path, **{"data.train": {"type": "shards", "urls": str(tmp_path / "shards/train-{000000..000002}.tar")},
                                   "train.batch_size": 8, "train.steps": 4, "train.checkpoint_every": None})
    config, reg = configfile.load(TINY, overrides, registry)
    result = Trainer(config, reg, run_dir=tmp_path / "run").fit()
    assert result.step == 4 and all(h["train/loss"] > 0 for h in result.history)


def test_corrupt_member_in_a_shard_is_a_sample_error(tmp_path: Path, registry: Registry, scenes) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "good", "png": _png(scenes[0].image), "txt": "a caption"})
        sink.write({"__key__": "broken", "jpg": b"not an image", "txt": "another caption"})
        sink.write({"__key__": "nocaption", "jpg": _png(scenes[1].image)})
    ds = build(registry, Kind.DATASET, {"type": "shards", "urls": str(tmp_path / "bad.tar")}, split="train")
    assert len(ds) == 2 and [e.key.split(":")[-1] for e in ds.skipped] == ["nocaption"]
    assert ds[0].captions == ["a caption"]
    with pytest.raises(SampleError, match="cannot decode image"):
        ds[1]


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_step_sampler_splits_each_global_batch_across_ranks() -> None:
    one = list(StepSampler(40, 8, rank=0, world=1, seed=3, steps=10))
    halves = [list(StepSampler(40, 8, rank=r, world=2, seed=3, steps=10)) for r in (0, 1)]
    assert all(a + b == whole for a, b, whole in zip(*halves, one))
    # 5 steps per epoch: each epoch visits every index once, in a new order.
    first, second = [i for b in one[:5] for _, i in b], [i for b in one[5:] for _, i in b]
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    resumed = list(StepSampler(40, 8, rank=0, world=1, seed=3, start_step=7, steps=3))
    assert resumed == one[7:]


def test_random_resized_crops_train_only_reproducibly_and_a_bad_range_is_refused() -> None:
    from vlframe.config.root import DataConfig
    from vlframe.data.loading import ImageTextSource, build_transform
    from vlframe.data.samples import Sample

    # A 96 x 64 gradient: every crop of another area or place shows other pixel values.
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1))
    cropped = DataConfig(crop_scale=(0.5, 0.9))
    train, val = build_transform(cropped, 32, train=True), build_transform(cropped, 32, train=False)
    plain = build_transform(DataConfig(), 32, train=False)
    draws = [train(image) for _ in range(4)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert len({d.sum().item() for d in draws}) > 1  # each draw its own crop
    assert torch.equal(val(image), plain(image)) and torch.equal(val(image), val(image))  # validation centre-crops

    class One:
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> Sample:
            return Sample(key="ramp", image=image, captions=["a ramp"])

    source = ImageTextSource(One(), train, seed=0, random_caption=False)
    # The same (epoch, index) is cropped the same way (resume, other ranks); another epoch differs.
    assert torch.equal(source[(0, 0)]["image"], source[(0, 0)]["image"])
    assert not torch.equal(source[(0, 0)]["image"], source[(1, 0)]["image"])
    for bad in ((0.9, 0.5), (0.0, 0.5), (0.5, 1.5)):
        with pytest.raises(ValueError, match="is not an area range: it needs 0 < low <= high <= 1"):
            DataConfig(crop_scale=bad)
