"""Evaluation metrics computed from embeddings."""

from __future__ import annotations

import torch
from torch import Tensor


def retrieval_recall(image_embeds: Tensor, text_embeds: Tensor, text_image: Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways with several captions per image (the COCO / Flickr protocol).

    ``text_image[j]`` is the image index of caption ``j``. Image->text counts a hit when any of
    the image's captions is in the top k; text->image when the caption's image is.
    """
    sims = image_embeds.float() @ text_embeds.float().t()  # (images, texts)
    images = torch.arange(sims.shape[0], device=sims.device)
    ranked_texts = sims.argsort(dim=1, descending=True)
    i2t_first = (text_image[ranked_texts] == images[:, None]).float().argmax(dim=1)
    ranked_images = sims.t().argsort(dim=1, descending=True)
    t2i_first = (ranked_images == text_image[:, None]).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t_first < k).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (t2i_first < k).float().mean().item()
    return out
