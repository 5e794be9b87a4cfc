"""Small configs for training tests: coca_tiny's structure at a size that steps in milliseconds."""

from __future__ import annotations

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
        "train.val_every": None, "train.checkpoint_every": 3, "train.output_dir": str(tmp_path / "runs"),
        "tracking.enabled": False, "train.precision": "fp32",
    }
    overrides.update(extra)
    return overrides
