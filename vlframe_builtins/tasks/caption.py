"""Captioning: caption every image and score against its references (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, by pycocoevalcap), with ``captions.jsonl`` and a ``captions.html`` page to look at."""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

from pydantic import Field, field_validator

from registry import Capability, ComponentSpec, TaskConfig, hookimpl
from vlframe.sdk import (
    CAPTION_METRICS,
    UNAVAILABLE,
    EvalResult,
    GenerationConfig,
    TaskContext,
    batched,
    describe,
    iter_samples,
    score_captions,
    write_caption_table,
)


class CaptionTaskConfig(TaskConfig):
    requires: ClassVar[frozenset[str]] = frozenset({Capability.CAPTIONING})
    limit: int | None = Field(None, gt=0, description="Caption only the first N images.")
    batch_size: int = Field(16, gt=0, description="Images captioned together.")
    metrics: list[str] | None = Field(
        None, description=f"Scores to compute, of {', '.join(CAPTION_METRICS)} (default: all; METEOR starts a Java "
        "process of its own).")
    table_rows: int = Field(32, ge=0, description="Images shown in captions.html.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig.for_captions,
                                         description="How captions are decoded (default: the captioning defaults, "
                                         "beam search over 4 hypotheses with bigram blocking; {strategy: greedy, no_repeat_ngram_size: 0} for "
                                         "plain greedy).")

    @field_validator("generation", mode="before")
    @classmethod
    def _caption_defaults(cls, value: Any) -> Any:
        from vlframe.sdk import CAPTION_DEFAULTS

        return {**CAPTION_DEFAULTS, **value} if isinstance(value, dict) else value

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics: list[str] | None) -> list[str] | None:
        unknown = sorted(set(metrics or ()) - set(CAPTION_METRICS))
        if unknown:
            raise ValueError(f"unknown caption metric(s) {', '.join(unknown)}; available: {', '.join(CAPTION_METRICS)}")
        return metrics


class CaptionTask:
    def __init__(self, cfg: CaptionTaskConfig) -> None:
        self.cfg = cfg

    def run(self, context: TaskContext) -> EvalResult:
        from vlframe.sdk import thumbnail

        cfg, trained = self.cfg, context.trained
        dataset = context.dataset(cfg.data)
        candidates: dict[str, str] = {}
        references: dict[str, list[str]] = {}
        rows: list[dict[str, Any]] = []
        skipped: list[str] = []
        began = time.perf_counter()
        for batch in batched(iter_samples(dataset, cfg.limit, skipped), cfg.batch_size):
            images = trained.load_images([s.image for s in batch])
            captions = trained.caption(images, cfg.generation)
            for sample, caps in zip(batch, captions):
                key = sample.key if sample.key not in candidates else f"{sample.key}#{len(candidates)}"
                candidates[key], references[key] = caps[0], list(sample.captions)
                row = {"key": key, "caption": caps[0], "references": list(sample.captions)}
                if len(rows) < cfg.table_rows:
                    row["thumbnail"] = thumbnail(sample.image)
                rows.append(row)
        if not candidates:
            raise ValueError(f"no usable image to caption ({len(skipped)} skipped: {skipped[:3]})")
        seconds = time.perf_counter() - began
        per_image: dict[str, dict[str, float]] = {}
        scores = score_captions(candidates, references, metrics=cfg.metrics, per_image=per_image)
        result = EvalResult(
            "caption",
            {name: 100.0 * value for name, value in scores.items()},
            {"data": describe(dataset), "images": len(candidates), "skipped": len(skipped),
             "seconds": round(seconds, 2), "generation": cfg.generation.model_dump(), "unavailable": dict(UNAVAILABLE)},
            items={name: {key: 100.0 * v for key, v in each.items()} for name, each in per_image.items()},
        )
        if context.out_dir is not None:
            out = context.out_dir
            out.mkdir(parents=True, exist_ok=True)
            with (out / "captions.jsonl").open("w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps({k: v for k, v in row.items() if k != "thumbnail"}) + "\n")
            result.files.append(out / "captions.jsonl")
            title = f"{trained.run.path.name} ({trained.checkpoint_name}): {len(candidates)} images"
            result.files.append(write_caption_table([r for r in rows if "thumbnail" in r], out / "captions.html", title))
        return result


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("caption", CaptionTaskConfig, CaptionTask,
                          "Caption images; BLEU-1..4, METEOR, ROUGE-L, CIDEr-D against the references, and an HTML table.")]
