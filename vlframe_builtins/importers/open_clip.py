"""open_clip's CoCa checkpoints, imported into vlframe's components.

open_clip (github.com/mlfoundations/open_clip) publishes the only public CoCa weights:
``coca_ViT-B-32`` and ``coca_ViT-L-14``. Its CoCa differs from the paper in ways vlframe
expresses as config choices, so the converted model is vlframe's ordinary ``coca``:

- one attentional pooler of 256 queries (with a LayerNorm on the queries) whose outputs get
  ``ln_post``; output 0, projected, is the image embedding, outputs 1..255 are the decoder's
  context (``summary_queries: 1`` + a cascaded ``cls`` contrastive pooler, ``final_norm: false``
  on the ViT, whose patch embedding has no bias);
- the text CLS is appended after the text at position ``context_length`` (folded into the CLS
  vector here: open_clip always pads to the context) under a padding mask shifted one key right
  (``padding_mask: open_clip_legacy``);
- each multimodal layer is self-attention, MLP, cross-attention (``ln_1_kv`` on the image
  tokens), MLP (``cross_mlp: true``), without a padding mask (``pad_mask: false``);
- an untied LM head without bias, the learned logit scale, and GELU or QuickGELU as configured.

``config(architecture)`` takes one of :data:`ARCHITECTURES` or the path of an open_clip model
config JSON; ``convert`` maps every weight and refuses a checkpoint with missing or unexpected
keys. Nothing is downloaded: the user passes a local checkpoint file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from registry import ComponentConfig, ComponentSpec, hookimpl
from vlframe.sdk import read_weights_file

# open_clip's model configs for its CoCa weights (model_configs/coca_*.json in open-clip-torch 3.3).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "coca_ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "attentional_pool": True,
                       "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                           "attn_pooler_heads": 8},
        "custom_text": True,
    },
    "coca_ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14, "attentional_pool": True,
                       "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12,
                           "attn_pooler_heads": 12},
        "custom_text": True,
    },
}

# Settings of open_clip configs whose only supported value is its default (anything else would
# need a component vlframe does not have). Each: (section, key, default).
_DEFAULT_ONLY = [
    ("vision_cfg", "ls_init_value", None), ("vision_cfg", "patch_dropout", 0.0), ("vision_cfg", "no_ln_pre", False),
    ("vision_cfg", "pos_embed_type", "learnable"), ("vision_cfg", "timm_model_name", None),
    ("vision_cfg", "attn_pooler_queries", 256), ("vision_cfg", "pool_type", "tok"),
    ("text_cfg", "ls_init_value", None), ("text_cfg", "hf_model_name", None), ("text_cfg", "embed_cls", True),
    ("text_cfg", "no_causal_mask", False), ("text_cfg", "proj_bias", False), ("text_cfg", "pad_id", 0),
    ("text_cfg", "mlp_ratio", 4.0), ("multimodal_cfg", "ls_init_value", None),
    ("multimodal_cfg", "mlp_ratio", 4.0), ("vision_cfg", "mlp_ratio", 4.0),
    ("vision_cfg", "norm_kwargs", None), ("text_cfg", "norm_kwargs", None), ("vision_cfg", "act_kwargs", None),
    ("text_cfg", "act_kwargs", None), ("multimodal_cfg", "norm_kwargs", None), ("multimodal_cfg", "act_kwargs", None),
]


class OpenClipImporterConfig(ComponentConfig):
    """No settings: the architecture and the file are named when converting."""


def _architecture(architecture: str | Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, open_clip model config) of a known name, a JSON file, or a config mapping."""
    if isinstance(architecture, Mapping):
        return "custom", dict(architecture)
    if str(architecture) in ARCHITECTURES:
        return str(architecture), ARCHITECTURES[str(architecture)]
    path = Path(architecture)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable open_clip model config ({exc})") from None
        # A hub repository's open_clip_config.json wraps the model config with its preprocessing.
        return path.stem, data.get("model_cfg", data) if isinstance(data, dict) else data
    raise ValueError(f"unknown open_clip CoCa architecture '{architecture}'; known: {', '.join(ARCHITECTURES)} "
                     "(or the path of an open_clip model config .json)")


def _dims(oc: dict[str, Any]) -> dict[str, Any]:
    """The numbers a conversion needs, checked: open_clip's defaults filled in."""
    problems = []
    vision, text, multi = oc.get("vision_cfg", {}), oc.get("text_cfg", {}), oc.get("multimodal_cfg", {})
    sections = {"vision_cfg": vision, "text_cfg": text, "multimodal_cfg": multi}
    if not multi:
        problems.append("multimodal_cfg: missing (not a CoCa config)")
    if vision.get("attentional_pool") is not True:
        problems.append(f"vision_cfg.attentional_pool: {vision.get('attentional_pool')!r} (only true, open_clip's "
                        "released CoCa pooler, is supported)")
    for section, key, default in _DEFAULT_ONLY:
        value = sections[section].get(key, default)
        if value in ({}, None) and default is None:
            continue
        if value != default:
            problems.append(f"{section}.{key}: {value!r} is not supported (only {default!r})")
    for section, key in [("vision_cfg", "layers"), ("vision_cfg", "width"), ("vision_cfg", "image_size"),
                         ("vision_cfg", "patch_size"), ("text_cfg", "layers"), ("text_cfg", "width"),
                         ("multimodal_cfg", "layers"), ("multimodal_cfg", "width")]:
        if key in sections[section] and not isinstance(sections[section][key], int):
            problems.append(f"{section}.{key}: {sections[section][key]!r} is not supported (one integer)")
    if problems:
        raise ValueError("open_clip config: " + "; ".join(problems))
    d = {
        "embed_dim": oc.get("embed_dim"),
        "quick_gelu": bool(oc.get("quick_gelu", False)),
        "image_size": vision.get("image_size", 224),
        "patch_size": vision.get("patch_size", 16),
        "vision_width": vision.get("width", 768),
        "vision_layers": vision.get("layers", 12),
        "vision_heads": vision.get("width", 768) // vision.get("head_width", 64),
        "pooler_heads": vision.get("attn_pooler_heads", 8),
        "context_length": text.get("context_length", 77),
        "vocab_size": text.get("vocab_size", 49408),
        "text_width": text.get("width", 512),
        "text_heads": text.get("heads", 8),
        "text_layers": text.get("layers", 12),
        "multi_width": multi.get("width", 512),
        "multi_heads": multi.get("heads", 8),
        "multi_layers": multi.get("layers", 12),
    }
    if not isinstance(d["embed_dim"], int):
        problems.append("embed_dim: missing")
    elif not d["embed_dim"] == d["multi_width"] == d["text_width"]:
        problems.append(f"embed_dim ({d['embed_dim']}), text_cfg.width ({d['text_width']}) and multimodal_cfg.width "
                        f"({d['multi_width']}) differ: open_clip's CoCa feeds one into the other unprojected")
    if problems:
        raise ValueError("open_clip config: " + "; ".join(problems))
    return d


def vlframe_config(oc: dict[str, Any], *, description: str = "") -> dict[str, Any]:
    """The vlframe config (as YAML data) whose model is open_clip's CoCa ``oc``, and its tokenizer."""
    d = _dims(oc)
    act = "quick_gelu" if d["quick_gelu"] else "gelu"
    return {
        "description": description,
        "model": {
            "type": "coca",
            "embed_dim": d["embed_dim"],
            "vocab_size": d["vocab_size"],
            "context_length": d["context_length"],
            "pad_id": 0,
            "image_encoder": {"type": "vit", "image_size": d["image_size"], "patch_size": d["patch_size"],
                              "width": d["vision_width"], "layers": d["vision_layers"], "heads": d["vision_heads"],
                              "activation": act, "class_token": True, "patch_bias": False, "final_norm": False},
            "text_decoder": {"type": "causal_text", "width": d["text_width"], "layers": d["text_layers"],
                             "heads": d["text_heads"], "activation": act, "embedding": "cls",
                             "padding_mask": "open_clip_legacy"},
            "caption_pooler": {"type": "attentional", "n_query": 256, "heads": d["pooler_heads"], "query_norm": True,
                               "summary_queries": 1},
            "contrastive_pooler": {"type": "cls"},
            "pooler_arrangement": "cascade",
            "multimodal_decoder": {"type": "multimodal", "width": d["multi_width"], "layers": d["multi_layers"],
                                   "heads": d["multi_heads"], "activation": act, "cross_mlp": True,
                                   "pad_mask": False},
            "image_projection": {"type": "linear"},
            "text_projection": {"type": "linear"},
            "lm_head": {"type": "lm_head", "tied": False},
            # open_clip's training recipe: CLIP loss x1 + captioning loss x2, temperature >= 0.01
            "objectives": {
                "contrastive": {"type": "contrastive", "weight": 1.0, "init_temperature": 0.07,
                                "min_temperature": 0.01},
                "caption": {"type": "captioning", "weight": 2.0},
            },
        },
        "tokenizer": {"type": "clip_bpe", "pad_to_context": True},
        "data": {"interpolation": "bicubic"},
    }


class _Source:
    """The source weights, recording which keys were read and which were asked for but absent."""

    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        self.weights, self.read, self.missing = weights, set(), []

    def __call__(self, key: str) -> Tensor | None:
        self.read.add(key)
        if key not in self.weights:
            self.missing.append(key)
            return None
        return self.weights[key]


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_weights(weights: Mapping[str, Tensor], oc: dict[str, Any]) -> dict[str, Tensor]:
    """open_clip CoCa state dict -> vlframe ``coca`` state dict (refusing missing/unexpected keys)."""
    d = _dims(oc)
    src = _Source(weights)
    out: dict[str, Tensor] = {}

    def put(name: str, key: str, fn: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        t = src(key)
        if t is not None:
            out[name] = fn(t).contiguous()

    def linear(name: str, key: str) -> None:
        put(f"{name}.weight", f"{key}.weight")
        put(f"{name}.bias", f"{key}.bias")

    def block(name: str, key: str, *, cross: bool = False) -> None:
        # open_clip's ResidualAttentionBlock: ln_1, attn (packed in_proj), ln_2, mlp.c_fc/c_proj
        attn, norm1, norm2, mlp = ("cross", "norm_cross", "norm_cross_mlp", "cross_mlp") if cross else \
                                  ("attn", "norm1", "norm2", "mlp")
        linear(f"{name}.{norm1}", f"{key}.ln_1")
        linear(f"{name}.{norm2}", f"{key}.ln_2")
        linear(f"{name}.{attn}.out_proj", f"{key}.attn.out_proj")
        linear(f"{name}.{mlp}.fc1", f"{key}.mlp.c_fc")
        linear(f"{name}.{mlp}.fc2", f"{key}.mlp.c_proj")
        if cross:  # queries from the text, keys/values from the image tokens (after ln_1_kv)
            linear(f"{name}.norm_context", f"{key}.ln_1_kv")
            put(f"{name}.cross.q_proj.weight", f"{key}.attn.in_proj_weight", lambda t: t.chunk(3)[0])
            put(f"{name}.cross.kv_proj.weight", f"{key}.attn.in_proj_weight", lambda t: torch.cat(t.chunk(3)[1:]))
            put(f"{name}.cross.q_proj.bias", f"{key}.attn.in_proj_bias", lambda t: t.chunk(3)[0])
            put(f"{name}.cross.kv_proj.bias", f"{key}.attn.in_proj_bias", lambda t: torch.cat(t.chunk(3)[1:]))
        else:
            put(f"{name}.attn.qkv_proj.weight", f"{key}.attn.in_proj_weight")
            put(f"{name}.attn.qkv_proj.bias", f"{key}.attn.in_proj_bias")

    # image tower
    enc = "image_encoder"
    put(f"{enc}.patch_embed.weight", "visual.conv1.weight")
    put(f"{enc}.class_token", "visual.class_embedding", lambda t: t.reshape(1, 1, -1))
    put(f"{enc}.pos_embed", "visual.positional_embedding", lambda t: t.unsqueeze(0))
    linear(f"{enc}.norm_pre", "visual.ln_pre")
    for i in range(d["vision_layers"]):
        block(f"{enc}.blocks.{i}", f"visual.transformer.resblocks.{i}")

    # the 256-query pooler; ln_post normalises all its outputs, proj maps output 0 to the embedding
    pool, attn = "caption_pooler", "visual.attn_pool.attn"
    put(f"{pool}.queries", "visual.attn_pool.query")
    linear(f"{pool}.norm_queries", "visual.attn_pool.ln_q")
    linear(f"{pool}.norm_tokens", "visual.attn_pool.ln_k")
    linear(f"{pool}.norm", "visual.ln_post")
    linear(f"{pool}.attn.out_proj", f"{attn}.out_proj")
    if d["vision_width"] == d["embed_dim"]:  # nn.MultiheadAttention packs q/k/v when all widths agree
        put(f"{pool}.attn.q_proj.weight", f"{attn}.in_proj_weight", lambda t: t.chunk(3)[0])
        put(f"{pool}.attn.kv_proj.weight", f"{attn}.in_proj_weight", lambda t: torch.cat(t.chunk(3)[1:]))
    else:
        put(f"{pool}.attn.q_proj.weight", f"{attn}.q_proj_weight")
        k, v = src(f"{attn}.k_proj_weight"), src(f"{attn}.v_proj_weight")
        if k is not None and v is not None:
            out[f"{pool}.attn.kv_proj.weight"] = torch.cat([k, v])
    put(f"{pool}.attn.q_proj.bias", f"{attn}.in_proj_bias", lambda t: t.chunk(3)[0])
    put(f"{pool}.attn.kv_proj.bias", f"{attn}.in_proj_bias", lambda t: torch.cat(t.chunk(3)[1:]))
    put("image_projection.weight", "visual.proj", lambda t: t.T)

    # unimodal text tower; open_clip's CLS sits at position context_length, always (texts are padded
    # to the context), so its position embedding is folded into the CLS vector
    dec, n = "text_decoder", d["context_length"]
    put(f"{dec}.token_embedding.weight", "text.token_embedding.weight")
    pos, cls = src("text.positional_embedding"), src("text.cls_emb")
    if pos is not None:
        if pos.shape[0] != n + 1:
            raise ValueError(f"text.positional_embedding has {pos.shape[0]} positions; the architecture's context "
                             f"{n} + CLS needs {n + 1}: is this checkpoint of this architecture?")
        out[f"{dec}.pos_embed"] = pos[:n].contiguous()
        if cls is not None:
            out[f"{dec}.cls_token"] = cls + pos[n]
    for i in range(d["text_layers"]):
        block(f"{dec}.blocks.{i}", f"text.transformer.resblocks.{i}")
    linear(f"{dec}.norm", "text.ln_final")
    put("text_projection.weight", "text.text_projection", lambda t: t.T)

    # multimodal decoder: per layer a self-attention block and a cross-attention block, each with its MLP
    mm = "multimodal_decoder"
    for i in range(d["multi_layers"]):
        block(f"{mm}.blocks.{i}", f"text_decoder.resblocks.{i}")
        block(f"{mm}.blocks.{i}", f"text_decoder.cross_attn.{i}", cross=True)
    linear(f"{mm}.norm", "text_decoder.ln_final")
    put("lm_head.proj.weight", "text_decoder.text_projection", lambda t: t.T)
    put("objectives.contrastive.log_inv_temperature", "logit_scale", lambda t: t.reshape(()))

    unexpected = sorted(set(weights) - src.read)
    if src.missing or unexpected:
        parts = []
        if src.missing:
            parts.append(f"missing keys {_listing(sorted(set(src.missing)))}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        raise ValueError("not an open_clip CoCa checkpoint of this architecture: " + "; ".join(parts))
    return out


def read_weights(path: Path) -> dict[str, Tensor]:
    """An open_clip checkpoint file: a state dict (.bin/.pt/.pth) or .safetensors, or a training
    checkpoint ``{"state_dict": ...}`` whose keys may carry DDP's ``module.`` prefix."""
    path = Path(path)
    weights: Any = read_weights_file(path)  # nothing in it runs: a pickle holding code is refused
    if isinstance(weights, Mapping) and isinstance(weights.get("state_dict"), Mapping):
        weights = weights["state_dict"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    return dict(weights)


class OpenClipImporter:
    architectures = tuple(ARCHITECTURES)

    def __init__(self, cfg: OpenClipImporterConfig) -> None:
        self.cfg = cfg

    def config(self, architecture: str | Path | Mapping[str, Any]) -> dict[str, Any]:
        name, oc = _architecture(architecture)
        return vlframe_config(oc, description=f"open_clip {name} (converted by vlframe convert open-clip)")

    def read(self, path: Path) -> dict[str, Tensor]:
        return read_weights(path)

    def convert(self, weights: Mapping[str, Tensor], architecture: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
        return convert_weights(weights, _architecture(architecture)[1])


@hookimpl
def vlframe_importers() -> list[ComponentSpec]:
    return [
        ComponentSpec("open-clip", OpenClipImporterConfig, OpenClipImporter,
                      "open_clip's CoCa checkpoints (coca_ViT-B-32, coca_ViT-L-14, or an open_clip config .json)."),
    ]
