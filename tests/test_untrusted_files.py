"""Nothing vlframe reads runs code: crafted pickles are refused by every reader, with exit 2.

Each crafted file would write a marker file if it were unpickled the unsafe way; every test
asserts the marker never appears, the refusal is one clear line, and the exit code is 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_main
from hardening import error_lines, evil_checkpoint, train_micro, write_evil_pickle
from training_configs import TINY, micro, sets
from vlframe.runs import checkpoint, tags


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained micro run's final checkpoint (step 3), in this version's format."""
    root = tmp_path_factory.mktemp("good")
    code, _, err = train_micro(root, root / "run", **{"train.steps": 3, "train.checkpoint_every": None})
    assert code == 0, err
    return root / "run" / "checkpoints" / "step_000003"


def _refused(result, marker: Path, what: str = "refused: it holds exec, which would run code") -> None:
    assert not marker.exists(), "the crafted pickle ran"
    assert result.code == 2, (result.out, result.err)
    lines = error_lines(result.err)
    assert any(what in line for line in lines), result.err
    assert "Traceback" not in result.err


def test_the_new_format_holds_no_pickle(good: Path) -> None:
    assert sorted(p.name for p in good.iterdir()) == ["config.yaml", "model.safetensors", "state.json",
                                                    "state.safetensors", "tokenizer.model"]
    state = checkpoint.read_state(good)
    assert state["step"] == 3 and state["optimizer"]["state"]  # Adam's moments came back as tensors
    assert isinstance(state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert isinstance(state["rng"]["numpy"][1], __import__("numpy").ndarray)


def _as_numpy1_pickled(path: Path) -> None:
    """Rewrite a torch file as numpy 1.x pickles arrays (``numpy.core.multiarray``, not numpy 2's
    ``numpy._core``): a state.pt written by an earlier vlframe under numpy 1."""
    import io
    import zipfile

    original = path.read_bytes()
    source = zipfile.ZipFile(io.BytesIO(original))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            out.writestr(item, data)


@pytest.mark.parametrize("reader", ["resume", "init_from", "eval", "caption", "embed"])
def test_a_code_running_state_is_refused_by_every_reader(reader: str, good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    evil = evil_checkpoint(good, run / "checkpoints" / "step_000003", marker)
    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    (tmp_path / "texts.txt").write_text("a red square\n")
    overrides = sets(micro(tmp_path, **{"train.steps": 5}))
    commands = {
        "resume": ["train", str(TINY), "--resume", str(run), *overrides],
        "init_from": ["train", str(TINY), *overrides, "--set", f"train.init_from={evil}"],
        "eval": ["eval", str(evil), "--task", "retrieval", "--data", "synthetic", "--limit", "8", "--no-track"],
        "caption": ["caption", str(evil), str(image)],
        "embed": ["embed", str(evil), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "e.safetensors")],
    }
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _refused(run_main(*commands[reader]), marker)
    # Nothing was written: no run folder, no output, the crafted checkpoint as it was.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_code_running_weights_file_is_refused_by_convert(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    weights = write_evil_pickle(tmp_path / "open_clip_model.pt", marker)
    result = run_main("convert", "open-clip", "--model", "coca_ViT-B-32", "--checkpoint", str(weights),
                      "--out", str(tmp_path / "out"))
    _refused(result, marker)
    assert f"{weights}: refused" in result.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("numpy_major", [1, 2])
def test_a_checkpoint_of_the_earlier_format_still_resumes(numpy_major: int, good: Path, tmp_path: Path) -> None:
    """state.pt written by torch.save (the earlier format), under numpy 1 or 2: read with
    weights_only and the numpy types its RNG state needs, and the run continues from it."""
    run = tmp_path / "run"
    legacy = run / "checkpoints" / "step_000003"
    shutil.copytree(good, legacy)
    torch.save(checkpoint.read_state(good), legacy / "state.pt")
    if numpy_major == 1:
        _as_numpy1_pickled(legacy / "state.pt")
    for name in ("state.json", "state.safetensors"):
        (legacy / name).unlink()
    assert checkpoint.read_state(legacy)["step"] == 3
    result = run_main("train", str(TINY), "--resume", str(run), *sets(micro(tmp_path, **{"train.steps": 5})))
    assert result.code == 0, result.err
    assert f"resumed from {legacy} at step 3" in result.err + result.out
    assert checkpoint.read_state(run / "checkpoints" / "step_000005")["step"] == 5


def test_eval_of_a_run_id_on_a_shared_server_never_runs_its_artifact(good: Path, tmp_path: Path, servers) -> None:
    """Anyone who can write to a tracking server can log any 'checkpoint' artifact and any tag:
    evaluating that run by its id downloads the artifact and refuses it, and a run-folder tag
    naming a folder that is not the run's own is ignored."""
    from mlflow import MlflowClient

    server = servers()
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(good, tmp_path / "upload" / "checkpoint", marker)
    mlflow = MlflowClient(tracking_uri=server.uri)
    experiment = mlflow.create_experiment("shared")
    run = mlflow.create_run(experiment)
    mlflow.log_artifacts(run.info.run_id, str(evil), "checkpoint")
    # The tag names a real, good run folder on this machine, but not this run's: it must not be used.
    mlflow.set_tag(run.info.run_id, tags.RUN_DIR, str(good.parent.parent))
    result = run_main("eval", run.info.run_id, "--tracking-uri", server.uri, "--task", "retrieval",
                      "--data", "synthetic", "--limit", "8", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    _refused(result, marker)
    downloaded = tmp_path / "cache" / "vlframe" / "runs" / run.info.run_id / "checkpoint"
    assert (downloaded / "state.pt").is_file()  # what was refused is the artifact, not the tagged folder
    assert f"{downloaded / 'state.pt'}: refused" in result.err


def test_a_truncated_or_foreign_state_is_a_clear_error(good: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(good, broken)
    (broken / "state.json").write_text('{"step": 3, "optimizer": {"__tensor__": "t99999"}}')
    with pytest.raises(checkpoint.CheckpointError, match="state.json: unreadable"):
        checkpoint.read_state(broken)
    (broken / "state.json").write_bytes(b"\x00\xffnot json")
    result = run_main("caption", str(broken), str(tmp_path / "x.png"))
    assert result.code == 2 and "state.json: unreadable" in result.err and "Traceback" not in result.err


def test_a_code_running_pretrained_file_is_refused_by_the_timm_encoder(tmp_path: Path, registry) -> None:
    from conftest import CONFIGS
    from registry import BuildError
    from vlframe.api import build_model

    marker = tmp_path / "MARKER"
    weights = write_evil_pickle(tmp_path / "vit.pth", marker)
    encoder = "model.image_encoder={type: timm, model_name: test_vit, image_size: 64, pretrained_path: %s}" % weights
    with pytest.raises(BuildError, match=r"vit.pth: refused: it holds exec, which would run code"):
        build_model(CONFIGS / "coca_tiny.yaml", [encoder], registry=registry)
    assert not marker.exists()
