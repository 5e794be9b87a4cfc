"""Zero-shot classification: a classifier built from prompts, cosine logits, top-k accuracy.

The CLIP recipe: each class name is written into every prompt template, the prompts are
embedded by the text tower, and the class's weight is the mean of their unit-length
embeddings, renormalised. An image's logits are its cosine similarities to the class weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: A short ensemble of CLIP-style prompt templates; ``{}`` stands for the class name.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)


def zero_shot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    *,
    batch_size: int = 256,
) -> Tensor:
    """Class weights ``(num_classes, dim)``, each the renormalised mean of its prompts' embeddings.

    ``encode_text(prompts)`` returns one embedding per prompt, ``(len(prompts), dim)``,
    normalised or not: each is scaled to unit length before averaging over ``templates``, so
    every template counts equally. Whole classes are encoded together, as many per call as fit
    in ``batch_size`` prompts (at least one class per call, however many templates it has).
    The result is float32, on the device ``encode_text`` returns, and has unit-length rows.
    """
    names = list(class_names)
    templates = list(templates)
    if not names:
        raise ValueError("no class names")
    if not templates:
        raise ValueError("no prompt templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt template(s) without '{{}}' for the class name: {bad}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    per_call = max(1, batch_size // len(templates))  # classes per encode_text call
    weights = []
    for start in range(0, len(names), per_call):
        chunk = names[start : start + per_call]
        prompts = [t.format(name) for name in chunk for t in templates]
        embeds = encode_text(prompts)
        if embeds.ndim != 2 or embeds.shape[0] != len(prompts):
            raise ValueError(
                f"encode_text returned shape {tuple(embeds.shape)} for {len(prompts)} prompts; "
                "expected (prompts, dim)"
            )
        embeds = F.normalize(embeds.detach().float(), dim=-1)
        weights.append(F.normalize(embeds.reshape(len(chunk), len(templates), -1).mean(dim=1), dim=-1))
    return torch.cat(weights)


def classify(image_embeds: Tensor, classifier: Tensor) -> Tensor:
    """Logits ``(images, classes)``: cosine similarities of images to the class weights.

    Both sides are normalised here (float32), so unnormalised image embeddings are fine.
    """
    return F.normalize(image_embeds.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).t()
