"""Evaluation metrics computed from embeddings and logits: retrieval recall, top-k accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def retrieval_ranks(image_embeds: Tensor, text_embeds: Tensor, text_image: Tensor) -> tuple[Tensor, Tensor]:
    """Each query's rank (0 = first) of its first correct answer: (per image, among the texts;
    per caption, among the images). ``text_image[j]`` is the image index of caption ``j``."""
    sims = image_embeds.float() @ text_embeds.float().t()  # (images, texts)
    images = torch.arange(sims.shape[0], device=sims.device)
    ranked_texts = sims.argsort(dim=1, descending=True)
    i2t_first = (text_image[ranked_texts] == images[:, None]).float().argmax(dim=1)
    ranked_images = sims.t().argsort(dim=1, descending=True)
    t2i_first = (ranked_images == text_image[:, None]).float().argmax(dim=1)
    return i2t_first, t2i_first


def retrieval_recall(image_embeds: Tensor, text_embeds: Tensor, text_image: Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways with several captions per image (the COCO / Flickr protocol).

    ``text_image[j]`` is the image index of caption ``j``. Image->text counts a hit when any of
    the image's captions is in the top k; text->image when the caption's image is.
    """
    i2t_first, t2i_first = retrieval_ranks(image_embeds, text_embeds, text_image)
    return recall_from_ranks(i2t_first, t2i_first, ks)


def recall_from_ranks(i2t_first: Tensor, t2i_first: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t_first < k).double().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (t2i_first < k).double().mean().item()
    return out


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the ``k`` highest logits, as ``{"top1": .., "top5": ..}``.

    A ``k`` above the number of classes is clamped to it (so ``top5`` over 3 classes is 1.0),
    keeping its requested name. Ties are broken by ``torch.topk``'s order.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (samples, classes), got shape {tuple(logits.shape)}")
    labels = labels.to(logits.device).long().view(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no samples")
    if ((labels < 0) | (labels >= logits.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be at least 1, got {tuple(ks)}")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (samples, kmax), best first
    hits = top == labels[:, None]
    out = {}
    for k in ks:
        out[f"top{k}"] = hits[:, : min(k, logits.shape[1])].any(dim=1).float().mean().item()
    return out
