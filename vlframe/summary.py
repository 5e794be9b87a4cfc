"""Parameter counts by component, as the paper's Table 1 reports them."""

from __future__ import annotations

from torch import nn

#: Parts the paper counts as "decoder": both text decoders, the token embedding and the LM head.
DECODER_PARTS = ("text_decoder", "multimodal_decoder", "lm_head")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level component, plus ``decoder`` and ``total``.

    A tied weight is counted once, under the component that registered it first.
    """
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():  # shared parameters appear once
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + param.numel()
    counts["decoder"] = sum(counts.get(part, 0) for part in DECODER_PARTS)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
