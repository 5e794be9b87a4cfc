"""Bad configs and bad data: one clear line naming the file and the dotted path (or the data file
and line), exit 2, no traceback, and nothing written; unusable images are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_main
from hardening import bomb_png, error_lines, train_micro
from registry import Kind, Registry
from training_configs import TINY, micro, sets
from vlframe.data.samples import SampleError


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A trained tokenizer and its vocabulary size."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tok")
    result = run_main("tokenizer", "train", str(TINY), "--out", str(root), *sets(micro(root)))
    assert result.code == 0, result.err
    path = root / "tokenizer.model"
    return path, spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


# (case, YAML file text or None, --set overrides, what the message says, the dotted path it names,
#  whether `config validate` catches it too: some only show once training starts on this machine)
CASES = [
    # the ten the hostile review found
    ("non_utf8_bytes", b"train:\n  lr: 0.001 # caf\xe9\n", {}, "not UTF-8 text: byte 0xe9", ":3:", True),
    ("lr_inf", None, {"train.lr": ".inf"}, "Input should be a finite number", "train.lr", True),
    ("lr_nan", None, {"train.lr": ".nan"}, "Input should be a finite number", "train.lr", True),
    ("a_billion_layers", None, {"model.text_decoder.layers": 1000000000}, "less than or equal to 1024",
     "model.text_decoder.layers", True),
    ("width_a_million", None, {"model.image_encoder.width": 1048576}, "less than or equal to 65536",
     "model.image_encoder.width", True),
    ("absurd_total_size", None, {"model.image_encoder.width": 65536, "model.image_encoder.layers": 1024,
                                 "model.image_encoder.heads": 64}, "more than any model vlframe builds", "model", True),
    ("layers_true", None, {"model.text_decoder.layers": True}, "expected a number, got a boolean (true)",
     "model.text_decoder.layers", True),
    ("vocab_size_3", None, {"model.vocab_size": 3}, "too small to train: SentencePiece needs at least",
     "tokenizer", True),
    ("output_dir_is_a_file", None, {"train.output_dir": "@FILE"}, "is a file, not a folder", "train.output_dir", True),
    ("pad_id_outside_vocabulary", None, {"model.pad_id": 512}, "512 is outside the vocabulary (vocab_size 512)",
     "model.pad_id", True),
    ("text_decoder_without_layers", None, {"model.text_decoder.layers": 0}, "the CLS token never sees the caption",
     "model.text_decoder.layers", True),
    ("set_not_yaml", None, {"train.lr": "[1, 2"}, "the value is not valid YAML", "--set", True),
    ("too_big_to_train_here", None, {"model.image_encoder.width": 8192, "model.image_encoder.layers": 64,
                                     "model.image_encoder.heads": 64}, "GiB to train", "model", False),
    # classes that passed before, kept so they stay that way
    ("unknown_field", None, {"train.lrr": 0.1}, "unknown field (did you mean 'lr'?)", "train.lrr", True),
    ("wrong_type", None, {"train.steps": "many"}, "valid integer", "train.steps", True),
    ("negative_lr", None, {"train.lr": -1}, "greater than 0", "train.lr", True),
    ("unknown_component", None, {"model.image_encoder.type": "nope"}, "unknown", "model.image_encoder.type", True),
    ("heads_do_not_divide", None, {"model.image_encoder.heads": 3}, "do not divide width",
     "model.image_encoder.heads", True),
    ("missing_data_file", None, {"data.train": {"type": "manifest", "path": "/no/such.jsonl"}}, "file not found",
     "data.train.path", True),
    ("grad_accum_does_not_divide", None, {"train.grad_accum": 3}, "does not divide batch_size",
     "train.grad_accum", True),
    ("duplicate_key", b"train:\n  lr: 0.001\n  lr: 0.002\n", {}, "duplicate key 'lr'", ":3:", True),
    ("invalid_yaml", b"train:\n  lr: [0.001\n", {}, "invalid YAML", ".yaml:", True),
    ("extends_itself", b"extends: @SELF\n", {}, "cycle", "extends", True),
    ("no_tokenizer", None, {"tokenizer": None}, "training needs a tokenizer", "tokenizer", False),
]


def _case_file(tmp_path: Path, text: bytes | None) -> Path:
    if text is None:
        return TINY
    path = tmp_path / "case.yaml"
    body = text.replace(b"@SELF", str(path).encode())
    if b"extends" not in body:
        body = b"extends: " + str(TINY).encode() + b"\n" + body
    path.write_bytes(body)
    return path


@pytest.mark.parametrize("case,text,bad,says,where,at_validate", CASES, ids=[c[0] for c in CASES])
def test_a_bad_config_is_one_clear_line_and_writes_nothing(case: str, text: bytes | None, bad: dict, says: str,
                                                           where: str, at_validate: bool, tmp_path: Path) -> None:
    config = _case_file(tmp_path, text)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    bad = {k: (str(a_file) if v == "@FILE" else v) for k, v in bad.items()}
    base = micro(tmp_path)  # untracked, output in tmp_path/runs
    args = [*sets(base), *[f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in bad.items()]]
    commands = [["train", str(config), *args]] + ([["config", "validate", str(config), *args]] if at_validate else [])
    for command in commands:
        result = run_main(*command)
        assert result.code == 2, (command[0], result.out, result.err)
        lines = error_lines(result.err)
        assert lines and all(line.startswith("error: ") for line in lines), result.err
        assert "Traceback" not in result.err
        assert any(says in line and where in line for line in lines), result.err
        file_named = str(config) if text is not None else "coca_tiny.yaml"
        assert any(file_named in line for line in lines), result.err
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))


def test_a_vocabulary_smaller_than_the_tokenizers_is_caught_by_validate(tokenizer_file, tmp_path: Path) -> None:
    path, pieces = tokenizer_file
    args = [*sets(micro(tmp_path)), "--set", f"tokenizer.path={path}", "--set", f"model.vocab_size={pieces - 1}"]
    for command in (["config", "validate"], ["train"]):
        result = run_main(*command, str(TINY), *args)
        assert result.code == 2, result.err
        assert f"has {pieces} pieces, more than the model's vocab_size {pieces - 1}" in result.err
        assert "tokenizer" in result.err and "coca_tiny.yaml" in result.err
    assert not (tmp_path / "runs").exists()


# -- bad data ---------------------------------------------------------------------------------------


def _manifest(root: Path, good: int, extra: list[str]) -> Path:
    """``good`` real PNG images with captions, then the ``extra`` manifest lines."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(good):
        Image.new("RGB", (64, 64), ((37 * i) % 256, (91 * i) % 256, 128)).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"{i:03d}.png", "captions": [f"a picture number {i}", "a square"]}))
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    return path


def _on(manifest: Path, tmp_path: Path, **extra) -> dict:
    return {"data.train": {"type": "manifest", "path": str(manifest)}, **extra}


def test_a_decompression_bomb_is_skipped_and_counted_by_every_reader(tmp_path: Path, registry: Registry) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bomb_png(data / "bomb.png")
    manifest = _manifest(data, 31, [json.dumps({"image": "bomb.png", "captions": ["a harmless picture"]})])
    run = tmp_path / "run"
    code, out, err = train_micro(tmp_path, run, **_on(manifest, tmp_path, **{
        "train.steps": 4, "train.batch_size": 16, "data.max_skip_fraction": 0.1, "train.checkpoint_every": None}))
    assert code == 0, err
    from vlframe.runs import checkpoint

    skipped = checkpoint.read_state(run / "checkpoints" / "step_000004")["skipped"]
    assert list(skipped) == [str(data / "bomb.png")]
    assert skipped[str(data / "bomb.png")] == "image too large (400 Mpixels, more than data.max_image_pixels 89 Mpixels)"
    assert "1 unusable sample(s) skipped" in out + err
    # eval: skipped and counted in the result
    result = run_main("eval", str(run), "--task", "caption", "--data", str(manifest), "--no-track",
                      "--out", str(tmp_path / "eval"), "--max-length", "4")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["info"]["skipped"] == 1
    # caption: the one image asked for is unusable: a clear error
    result = run_main("caption", str(run), str(data / "bomb.png"))
    assert result.code == 2 and "bomb.png: image too large (400 Mpixels" in result.err, result.err
    # write-shards: skipped and reported; and in a shard, the reader skips it the same way
    result = run_main("data", "write-shards", str(TINY), "--out", str(tmp_path / "shards"),
                      *sets(micro(tmp_path, **_on(manifest, tmp_path))))
    assert result.code == 0, result.err
    assert "wrote 31 samples" in result.out and "1 unusable skipped (0 when the dataset was built, 1 when read)" \
        in result.out and "bomb.png: image too large" in result.out
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shards" / "bomb-000000.tar")) as sink:
        sink.write({"__key__": "000000001", "png": (data / "bomb.png").read_bytes(), "txt": "a picture"})
        sink.write({"__key__": "000000002", "png": (data / "000.png").read_bytes(), "txt": "a square"})
    entry = registry.catalog.get(Kind.DATASET, "shards")
    shards = entry.spec.factory(registry.validate(entry.spec.config, {
        "type": "shards", "urls": str(tmp_path / "shards" / "bomb-000000.tar")}), split="train")
    with pytest.raises(SampleError, match="image too large"):
        shards[0]
    assert shards[1].captions == ["a square"]


def test_the_pixel_limit_is_a_data_setting(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "data", 20, [])
    code, _, err = train_micro(tmp_path, tmp_path / "run", **_on(manifest, tmp_path, **{
        "data.max_image_pixels": 1000, "train.steps": 2}))
    assert code == 2
    assert "no usable sample in 20" in err
    assert "image too large (64 x 64 = 4,096 pixels, more than data.max_image_pixels 1,000 pixels)" in err


@pytest.mark.parametrize("line,says", [
    (b'{"image": "000.png", "captions": ["caf\xe9"]}', "manifest.jsonl:3: not UTF-8 text (byte 0xe9 at column 39)"),
    (b'{"image": "000.png", "captions": 5}', "manifest.jsonl:3: 'captions' must be a string or a list of strings, got 5"),
    (b'{"image": 7, "captions": ["x"]}', "manifest.jsonl:3: 'image' must be a path (a string), got 7"),
])
def test_a_bad_manifest_line_is_named_by_file_and_line(line: bytes, says: str, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "data", 2, [])
    manifest.write_bytes(manifest.read_bytes() + line + b"\n")
    for command in (["train", str(TINY), "--run-dir", str(tmp_path / "run")],
                    ["data", "write-shards", str(TINY), "--out", str(tmp_path / "shards")]):
        result = run_main(*command, *sets(micro(tmp_path, **_on(manifest, tmp_path))))
        assert result.code == 2, result.err
        assert says in result.err and "data.train" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_write_shards_counts_rows_set_aside_when_the_dataset_was_built(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "data", 5, [json.dumps({"image": "gone.png", "captions": ["x"]}),
                                                 json.dumps({"image": "000.png", "captions": ["  "]})])
    result = run_main("data", "write-shards", str(TINY), "--out", str(tmp_path / "shards"),
                      *sets(micro(tmp_path, **_on(manifest, tmp_path))))
    assert result.code == 0, result.err
    assert "wrote 5 samples" in result.out
    assert "2 unusable skipped (2 when the dataset was built, 0 when read)" in result.out
    assert "gone.png: file not found" in result.out and "000.png: no non-empty caption" in result.out


def test_bad_captions_in_a_shard_are_unusable_samples_named_by_shard_and_key(tmp_path: Path, registry: Registry) -> None:
    import webdataset as wds

    picture = _manifest(tmp_path / "data", 1, []).parent / "000.png"
    tar = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(tar)) as sink:
        sink.write({"__key__": "a", "png": picture.read_bytes(), "json": b'{"captions": 5}'})
        sink.write({"__key__": "b", "png": picture.read_bytes(), "json": b'{"captions": ["caf\xe9"]}'})
        sink.write({"__key__": "c", "png": picture.read_bytes(), "json": b'["not", "a", "record"]'})
        sink.write({"__key__": "d", "png": picture.read_bytes(), "json": b'{"captions": ["a square"]}'})
    entry = registry.catalog.get(Kind.DATASET, "shards")
    shards = entry.spec.factory(registry.validate(entry.spec.config, {"type": "shards", "urls": str(tar),
                                                                      "caption_ext": "json"}), split="train")
    for i, says in ((0, "caption JSON must be"), (1, r"not UTF-8 text \(byte 0xe9"), (2, "caption JSON must be")):
        with pytest.raises(SampleError, match=says) as err:
            shards[i]
        assert str(err.value).startswith(f"{tar}:")
    assert shards[3].captions == ["a square"] and list(shards.captions()) == ["a square"]
