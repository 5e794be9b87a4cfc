"""Shared neural building blocks: the attention module and transformer blocks plugins compose."""

from vlframe.nn.attention import BACKENDS, Attention, set_attention_backend
from vlframe.nn.cache import KVCache
from vlframe.nn.outputs import ModelOutput
from vlframe.nn.transformer import ACTIVATIONS, MLP, Block, QuickGELU, init_weights

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "BACKENDS",
    "Block",
    "MLP",
    "ModelOutput",
    "QuickGELU",
    "KVCache",
    "init_weights",
    "set_attention_backend",
]
