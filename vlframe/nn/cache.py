"""Key/value cache for incremental decoding.

During generation each new token attends to every earlier one. Keeping each attention layer's
keys and values means a step projects only the new token instead of the whole prefix, and the
cross-attention keys and values of the image context are projected once, at the first step.

Two layouts. The default grows each layer's keys and values by one position per step. A
*static* cache (``KVCache(capacity=N)``) allocates N positions per layer at the first call and
writes each step in place; attention then reads all N, with a key mask hiding the positions not
yet written. Every step after the first has the same shapes, which is what lets a compiled
decode step (``GenerationConfig.compile``) run without recompiling at each length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Per-layer keys and values, keyed by the attention module that owns them.

    ``offset`` is the number of positions already decoded (the position of the next token); the
    model advances it once per step, after all its decoders have run.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._self: dict[int, tuple[Tensor, Tensor]] = {}
        self._cross: dict[int, tuple[Tensor, Tensor]] = {}
        self.offset = 0
        self.capacity = capacity

    @property
    def static(self) -> bool:
        return self.capacity is not None

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append a self-attention layer's new keys/values ``(B, H, L, D)``; return all of them
        (static: all ``capacity`` positions, see :meth:`key_mask`)."""
        old = self._self.get(id(layer))
        if self.capacity is not None:
            length = k.shape[2]
            if old is None:
                if self.offset != 0:
                    raise ValueError("a static cache's buffers are made by the first call, at offset 0")
                if length > self.capacity:
                    raise ValueError(f"{length} positions exceed the static cache's capacity {self.capacity}")
                shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
                old = (k.new_zeros(shape), v.new_zeros(shape))
                self._self[id(layer)] = old
            old[0][:, :, self.offset : self.offset + length] = k
            old[1][:, :, self.offset : self.offset + length] = v
            return old
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self._self[id(layer)] = (k, v)
        return k, v

    def key_mask(self, key_mask: Tensor | None, length: int, batch: int, device: torch.device) -> Tensor | None:
        """The key mask for a self-attention over what :meth:`extend` returned: static, the
        positions written so far (this call's ``length`` new ones included); else unchanged."""
        if self.capacity is None:
            return key_mask
        if key_mask is not None:
            raise ValueError("a static cache takes no key mask (generation decodes every position it feeds)")
        written = torch.arange(self.capacity, device=device) < self.offset + length
        return written.expand(batch, self.capacity)

    def cross(self, layer: nn.Module) -> tuple[Tensor, Tensor] | None:
        """A cross-attention layer's context keys/values, if already projected."""
        return self._cross.get(id(layer))

    def set_cross(self, layer: nn.Module, k: Tensor, v: Tensor) -> None:
        self._cross[id(layer)] = (k, v)

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order): beam search's survivors."""
        for store in (self._self, self._cross):
            for key, (k, v) in store.items():
                if self.capacity is not None and store is self._self:  # in place: the same buffers
                    k.copy_(k.index_select(0, index))
                    v.copy_(v.index_select(0, index))
                else:
                    store[key] = (k.index_select(0, index), v.index_select(0, index))
