"""Training objectives: CoCa's contrastive loss and captioning loss, and SigLIP's sigmoid loss."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from registry import ComponentSpec, ObjectiveConfig, hookimpl
from vlframe.sdk import all_reduce_sum, gather_with_grad, rank, recomputing, ring_shift_with_grad, world_size


class ContrastiveConfig(ObjectiveConfig):
    requires: ClassVar[frozenset[str]] = frozenset({"image_embeds", "text_embeds"})
    init_temperature: float = Field(0.07, gt=0, description="Softmax temperature at initialisation.")
    min_temperature: float = Field(0.01, gt=0, description="The learned temperature is clamped here.")
    learn_temperature: bool = True

    @model_validator(mode="after")
    def _check(self) -> ContrastiveConfig:
        if self.min_temperature > self.init_temperature:
            raise ValueError(
                f"min_temperature {self.min_temperature} exceeds init_temperature {self.init_temperature}"
            )
        return self


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the batch: image i matches text i, every other pair is a negative."""

    def __init__(self, cfg: ContrastiveConfig) -> None:
        super().__init__()
        # Learn log(1/T): positive by construction and well scaled for the optimiser.
        self.init_log_inv = math.log(1.0 / cfg.init_temperature)
        self.log_inv_temperature = nn.Parameter(torch.tensor(self.init_log_inv), requires_grad=cfg.learn_temperature)
        self.max_log_inv = math.log(1.0 / cfg.min_temperature)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_inv_temperature.fill_(self.init_log_inv)

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.logit_scale().detach()

    def logit_scale(self) -> Tensor:
        return self.log_inv_temperature.clamp(max=self.max_log_inv).exp()

    def metrics(self) -> dict[str, float]:
        return {"temperature": float(self.temperature)}

    def forward(self, outputs: dict[str, Tensor]) -> Tensor:
        image, text = outputs["image_embeds"].float(), outputs["text_embeds"].float()
        # Under torchrun the negatives are the *global* batch: each rank scores its own rows
        # against every rank's embeddings, and its positives sit at its offset in that batch.
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        scale = self.logit_scale()
        labels = torch.arange(image.shape[0], device=image.device) + rank() * image.shape[0]
        image_to_text = scale * image @ all_text.t()
        text_to_image = scale * text @ all_image.t()
        return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))


class SigmoidConfig(ObjectiveConfig):
    requires: ClassVar[frozenset[str]] = frozenset({"image_embeds", "text_embeds"})
    init_scale: float = Field(10.0, gt=0, description="Logit scale at initialisation (learned as its log: log 10).")
    init_bias: float = Field(-10.0, description="Logit bias at initialisation (SigLIP: -10, so that the many "
                                                "negatives start near probability 0).")
    learn_scale: bool = True
    learn_bias: bool = True


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (arXiv 2303.15343): every image-text pair is its own binary
    problem, positive on the diagonal; ``-sum log sigmoid(label * (scale * x.y + bias)) / batch``.

    Under torchrun the global ``B x B`` logits never exist on one rank: each rank scores its images
    against its own texts, then against every other rank's texts as they come round a ring
    (point-to-point, one neighbour's block at a time, gradients sent back the same way), so a
    rank's loss memory is ``local x local`` whatever the number of ranks. Each rank divides by its
    local batch; with DDP/FSDP averaging over ranks this is the gradient of the global loss.
    """

    def __init__(self, cfg: SigmoidConfig) -> None:
        super().__init__()
        self.init_log_scale, self.init_bias = math.log(cfg.init_scale), cfg.init_bias
        self.log_scale = nn.Parameter(torch.tensor(self.init_log_scale), requires_grad=cfg.learn_scale)
        self.bias = nn.Parameter(torch.tensor(float(cfg.init_bias)), requires_grad=cfg.learn_bias)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_scale.fill_(self.init_log_scale)
            self.bias.fill_(self.init_bias)

    def metrics(self) -> dict[str, float]:
        return {"scale": float(self.log_scale.detach().exp()), "bias": float(self.bias.detach())}

    def _pairs(self, image: Tensor, text: Tensor, positives: bool) -> Tensor:
        logits = self.log_scale.exp().to(image.dtype) * image @ text.t() + self.bias.to(image.dtype)
        labels = -torch.ones_like(logits)
        if positives:
            labels = labels + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum()

    def forward(self, outputs: dict[str, Tensor]) -> Tensor:
        dtype = torch.promote_types(outputs["image_embeds"].dtype, torch.float32)  # float32, or float64 if given
        image, text = outputs["image_embeds"].to(dtype), outputs["text_embeds"].to(dtype)
        total = self._pairs(image, text, positives=True)
        visiting = text
        for _ in range(world_size() - 1):  # the other ranks' texts, one neighbour at a time: negatives
            visiting = ring_shift_with_grad(visiting)
            # Recomputed in backward: only the visiting features (local x dim) are kept, not each
            # block's local x local logits, so memory does not grow with the number of ranks.
            if torch.is_grad_enabled():
                total = total + checkpoint(self._pairs, image, visiting, False, use_reentrant=False)
            else:
                total = total + self._pairs(image, visiting, positives=False)
        return total / image.shape[0]


class CaptioningConfig(ObjectiveConfig):
    requires: ClassVar[frozenset[str]] = frozenset({"caption_states", "lm_head", "text", "text_mask"})
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    chunk_tokens: int | None = Field(
        512, gt=0, description="When train.recompute includes caption_logits: score the vocabulary this many "
        "target tokens at a time, recomputing them in backward (saves the logits' memory); none: all at once.",
    )


class CaptioningLoss(nn.Module):
    """Next-token negative log-likelihood over the real (non-padding) target tokens.

    Reads the decoder's states and applies the LM head itself: only real target positions are
    scored. With ``caption_logits`` recomputed (``train.recompute``), in chunks whose logits are
    recomputed during backward rather than kept, so that the ``(B, L, vocabulary)`` logits never
    exist at once (the largest activation of a captioner); otherwise all at once, which is faster.
    """

    def __init__(self, cfg: CaptioningConfig) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing
        self.chunk = cfg.chunk_tokens

    def _chunk_nll(self, states: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
        logits = head(states).float()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction="sum")

    def forward(self, outputs: dict[str, Any]) -> Tensor:
        states, head = outputs["caption_states"], outputs["lm_head"]
        text, mask = outputs["text"], outputs["text_mask"]
        keep = mask[:, 1:]  # position t predicts token t+1, when that token is real
        states, targets = states[:, :-1][keep], text[:, 1:][keep]
        total = states.new_zeros((), dtype=torch.float32)
        chunked = bool(self.chunk) and torch.is_grad_enabled() and recomputing("caption_logits", states.device.type)
        step = self.chunk if chunked else max(1, targets.shape[0])
        for start in range(0, targets.shape[0], step):
            part = (states[start : start + step], targets[start : start + step], head)
            if chunked:
                total = total + checkpoint(self._chunk_nll, *part, use_reentrant=False)
            else:
                total = total + self._chunk_nll(*part)
        # Mean over the real target tokens of the *global* batch (a batch without any gives 0, not
        # NaN). Each rank divides by the global count times world size, so that DDP's gradient
        # average equals the gradient of the global mean, whatever each rank's caption lengths.
        count = all_reduce_sum(mask[:, 1:].sum().float()).clamp_min(1)
        return total * world_size() / count


@hookimpl
def vlframe_objectives() -> list[ComponentSpec]:
    return [
        ComponentSpec("contrastive", ContrastiveConfig, ContrastiveLoss,
                      "Symmetric InfoNCE with a learned, clamped temperature (init 0.07)."),
        ComponentSpec("sigmoid", SigmoidConfig, SigmoidLoss,
                      "SigLIP's pairwise sigmoid loss, learned scale and bias (init 10, -10); a ring exchange "
                      "across ranks, never the global logits on one rank."),
        ComponentSpec("captioning", CaptioningConfig, CaptioningLoss,
                      "Next-token NLL over the caption, padding ignored, optional label smoothing."),
    ]
