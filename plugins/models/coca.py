"""CoCa: Contrastive Captioners (Yu et al., 2022, arXiv 2205.01917), assembled from components.

    images -> image_encoder -> tokens
        tokens -> caption_pooler -> image context (n_query tokens) -> multimodal_decoder
        tokens (parallel) or image context (cascade) -> contrastive_pooler -> image_projection
    text -> text_decoder (unimodal, causal) -> token states -> multimodal_decoder -> lm_head
                                           -> CLS / mean embedding -> text_projection

Every part is a registered component chosen by the config, and every part is optional where the
paper ablates it: without ``multimodal_decoder`` this is a contrastive dual encoder (CLIP-like),
without ``contrastive_pooler`` a captioner. The losses are the configured objectives, each with
its weight: ``L = sum(weight_i * L_i)``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from registry import Catalog, ComponentConfig, ComponentSpec, Kind, component, hookimpl, raise_problems
from vlframe.nn import KVCache, ModelOutput, set_attention_backend
from vlframe.nn.attention import check_backend

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# How a missing model output can be produced, for error messages.
_PRODUCERS = {
    "image_embeds": "contrastive_pooler and image_projection",
    "text_embeds": "text_projection",
    "logits": "caption_pooler, multimodal_decoder and lm_head",
    "caption_states": "caption_pooler, multimodal_decoder and lm_head",
    "lm_head": "caption_pooler, multimodal_decoder and lm_head",
}


class CoCaConfig(ComponentConfig):
    embed_dim: int = Field(512, gt=0, description="Size of the shared contrastive embedding.")
    vocab_size: int = Field(64000, gt=0)
    context_length: int = Field(64, gt=1, description="Longest text, in tokens, BOS and EOS included.")
    pad_id: int = Field(0, ge=0, description="Padding token id, for inputs given without a mask.")
    attention_backend: str = Field(
        "auto", description="Attention implementation for every block: auto, sdpa, eager or math."
    )
    image_encoder: component(Kind.IMAGE_ENCODER)
    text_decoder: component(Kind.TEXT_DECODER)
    caption_pooler: component(Kind.POOLER) | None = None
    contrastive_pooler: component(Kind.POOLER) | None = None
    pooler_arrangement: Literal["cascade", "parallel"] = Field(
        "cascade",
        description="cascade: the contrastive pooler reads the caption pooler's output; "
        "parallel: both read the image tokens.",
    )
    multimodal_decoder: component(Kind.MULTIMODAL_DECODER) | None = None
    image_projection: component(Kind.HEAD) | None = None
    text_projection: component(Kind.HEAD) | None = None
    lm_head: component(Kind.HEAD) | None = None
    objectives: dict[str, component(Kind.OBJECTIVE)] = Field(
        description="Losses by name; the total is their weighted sum."
    )

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return check_backend(name)

    def produces(self) -> set[str]:
        """The outputs this configuration computes, by the names objectives require."""
        out = {"text", "text_mask"}
        if self.contrastive_pooler is not None and self.image_projection is not None:
            out.add("image_embeds")
        if self.text_projection is not None:
            out.add("text_embeds")
        if self.multimodal_decoder is not None and self.lm_head is not None and self.caption_pooler is not None:
            out.update({"logits", "caption_states", "lm_head"})
        return out

    @model_validator(mode="after")
    def _check_wiring(self) -> CoCaConfig:
        problems: list[tuple[tuple[str, ...], str]] = []
        if not self.objectives:
            problems.append((("objectives",), "at least one objective is needed"))
        produced = self.produces()
        for name, objective in self.objectives.items():
            if not _IDENT.match(name):
                problems.append((("objectives", name), "objective names must be identifiers (letters, digits, _)"))
            for need in sorted(type(objective).requires - produced):
                hint = f" (set {_PRODUCERS[need]})" if need in _PRODUCERS else ""
                problems.append((("objectives", name), f"needs {need}, which this model does not produce{hint}"))
        contrastive = self.contrastive_pooler is not None
        for part in ("image_projection", "text_projection"):
            if contrastive != (getattr(self, part) is not None):
                problems.append(((part,), "contrastive_pooler, image_projection and text_projection go together"))
        captioning = self.multimodal_decoder is not None
        if captioning and self.caption_pooler is None:
            problems.append((("caption_pooler",), "the multimodal_decoder needs a caption_pooler "
                             "(type: none passes all image tokens)"))
        if captioning != (self.lm_head is not None):
            problems.append((("lm_head",), "multimodal_decoder and lm_head go together"))
        cascade = self.pooler_arrangement == "cascade"
        if contrastive and cascade and self.caption_pooler is None:
            problems.append((("pooler_arrangement",), "cascade needs a caption_pooler to cascade from; "
                             "use parallel for a contrastive pooler on the image tokens"))
        if self.caption_pooler is not None and not captioning and not (contrastive and cascade):
            problems.append((("caption_pooler",), "nothing reads the caption_pooler (no multimodal_decoder)"))
        raise_problems("CoCaConfig", problems)
        return self


class CoCa(nn.Module):
    def __init__(self, cfg: CoCaConfig, *, catalog: Catalog) -> None:
        super().__init__()
        self.config = cfg
        self.pad_id = cfg.pad_id
        self.cascade = cfg.pooler_arrangement == "cascade"

        def build(kind: Kind, field: str, **kwargs) -> nn.Module | None:
            sub = getattr(cfg, field)
            return None if sub is None else catalog.build(kind, sub, path=f"model.{field}", **kwargs)

        self.image_encoder = build(Kind.IMAGE_ENCODER, "image_encoder")
        image_dim, prefix = self.image_encoder.width, self.image_encoder.num_prefix_tokens
        self.text_decoder = build(
            Kind.TEXT_DECODER, "text_decoder",
            vocab_size=cfg.vocab_size, context_length=cfg.context_length,
            with_embedding=cfg.text_projection is not None,
        )
        text_dim = self.text_decoder.width
        decoder_dim = cfg.multimodal_decoder.width if cfg.multimodal_decoder is not None else text_dim
        self.caption_pooler = build(Kind.POOLER, "caption_pooler", in_dim=image_dim, out_dim=decoder_dim,
                                    num_prefix_tokens=prefix)
        if self.caption_pooler is not None and self.cascade:
            con_in = self.caption_pooler.out_dim
            con_prefix = getattr(self.caption_pooler, "num_prefix_tokens_out", 0)
        else:
            con_in, con_prefix = image_dim, prefix
        self.contrastive_pooler = build(Kind.POOLER, "contrastive_pooler", in_dim=con_in, out_dim=con_in,
                                        num_prefix_tokens=con_prefix)
        self._summary = getattr(self.caption_pooler, "summary_tokens", 0)
        self.multimodal_decoder = None
        if cfg.multimodal_decoder is not None:
            self.multimodal_decoder = build(Kind.MULTIMODAL_DECODER, "multimodal_decoder",
                                            in_dim=text_dim, context_dim=self.caption_pooler.out_dim)
        self.image_projection = None
        if self.contrastive_pooler is not None:
            self.image_projection = build(Kind.HEAD, "image_projection", in_dim=self.contrastive_pooler.out_dim,
                                          out_dim=cfg.embed_dim, tie_to=None)
        self.text_projection = build(Kind.HEAD, "text_projection", in_dim=text_dim, out_dim=cfg.embed_dim, tie_to=None)
        self.lm_head = build(Kind.HEAD, "lm_head", in_dim=decoder_dim, out_dim=cfg.vocab_size,
                             tie_to=self.text_decoder.token_embedding)
        self.objectives = nn.ModuleDict(
            {name: catalog.build(Kind.OBJECTIVE, obj, path=f"model.objectives.{name}")
             for name, obj in cfg.objectives.items()}
        )
        self.weights = {name: obj.weight for name, obj in cfg.objectives.items()}
        needs = set().union(*(type(o).requires for o in cfg.objectives.values()))
        self._needs_logits = "logits" in needs
        self._needs_states = bool({"logits", "caption_states"} & needs)
        self._needs_embeds = any({"image_embeds", "text_embeds"} & type(o).requires for o in cfg.objectives.values())
        set_attention_backend(self, cfg.attention_backend)

    # -- the two towers --------------------------------------------------------------------

    def _text_mask(self, text: Tensor, text_mask: Tensor | None) -> Tensor:
        return (text != self.pad_id) if text_mask is None else text_mask.to(torch.bool)

    def _image_side(self, images: Tensor, *, embeds: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Image context for the multimodal decoder, and the image embedding (unnormalised)."""
        tokens = self.image_encoder(images)
        pooled = self.caption_pooler(tokens) if self.caption_pooler is not None else None
        embed = None
        if embeds and self.contrastive_pooler is not None:
            source = pooled if (self.cascade and pooled is not None) else tokens
            embed = self.image_projection(self.contrastive_pooler(source).mean(dim=1))
        # A pooler's summary outputs (open_clip's first query) feed the embedding, not the decoder.
        context = pooled[:, self._summary :] if pooled is not None and self._summary else pooled
        return context, embed

    def _require(self, part: str, what: str) -> None:
        if getattr(self, part) is None:
            raise RuntimeError(f"{what}: this model has no {part} (see its config)")

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Contrastive image embeddings ``(B, embed_dim)``."""
        self._require("contrastive_pooler", "encode_image")
        _, embed = self._image_side(images)
        return F.normalize(embed, dim=-1) if normalize else embed

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """Contrastive text embeddings ``(B, embed_dim)`` of token ids ``(B, L)``."""
        self._require("text_projection", "encode_text")
        _, pooled = self.text_decoder(text, self._text_mask(text, text_mask))
        embed = self.text_projection(pooled)
        return F.normalize(embed, dim=-1) if normalize else embed

    def image_tokens(self, images: Tensor) -> Tensor:
        """The image encoder's output tokens ``(B, N, width)``: the frozen features of probes."""
        return self.image_encoder(images)

    # -- captioning and multimodal understanding ------------------------------------------

    def caption_context(self, images: Tensor) -> Tensor:
        """The pooled image tokens the multimodal decoder attends to; computed once per caption."""
        self._require("multimodal_decoder", "captioning")
        context, _ = self._image_side(images, embeds=False)
        return context

    def caption_logits(self, tokens: Tensor, context: Tensor, cache: KVCache | None = None) -> Tensor:
        """Next-token logits ``(B, L, vocabulary)`` after each of ``tokens`` ``(B, L)``.

        With a ``cache`` the tokens are the positions after those already decoded (the first call
        passes the prompt, each later one the newest token), and the cache advances past them.
        """
        self._require("multimodal_decoder", "captioning")
        states, _ = self.text_decoder(tokens, None, embed=False, cache=cache)
        logits = self.lm_head(self.multimodal_decoder(states, None, context, cache=cache))
        if cache is not None:
            cache.offset += tokens.shape[1]
        return logits

    def multimodal_states(self, images: Tensor, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The multimodal decoder's states ``(B, L, width)`` for (image, text) pairs, and the text mask:
        the input of multimodal-understanding heads (does this caption fit, VQA-style answers)."""
        self._require("multimodal_decoder", "multimodal_states")
        mask = self._text_mask(text, text_mask)
        states, _ = self.text_decoder(text, mask, embed=False)
        return self.multimodal_decoder(states, mask, self.caption_context(images)), mask

    # -- training forward ------------------------------------------------------------------

    def forward(self, images: Tensor, text: Tensor, text_mask: Tensor | None = None, *,
                return_logits: bool = False) -> ModelOutput:
        """Run both towers, evaluate every objective, and return the losses and the outputs.

        ``return_logits`` also computes the full next-token logits (the captioning loss itself
        scores the vocabulary in chunks and does not need them).
        """
        mask = self._text_mask(text, text_mask)
        context, image_embed = self._image_side(images, embeds=self._needs_embeds)
        states, pooled = self.text_decoder(text, mask)
        outputs: dict[str, Any] = {"text": text, "text_mask": mask}
        if image_embed is not None:
            outputs["image_embeds"] = F.normalize(image_embed, dim=-1)
        if pooled is not None and self.text_projection is not None:
            outputs["text_embeds"] = F.normalize(self.text_projection(pooled), dim=-1)
        if (self._needs_states or return_logits) and self.multimodal_decoder is not None:
            outputs["caption_states"] = self.multimodal_decoder(states, mask, context)
            outputs["lm_head"] = self.lm_head
            if self._needs_logits or return_logits:
                outputs["logits"] = self.lm_head(outputs["caption_states"])
        losses = {name: objective(outputs) for name, objective in self.objectives.items()}
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        return ModelOutput(
            loss=total,
            losses=losses,
            image_embeds=outputs.get("image_embeds"),
            text_embeds=outputs.get("text_embeds"),
            logits=outputs.get("logits"),
        )


@hookimpl
def vlframe_models() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="coca",
            config=CoCaConfig,
            factory=CoCa,
            summary="Contrastive Captioner: image encoder, unimodal + multimodal text decoders, poolers.",
        )
    ]
