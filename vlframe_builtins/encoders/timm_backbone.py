"""Any timm model as an image encoder: its feature map (or token sequence) becomes the tokens.

Weights come only from a local file (``pretrained_path``: safetensors or a torch checkpoint);
timm is always asked for a randomly initialised model, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from torch import Tensor, nn

from registry import ComponentConfig, ComponentSpec, ExistingFile, hookimpl
from registry.errors import did_you_mean


class TimmConfig(ComponentConfig):
    model_name: str = Field(description="Any name from timm.list_models(), e.g. vit_base_patch16_224.")
    pretrained_path: ExistingFile | None = Field(
        None, description="Local weights (.safetensors, .pth, .bin); never fetched from a hub."
    )
    image_size: int | None = Field(None, gt=0, le=8192, description="Passed as img_size to models that take one.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model arguments.")

    @field_validator("model_kwargs")
    @classmethod
    def _not_reserved(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(kwargs) & {"pretrained", "num_classes", "global_pool", "img_size", "model_name"})
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} cannot be set here: vlframe sets them "
                "(weights come from pretrained_path, the image size from image_size)"
            )
        return kwargs

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}")
        return name


class TimmBackbone(nn.Module):
    def __init__(self, cfg: TimmConfig) -> None:
        super().__init__()
        import timm

        kwargs = dict(cfg.model_kwargs)
        if cfg.image_size is not None:
            kwargs["img_size"] = cfg.image_size
        try:
            # pretrained=False always: weights come from pretrained_path or not at all.
            self.model = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        except TypeError as exc:  # an argument this architecture does not take
            taken = ", ".join(sorted(kwargs)) or "no extra arguments"
            raise ValueError(f"timm model '{cfg.model_name}' refused {taken}: {exc}") from exc
        # forward_features never runs the classifier head, but some heads keep parameters even
        # with num_classes=0 (norms, pre-logits MLPs): drop them so no parameter sits unused.
        for name in ("head", "fc_norm"):
            if any(True for _ in getattr(self.model, name, nn.Identity()).parameters()):
                setattr(self.model, name, nn.Identity())
        self.model_name = cfg.model_name
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.image_size = cfg.image_size or int(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        # Feature maps come channels-first (B, C, H, W) unless the model says NHWC (e.g. Swin).
        self.channels_last = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
        self.pretrained_path = cfg.pretrained_path
        if cfg.pretrained_path is not None:
            self._load(cfg.pretrained_path)

    def reset_parameters(self) -> None:
        """Re-initialise as timm does (a model built on the meta device, e.g. for FSDP), then the
        pretrained weights when there are any and the parameters are whole tensors."""
        init = getattr(self.model, "init_weights", None)
        if callable(init):
            init()
        if self.pretrained_path is not None:
            if any(type(p).__name__ == "DTensor" for p in self.parameters()):
                raise ValueError("pretrained_path cannot be read into a sharded model: convert the weights into a "
                                 "vlframe checkpoint and start from it with train.init_from")
            self._load(self.pretrained_path)

    def _load(self, path: Path) -> None:
        from vlframe.sdk import read_weights_file

        state = read_weights_file(path)  # nothing in it runs: a pickle holding code is refused
        if isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
            state = state.get("state_dict", state.get("model", state))  # a training checkpoint
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        # A classifier head in the file is expected: the backbone was built without one.
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "fc_norm.", "classifier."))}
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            def some(keys: list[str]) -> str:
                return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

            found = [f"{label}: {some(keys)}" for label, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
            raise ValueError(f"weights in {path} do not fit timm model '{self.model_name}': {'; '.join(found)}")
        self.model.load_state_dict(state)

    @property
    def blocks(self) -> nn.Module | None:
        """The timm model's repeated blocks, where it keeps them as ``blocks`` (ViTs, ConvNeXts do)."""
        return getattr(self.model, "blocks", None)

    def no_weight_decay(self) -> set[str]:
        """What the timm model itself spares from weight decay (its position embedding, class token)."""
        own = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in own()} if callable(own) else set()

    def forward(self, images: Tensor) -> Tensor:
        x = self.model.forward_features(images)
        if x.ndim == 4:  # a feature map becomes H*W tokens
            x = x.flatten(1, 2) if self.channels_last else x.flatten(2).transpose(1, 2)
        return x


@hookimpl
def vlframe_image_encoders() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="timm",
            config=TimmConfig,
            factory=TimmBackbone,
            summary="Any timm backbone; weights from a local file only.",
            example={"type": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32},
        )
    ]
