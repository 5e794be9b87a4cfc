"""Key/value cache for incremental decoding.

During generation each new token attends to every earlier one. Keeping each attention layer's
keys and values means a step projects only the new token instead of the whole prefix, and the
cross-attention keys and values of the image context are projected once, at the first step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Per-layer keys and values, keyed by the attention module that owns them.

    ``offset`` is the number of positions already decoded (the position of the next token); the
    model advances it once per step, after all its decoders have run.
    """

    def __init__(self) -> None:
        self._self: dict[int, tuple[Tensor, Tensor]] = {}
        self._cross: dict[int, tuple[Tensor, Tensor]] = {}
        self.offset = 0

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append a self-attention layer's new keys/values ``(B, H, L, D)``; return all of them."""
        old = self._self.get(id(layer))
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self._self[id(layer)] = (k, v)
        return k, v

    def cross(self, layer: nn.Module) -> tuple[Tensor, Tensor] | None:
        """A cross-attention layer's context keys/values, if already projected."""
        return self._cross.get(id(layer))

    def set_cross(self, layer: nn.Module, k: Tensor, v: Tensor) -> None:
        self._cross[id(layer)] = (k, v)

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order): beam search's survivors."""
        for store in (self._self, self._cross):
            for key, (k, v) in store.items():
                store[key] = (k.index_select(0, index), v.index_select(0, index))
