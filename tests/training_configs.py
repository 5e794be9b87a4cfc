"""Small configs for training tests: coca_tiny's structure at sizes that train in seconds."""

from __future__ import annotations

import json

from conftest import CONFIGS

TINY = CONFIGS / "coca_tiny.yaml"


def micro(tmp_path, **extra) -> dict:
    """Overrides making coca_tiny a few-millisecond model on 64 px synthetic scenes, untracked."""
    overrides = {
        "model.vocab_size": 512, "model.embed_dim": 32,
        "model.image_encoder.image_size": 64, "model.image_encoder.width": 64, "model.image_encoder.layers": 1,
        "model.image_encoder.heads": 2,
        "model.text_decoder.width": 64, "model.text_decoder.layers": 1, "model.text_decoder.heads": 2,
        "model.multimodal_decoder.width": 64, "model.multimodal_decoder.layers": 1, "model.multimodal_decoder.heads": 2,
        "model.caption_pooler.n_query": 8, "model.caption_pooler.heads": 2, "model.contrastive_pooler.heads": 2,
        "data.train.size": 512, "data.train.image_size": 64, "data.val": None, "data.num_workers": 0,
        "train.batch_size": 16, "train.steps": 6, "train.warmup_steps": 2, "train.log_every": 1,
        "train.val_every": None, "train.checkpoint_every": 3,
        "train.output_dir": str(tmp_path / "runs"), "tracking.enabled": False, "train.precision": "fp32",
    }
    overrides.update(extra)
    return overrides


def learner(tmp_path, **extra) -> dict:
    """Overrides for the model the downstream tests share: coca_tiny at 64 px with patch 8 (the
    same 64 image tokens), width 128, on single-object scenes, 300 steps (about 30 s on 2 cores in
    float32). The fewest steps measured to learn colours and sizes with a wide margin: at 200 steps
    captions name the colour of 49% of scenes, at 300 steps 93% (the tests ask for 60%)."""
    overrides = {
        "model.vocab_size": 1024, "model.embed_dim": 128,
        "model.image_encoder.image_size": 64, "model.image_encoder.patch_size": 8,
        "model.image_encoder.width": 128, "model.image_encoder.layers": 2,
        "model.text_decoder.width": 128, "model.text_decoder.layers": 1,
        "model.multimodal_decoder.width": 128, "model.multimodal_decoder.layers": 1,
        "model.caption_pooler.n_query": 16,
        "data.train.image_size": 64, "data.train.max_objects": 1,
        "data.val.image_size": 64, "data.val.max_objects": 1,
        "train.steps": 300, "train.lr": 1e-3, "train.warmup_steps": 20, "train.val_every": None,
        "train.checkpoint_every": None, "train.output_dir": str(tmp_path),
    }
    overrides.update(extra)
    return overrides


def sets(overrides: dict) -> list[str]:
    """``--set KEY=VALUE`` arguments for the command line."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
