"""The base of model builders: what the engine needs from a model, written once.

A builder subclasses :class:`ModelBuilderConfig` for its config (it adds its component slots and
says what the model produces and can do) and :class:`ModelBase` for its module (it builds the
parts and writes ``forward`` and the capability methods). The base provides the rest of
:class:`registry.protocols.Model`: the objectives built from the config, their weighted sum,
``capabilities``, the parameters weight decay must spare, the repeated blocks, and the attention backend applied
to every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from registry import Catalog, ComponentConfig, ComponentError, Kind, ModelConfig, VlframeError, in_one_line, one_line
from vlframe.nn.attention import check_backend, set_attention_backend
from vlframe.nn.outputs import ModelOutput


class ModelBuilderConfig(ModelConfig):
    """:class:`registry.ModelConfig` plus the attention backend of every block."""

    attention_backend: str = Field(
        "auto", description="Attention implementation for every block: auto, sdpa, eager, math or triton.")

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return check_backend(name)


class ModelBase(nn.Module):
    """What every model builder's module shares. Subclasses call ``super().__init__(cfg,
    catalog=catalog)`` first, build their parts (:meth:`build_part`), set ``image_size`` (and
    the sizes of their capabilities, e.g. ``embed_dim``), and end with :meth:`finish`."""

    def __init__(self, cfg: ModelConfig, *, catalog: Catalog) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.context_length, self.pad_id = cfg.vocab_size, cfg.context_length, cfg.pad_id
        self.image_size: int = cfg.image_size or 0
        self.capabilities: frozenset[str] = frozenset(cfg.capabilities())
        self.objectives = nn.ModuleDict(
            {name: catalog.build(Kind.OBJECTIVE, objective, path=f"model.objectives.{name}")
             for name, objective in cfg.objectives.items()})
        self.loss_weights: dict[str, float] = {name: objective.weight for name, objective in cfg.objectives.items()}
        self._catalog = catalog

    # -- building --------------------------------------------------------------------------

    def build_part(self, kind: Kind, field: str, **kwargs: Any) -> Any:
        """The component in config field ``field`` built through the catalog (None when unset)."""
        sub = getattr(self.config, field)
        if sub is None:
            return None
        if not isinstance(sub, ComponentConfig):
            raise TypeError(f"model.{field} is not a component slot")
        return self._catalog.build(kind, sub, path=f"model.{field}", **kwargs)

    def finish(self) -> None:
        """Apply the config's attention backend to every block; check the sizes were set."""
        set_attention_backend(self, getattr(self.config, "attention_backend", "auto"))
        if not self.image_size:
            raise ValueError(f"{type(self).__name__} did not set image_size")
        self.__dict__.pop("_catalog", None)  # not needed once built (and not picklable)

    # -- the engine's members -------------------------------------------------------------

    def text_mask(self, text: Tensor, text_mask: Tensor | None) -> Tensor:
        """The key mask of ``text``: the one given, else every token that is not ``pad_id``."""
        return (text != self.pad_id) if text_mask is None else text_mask.to(torch.bool)

    def objectives_output(self, outputs: Mapping[str, Any]) -> ModelOutput:
        """Evaluate every objective on ``outputs`` and return their losses and weighted total.

        An objective that raises, or returns anything but a scalar tensor, is a one-line
        :class:`registry.ComponentError` naming it."""
        losses = {}
        for name, objective in self.objectives.items():
            where = f"model.objectives.{name} ({type(objective).__name__})"
            try:
                loss = objective(outputs)
            except VlframeError:
                raise
            except Exception as exc:
                raise ComponentError(f"{where} failed: {one_line(exc)}") from exc
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ComponentError(f"{where} returned {shape}, not a scalar loss")
            losses[name] = loss
        total = sum(self.loss_weights[name] * loss for name, loss in losses.items())
        return ModelOutput(loss=total, losses=losses, image_embeds=outputs.get("image_embeds"),
                           text_embeds=outputs.get("text_embeds"), logits=outputs.get("logits"))

    def required_outputs(self) -> set[str]:
        """Every output some objective of this model reads."""
        return set().union(*(type(o).requires for o in self.config.objectives.values()))

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay leaves alone: every one with fewer than two dimensions (biases,
        norm scales, a temperature) and those a part names in its own ``no_weight_decay()`` (position
        embeddings, class and query tokens), as timm's models do."""
        names = {name for name, p in self.named_parameters() if p.ndim < 2}
        own = dict(self.named_parameters())
        for prefix, module in self.named_modules():
            hook = getattr(module, "no_weight_decay", None)
            if module is self or not callable(hook):
                continue
            for name in hook():
                full = f"{prefix}.{name}" if prefix else name
                if full in own:
                    names.add(full)
        return names

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks of every part (each part's ``blocks`` list), in model order."""
        found: list[nn.Module] = []
        seen: set[int] = set()
        for module in self.modules():
            if module is self:
                continue
            stack = getattr(module, "blocks", None)
            if isinstance(stack, (nn.ModuleList, nn.Sequential)):
                for block in stack:
                    if id(block) not in seen:
                        seen.add(id(block))
                        found.append(block)
        return found

    def summary_groups(self) -> dict[str, list[str]]:
        """Sums of top-level parts ``vlframe model summary`` adds (none by default)."""
        return {}


def reset_all_parameters(model: nn.Module) -> None:
    """Run every module's ``reset_parameters()``, children before parents, as construction does (a
    part's own initialisation overrides its layers' defaults): how a model built on the meta device
    gets its weights. A reset that fails is a :class:`registry.ComponentError` naming the module."""
    for module in reversed(list(model.modules())):
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            try:
                reset()
            except Exception as exc:
                raise ComponentError(f"{type(module).__name__}.reset_parameters() failed on the meta-built "
                                     f"model: {in_one_line(exc)}") from exc
