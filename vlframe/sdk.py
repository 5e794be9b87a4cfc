"""The plugin SDK: everything a plugin may import from vlframe, in one module.

A plugin depends on the contract (:mod:`registry`: hooks, protocols, config bases) and on this
module; nothing else of vlframe is public to plugins, so the engine can change behind it. The
built-in plugins (``vlframe_builtins``) import only from these two, as a third-party package
would. Names load on first use, so importing a plugin stays cheap.

Building blocks
    ``Attention`` (the one attention module: self, causal, cross, pooling; key-padding masks;
    backends), ``Block`` (pre-norm transformer block, optional cross-attention), ``MLP``,
    ``QuickGELU``, ``ACTIVATIONS``, ``TransformerConfig`` (width/layers/heads/MLP fields),
    ``init_weights``, ``KVCache`` (incremental decoding), ``set_attention_backend``,
    ``check_backend``.
Model builders
    ``ModelBase`` and ``ModelBuilderConfig`` (see :mod:`vlframe.nn.model`), ``ModelOutput``.
Objectives
    ``gather_with_grad`` (all-gather keeping gradients), ``ring_shift_with_grad`` (the previous
    rank's tensor, gradients flowing back), ``all_reduce_sum``, ``rank``,
    ``world_size``.
Datasets
    ``Sample``, ``SampleError``, ``FileDataset``, ``load_image``, ``clean_captions``.
Evaluation tasks
    ``EvalResult``, ``TaskContext``, ``Trained`` (a loaded model with ``embed_images``,
    ``embed_texts``, ``caption``, ``load_images``, ``tokenize``, ``autocast``), ``frozen``,
    ``iter_samples``, ``batched``, ``labelled_images``, ``embed_dataset``, ``describe``,
    ``retrieval_recall``, ``retrieval_ranks``, ``recall_from_ranks``, ``topk_accuracy``,
    ``score_captions`` (with ``per_image`` scores), ``CAPTION_METRICS``,
    ``zero_shot_classifier``, ``classify``, ``PROMPT_TEMPLATES``, ``GenerationConfig``, ``CAPTION_DEFAULTS``,
    ``generate``, ``write_caption_table``, ``thumbnail``.
Parallel strategies (``vlframe_parallel_strategies``; the contract is
:class:`registry.protocols.ParallelStrategy`)
    ``setup_process_group`` (join the group torchrun describes; ``group=True`` makes one even for
    a single process), ``barrier``, ``broadcast_object``, ``gather_names`` (the union of name
    lists over ranks), ``local_only`` (compute as if alone: an evaluation on one rank),
    ``save_whole`` / ``save_sharded`` (write the model and optimiser in a checkpoint format:
    one ``model.safetensors`` by rank 0, or every rank's shards through
    ``torch.distributed.checkpoint``; each returns the state entries to record),
    ``load_checkpoint`` (restore either format into a whole or sharded model), and
    ``reset_all_parameters`` (initialise a model built on the meta device).
Tracking sinks (``vlframe_tracking_sinks``; the contract is :class:`registry.protocols.TrackingSink`)
    need nothing from here: events arrive as plain mappings, runs go back as
    :class:`registry.RunRecord`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlframe.lazy import lazy

_EXPORTS = {
    # building blocks
    "Attention": "vlframe.nn.attention",
    "set_attention_backend": "vlframe.nn.attention",
    "check_backend": "vlframe.nn.attention",
    "Block": "vlframe.nn.transformer",
    "MLP": "vlframe.nn.transformer",
    "QuickGELU": "vlframe.nn.transformer",
    "ACTIVATIONS": "vlframe.nn.transformer",
    "init_weights": "vlframe.nn.transformer",
    "TransformerConfig": "vlframe.nn.config",
    "MAX_WIDTH": "vlframe.nn.config",
    "MAX_LAYERS": "vlframe.nn.config",
    "KVCache": "vlframe.nn.cache",
    "bidirectional": "vlframe.nn.attention",
    "recomputing": "vlframe.nn.recompute",
    # model builders
    "ModelBase": "vlframe.nn.model",
    "ModelBuilderConfig": "vlframe.nn.model",
    "ModelOutput": "vlframe.nn.outputs",
    # objectives
    "gather_with_grad": "vlframe.runtime.distributed",
    "ring_shift_with_grad": "vlframe.runtime.distributed",
    "all_reduce_sum": "vlframe.runtime.distributed",
    "rank": "vlframe.runtime.distributed",
    "world_size": "vlframe.runtime.distributed",
    # datasets
    "Sample": "vlframe.data.samples",
    "SampleError": "vlframe.data.samples",
    "FileDataset": "vlframe.data.samples",
    "load_image": "vlframe.data.samples",
    "clean_captions": "vlframe.data.samples",
    # evaluation tasks
    "EvalResult": "vlframe.evaluation.tasks",
    "TaskContext": "vlframe.evaluation.tasks",
    "iter_samples": "vlframe.evaluation.datasets",
    "batched": "vlframe.evaluation.datasets",
    "labelled_images": "vlframe.evaluation.datasets",
    "embed_dataset": "vlframe.evaluation.datasets",
    "describe": "vlframe.evaluation.datasets",
    "retrieval_recall": "vlframe.evaluation.metrics",
    "retrieval_ranks": "vlframe.evaluation.metrics",
    "recall_from_ranks": "vlframe.evaluation.metrics",
    "topk_accuracy": "vlframe.evaluation.metrics",
    "score_captions": "vlframe.evaluation.caption_metrics",
    "CAPTION_METRICS": "vlframe.evaluation.caption_metrics",
    "UNAVAILABLE": "vlframe.evaluation.caption_metrics",
    "zero_shot_classifier": "vlframe.evaluation.zeroshot",
    "classify": "vlframe.evaluation.zeroshot",
    "PROMPT_TEMPLATES": "vlframe.evaluation.zeroshot",
    "write_caption_table": "vlframe.evaluation.report",
    "thumbnail": "vlframe.evaluation.report",
    "Trained": "vlframe.inference.trained",
    "frozen": "vlframe.inference.trained",
    "GenerationConfig": "vlframe.inference.generation",
    "CAPTION_DEFAULTS": "vlframe.inference.generation",
    "generate": "vlframe.inference.generation",
    # importers and pretrained weights
    "read_weights_file": "vlframe.interchange.weights",
    # parallel strategies
    "setup_process_group": "vlframe.runtime.distributed",
    "barrier": "vlframe.runtime.distributed",
    "broadcast_object": "vlframe.runtime.distributed",
    "gather_names": "vlframe.runtime.distributed",
    "local_only": "vlframe.runtime.distributed",
    "save_whole": "vlframe.runs.formats",
    "save_sharded": "vlframe.runs.formats",
    "load_checkpoint": "vlframe.runs.formats",
    "reset_all_parameters": "vlframe.nn.model",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)


if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily
    from vlframe.data.samples import FileDataset, Sample, SampleError, clean_captions, load_image
    from vlframe.evaluation.caption_metrics import CAPTION_METRICS, UNAVAILABLE, score_captions
    from vlframe.evaluation.datasets import batched, describe, embed_dataset, iter_samples, labelled_images
    from vlframe.evaluation.metrics import recall_from_ranks, retrieval_ranks, retrieval_recall, topk_accuracy
    from vlframe.evaluation.report import thumbnail, write_caption_table
    from vlframe.evaluation.tasks import EvalResult, TaskContext
    from vlframe.evaluation.zeroshot import PROMPT_TEMPLATES, classify, zero_shot_classifier
    from vlframe.inference.generation import CAPTION_DEFAULTS, GenerationConfig, generate
    from vlframe.interchange.weights import read_weights_file
    from vlframe.inference.trained import Trained, frozen
    from vlframe.nn.attention import Attention, bidirectional, check_backend, set_attention_backend
    from vlframe.nn.cache import KVCache
    from vlframe.nn.recompute import recomputing
    from vlframe.nn.config import MAX_LAYERS, MAX_WIDTH, TransformerConfig
    from vlframe.nn.model import ModelBase, ModelBuilderConfig
    from vlframe.nn.outputs import ModelOutput
    from vlframe.nn.transformer import ACTIVATIONS, MLP, Block, QuickGELU, init_weights
    from vlframe.nn.model import reset_all_parameters
    from vlframe.runs.formats import load as load_checkpoint
    from vlframe.runs.formats import save_sharded, save_whole
    from vlframe.runtime.distributed import (
        all_reduce_sum,
        barrier,
        broadcast_object,
        gather_names,
        gather_with_grad,
        local_only,
        rank,
        ring_shift_with_grad,
        setup_process_group,
        world_size,
    )
