"""The timm backbone wrapper: any timm model, weights only from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from registry import BuildError, ConfigError, Registry
from vlframe import build_model, load_config

from conftest import CONFIGS

TIMM_VIT = "model.image_encoder={type: timm, model_name: test_vit, image_size: 128}"


def test_timm_vit_as_coca_image_encoder(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml", [TIMM_VIT], registry=registry)
    assert model.image_encoder.width == 64 and model.image_encoder.num_prefix_tokens == 1
    out = model(torch.randn(2, 3, 128, 128), torch.randint(1, 8192, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())


def test_convolutional_feature_maps_become_tokens(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml",
                        ["model.image_encoder={type: timm, model_name: test_resnet}"], registry=registry)
    tokens = model.image_encoder(torch.randn(2, 3, 128, 128))
    assert tokens.shape == (2, 16, model.image_encoder.width)
    model(torch.randn(2, 3, 128, 128), torch.randint(1, 8192, (2, 8))).loss.backward()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_a_local_file(tmp_path: Path, suffix: str, registry: Registry) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_vit", pretrained=False, img_size=128)  # with a classifier head
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = build_model(CONFIGS / "coca_tiny.yaml", [TIMM_VIT, f"model.image_encoder.pretrained_path={path}"],
                        registry=registry)
    loaded = model.image_encoder.model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, source.state_dict()[key])


def test_weights_that_do_not_fit_are_refused(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(BuildError) as err:
        build_model(CONFIGS / "coca_tiny.yaml", [TIMM_VIT, f"model.image_encoder.pretrained_path={path}"],
                    registry=registry)
    message = str(err.value)
    assert message.startswith("model.image_encoder (image encoder 'timm' [encoders.timm]): weights in")
    assert "missing keys: blocks.0.attn.proj.bias" in message and "shape mismatch: blocks.0.attn.qkv.weight" in message


def test_unknown_model_and_missing_file_are_config_errors(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "coca_tiny.yaml", [
            "model.image_encoder={type: timm, model_name: test_vitt}",
            f"model.image_encoder.pretrained_path={tmp_path / 'none.pt'}",
        ], registry=registry)
    lines = [f"{p.path}: {p.message}" for p in err.value.problems]
    assert lines == [
        "model.image_encoder.model_name: unknown timm model 'test_vitt' (did you mean 'test_vit'?)",
        f"model.image_encoder.pretrained_path: file not found: {tmp_path / 'none.pt'}",
    ]


def test_channels_last_feature_maps_become_tokens(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml",
                        ["model.image_encoder={type: timm, model_name: test_mambaout}"], registry=registry)
    encoder = model.image_encoder
    assert encoder.channels_last
    images = torch.randn(2, 3, 128, 128)
    feature_map = encoder.model.forward_features(images)  # (B, H, W, C)
    tokens = encoder(images)
    assert tokens.shape == (2, feature_map.shape[1] * feature_map.shape[2], encoder.width)
    torch.testing.assert_close(tokens[:, 1], feature_map[:, 0, 1])  # row-major: token 1 is (0, 1)
    out = model(images, torch.randint(1, 8192, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in encoder.parameters())


def test_arguments_a_model_does_not_take_are_build_errors(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(BuildError) as err:
        build_model(CONFIGS / "coca_tiny.yaml",
                    ["model.image_encoder={type: timm, model_name: test_resnet, image_size: 64}"], registry=registry)
    assert str(err.value).startswith(
        "model.image_encoder (image encoder 'timm' [encoders.timm]): timm model 'test_resnet' refused img_size: "
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(BuildError, match="junk.safetensors: not a readable weights file"):
        build_model(CONFIGS / "coca_tiny.yaml", [TIMM_VIT, f"model.image_encoder.pretrained_path={junk}"],
                    registry=registry)
    with pytest.raises(ConfigError) as cfg_err:
        load_config(CONFIGS / "coca_tiny.yaml", [TIMM_VIT, "model.image_encoder.model_kwargs={pretrained: true}"],
                    registry=registry)
    assert cfg_err.value.problems[0].path == "model.image_encoder.model_kwargs"
    assert "pretrained cannot be set here" in cfg_err.value.problems[0].message
