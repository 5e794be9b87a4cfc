"""Evaluation: the task dispatcher, dataset resolution and metrics (tasks themselves are plugins).

This was one module, ``vlframe.evaluation``, before it became a package: its names still load from
here, with a warning saying where each went (plugins import them from ``vlframe.sdk``).
"""

from vlframe.lazy import lazy

__getattr__, __dir__ = lazy(__name__, {}, moved={
    "EvalResult": ("vlframe.sdk", "EvalResult"),
    "default_out_dir": ("vlframe.evaluation.tasks", "default_out_dir"),
    "build_dataset": ("vlframe.evaluation.datasets", "build_dataset"),
    "describe": ("vlframe.sdk", "describe"),
    "iter_samples": ("vlframe.sdk", "iter_samples"),
    "batched": ("vlframe.sdk", "batched"),
    "embed_dataset": ("vlframe.sdk", "embed_dataset"),
    "labelled_images": ("vlframe.sdk", "labelled_images"),
    "write_caption_table": ("vlframe.sdk", "write_caption_table"),
    "save_result": ("vlframe.evaluation.report", "save_result"),
})
