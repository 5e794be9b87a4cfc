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

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry import Capability, Catalog, ComponentSpec, Kind, component, hookimpl
from vlframe.sdk import MAX_WIDTH, KVCache, ModelBase, ModelBuilderConfig, ModelOutput, bidirectional

# How a missing model output can be produced, for error messages.
_PRODUCERS = {
    "image_embeds": "contrastive_pooler and image_projection",
    "text_embeds": "text_projection",
    "logits": "caption_pooler, multimodal_decoder and lm_head",
    "caption_states": "caption_pooler, multimodal_decoder and lm_head",
    "lm_head": "caption_pooler, multimodal_decoder and lm_head",
}
_CAPTION_OUTPUTS = {"caption_states", "logits", "lm_head"}


class CoCaConfig(ModelBuilderConfig):
    embed_dim: int = Field(512, gt=0, le=MAX_WIDTH, description="Size of the shared contrastive embedding.")
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
    parallel_prediction: float = Field(
        0.0, ge=0.0, lt=1.0, description="CapPa's parallel prediction (arXiv 2306.07915): this fraction of each "
        "training batch is decoded all at once, every input token after BOS replaced by a learned mask token "
        "and the decoders' self-attention bidirectional; the rest autoregressively (CapPa: 0.75). Generation "
        "stays autoregressive.")

    producers: ClassVar[dict[str, str]] = _PRODUCERS

    @property
    def image_size(self) -> int | None:
        size = getattr(self.image_encoder, "image_size", None)
        return size if isinstance(size, int) else None

    @property
    def contrastive(self) -> bool:
        return self.contrastive_pooler is not None and self.image_projection is not None

    @property
    def captioning(self) -> bool:
        return self.multimodal_decoder is not None and self.lm_head is not None and self.caption_pooler is not None

    def produces(self) -> set[str]:
        out = {"text", "text_mask"}
        if self.contrastive:
            out.add("image_embeds")
        if self.text_projection is not None:
            out.add("text_embeds")
        if self.captioning:
            out |= _CAPTION_OUTPUTS
        return out

    def capabilities(self) -> frozenset[str]:
        found = {Capability.IMAGE_TOKENS}
        if self.contrastive and self.text_projection is not None:
            found.add(Capability.CONTRASTIVE)
        if self.captioning:
            found |= {Capability.CAPTIONING, Capability.MULTIMODAL_STATES}
        return frozenset(found)

    def trained_parts(self) -> dict[str, set[str]]:
        parts: dict[str, set[str]] = {
            "image_encoder": {"image_embeds", *_CAPTION_OUTPUTS},
            "text_decoder": {"text_embeds", *_CAPTION_OUTPUTS},
        }
        cascade = self.pooler_arrangement == "cascade"
        for name, outputs in (("contrastive_pooler", {"image_embeds"}), ("image_projection", {"image_embeds"}),
                              ("text_projection", {"text_embeds"}), ("multimodal_decoder", _CAPTION_OUTPUTS),
                              ("lm_head", _CAPTION_OUTPUTS),
                              ("caption_pooler", _CAPTION_OUTPUTS | ({"image_embeds"} if cascade else set()))):
            if getattr(self, name) is not None:
                parts[name] = set(outputs)
        return parts

    def wiring_problems(self) -> list[tuple[tuple[str, ...], str]]:
        problems: list[tuple[tuple[str, ...], str]] = []
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
        text = self.text_decoder
        if self.parallel_prediction and not captioning:
            problems.append((("parallel_prediction",), "parallel prediction is a way of captioning: it needs the "
                             "multimodal_decoder and lm_head"))
        if contrastive and getattr(text, "layers", None) == 0 and getattr(text, "embedding", None) == "cls":
            problems.append((("text_decoder", "layers"), "0 layers with a CLS text embedding: the CLS token never "
                             "sees the caption, so the text embedding cannot learn; use at least 1 layer, or "
                             "embedding: mean"))
        return problems


class CoCa(ModelBase):
    def __init__(self, cfg: CoCaConfig, *, catalog: Catalog) -> None:
        super().__init__(cfg, catalog=catalog)
        self.cascade = cfg.pooler_arrangement == "cascade"
        self.embed_dim = cfg.embed_dim
        self.image_encoder = self.build_part(Kind.IMAGE_ENCODER, "image_encoder")
        image_dim, prefix = self.image_encoder.width, self.image_encoder.num_prefix_tokens
        self.image_size, self.image_token_dim = self.image_encoder.image_size, image_dim
        self.parallel_fraction = cfg.parallel_prediction
        extra = {"with_mask_token": True} if cfg.parallel_prediction else {}  # only then: other decoders need not know it
        self.text_decoder = self.build_part(
            Kind.TEXT_DECODER, "text_decoder",
            vocab_size=cfg.vocab_size, context_length=cfg.context_length,
            with_embedding=cfg.text_projection is not None, **extra,
        )
        text_dim = self.text_decoder.width
        decoder_dim = cfg.multimodal_decoder.width if cfg.multimodal_decoder is not None else text_dim
        self.caption_pooler = self.build_part(Kind.POOLER, "caption_pooler", in_dim=image_dim, out_dim=decoder_dim,
                                              num_prefix_tokens=prefix)
        if self.caption_pooler is not None and self.cascade:
            con_in = self.caption_pooler.out_dim
            con_prefix = getattr(self.caption_pooler, "num_prefix_tokens_out", 0)
        else:
            con_in, con_prefix = image_dim, prefix
        self.contrastive_pooler = self.build_part(Kind.POOLER, "contrastive_pooler", in_dim=con_in, out_dim=con_in,
                                                  num_prefix_tokens=con_prefix)
        self._summary = getattr(self.caption_pooler, "summary_tokens", 0)
        self.multimodal_decoder = None
        if cfg.multimodal_decoder is not None:
            self.multimodal_decoder = self.build_part(Kind.MULTIMODAL_DECODER, "multimodal_decoder",
                                                      in_dim=text_dim, context_dim=self.caption_pooler.out_dim)
        self.image_projection = None
        if self.contrastive_pooler is not None:
            self.image_projection = self.build_part(Kind.HEAD, "image_projection",
                                                    in_dim=self.contrastive_pooler.out_dim, out_dim=cfg.embed_dim,
                                                    tie_to=None)
        self.text_projection = self.build_part(Kind.HEAD, "text_projection", in_dim=text_dim, out_dim=cfg.embed_dim,
                                               tie_to=None)
        self.lm_head = self.build_part(Kind.HEAD, "lm_head", in_dim=decoder_dim, out_dim=cfg.vocab_size,
                                       tie_to=self.text_decoder.token_embedding)
        needs = self.required_outputs()
        self._needs_logits = "logits" in needs
        self._needs_states = bool({"logits", "caption_states"} & needs)
        self._needs_embeds = bool({"image_embeds", "text_embeds"} & needs)
        self.finish()

    def summary_groups(self) -> dict[str, list[str]]:
        # The paper's Table 1 counts both text decoders, the token embedding and the LM head as "decoder".
        return {"decoder": ["text_decoder", "multimodal_decoder", "lm_head"]}

    # -- the two towers --------------------------------------------------------------------

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
        _, pooled = self.text_decoder(text, self.text_mask(text, text_mask))
        embed = self.text_projection(pooled)
        return F.normalize(embed, dim=-1) if normalize else embed

    def image_tokens(self, images: Tensor) -> Tensor:
        """The image encoder's output tokens ``(B, N, width)``: the frozen features of probes."""
        return self.image_encoder(images)

    def image_tower(self) -> nn.Module:
        return self.image_encoder

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
        mask = self.text_mask(text, text_mask)
        states, _ = self.text_decoder(text, mask, embed=False)
        return self.multimodal_decoder(states, mask, self.caption_context(images)), mask

    def _parallel_states(self, text: Tensor, mask: Tensor, context: Tensor) -> Tensor:
        """Caption states predicting every token at once: the inputs after BOS are the learned
        mask token, and self-attention sees every position (padding stays hidden). Position t
        still predicts token t + 1, so the captioning objective reads them as it reads the rest."""
        masked = torch.ones_like(text, dtype=torch.bool)
        masked[:, 0] = False
        with bidirectional():
            states, _ = self.text_decoder(text, mask, embed=False, masked=masked)
            return self.multimodal_decoder(states, mask, context)

    # -- training forward ------------------------------------------------------------------

    def forward(self, images: Tensor, text: Tensor, text_mask: Tensor | None = None, *,
                return_logits: bool = False) -> ModelOutput:
        """Run both towers, evaluate every objective, and return the losses and the outputs.

        ``return_logits`` also computes the full next-token logits (the captioning loss itself
        scores the vocabulary in chunks and does not need them).
        """
        mask = self.text_mask(text, text_mask)
        context, image_embed = self._image_side(images, embeds=self._needs_embeds)
        states, pooled = self.text_decoder(text, mask)
        outputs: dict[str, Any] = {"text": text, "text_mask": mask}
        if image_embed is not None:
            outputs["image_embeds"] = F.normalize(image_embed, dim=-1)
        if pooled is not None and self.text_projection is not None:
            outputs["text_embeds"] = F.normalize(self.text_projection(pooled), dim=-1)
        if (self._needs_states or return_logits) and self.multimodal_decoder is not None:
            parallel = round(self.parallel_fraction * text.shape[0]) if self.training else 0
            if parallel:
                outputs["caption_states"] = torch.cat([self._parallel_states(text[:parallel], mask[:parallel],
                                                                             context[:parallel]),
                                                       self.multimodal_decoder(states[parallel:], mask[parallel:],
                                                                               context[parallel:])])
            else:
                outputs["caption_states"] = self.multimodal_decoder(states, mask, context)
            outputs["lm_head"] = self.lm_head
            if self._needs_logits or return_logits:
                outputs["logits"] = self.lm_head(outputs["caption_states"])
        return self.objectives_output(outputs)


#: A small CoCa the conformance kit builds (vlframe plugins check coca).
EXAMPLE = {
    "type": "coca", "embed_dim": 32, "vocab_size": 64, "context_length": 12, "pooler_arrangement": "parallel",
    "image_encoder": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text_decoder": {"type": "causal_text", "width": 32, "layers": 1, "heads": 2},
    "multimodal_decoder": {"type": "multimodal", "width": 32, "layers": 1, "heads": 2},
    "caption_pooler": {"type": "attentional", "n_query": 4, "heads": 2},
    "contrastive_pooler": {"type": "attentional", "n_query": 1, "heads": 2},
    "image_projection": {"type": "linear"}, "text_projection": {"type": "linear"}, "lm_head": {"type": "lm_head"},
    "objectives": {"caption": {"type": "captioning", "weight": 2.0}, "contrastive": {"type": "contrastive"}},
}


@hookimpl
def vlframe_models() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="coca",
            config=CoCaConfig,
            factory=CoCa,
            summary="Contrastive Captioner: image encoder, unimodal + multimodal text decoders, poolers.",
            example=EXAMPLE,
        )
    ]
