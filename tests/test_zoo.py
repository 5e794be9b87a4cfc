"""The model zoo (configs/zoo): CoCa, CLIP, SigLIP and CapPa from the same parts. Each trains; each
runs the tasks its capabilities allow and refuses the others in one line; CapPa's parallel
prediction really decodes from mask tokens with bidirectional attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from registry import Capability
from vlframe.api import build_model
from vlframe.config import files as configfile
from vlframe.inference.generation import generate

from conftest import CONFIGS, run_main
from numerics import assert_close
from training_configs import micro, sets

ZOO = CONFIGS / "zoo"
FAMILIES = ("coca", "clip", "siglip", "cappa")
# micro() shapes coca_tiny's parts; CapPa's decoder is all multimodal.
SHAPE = {"cappa": {"model.text_decoder.layers": 0, "model.multimodal_decoder.layers": 2,
                   "model.caption_pooler.n_query": None, "model.caption_pooler.heads": None,
                   "model.contrastive_pooler.heads": None},
         "clip": {"model.multimodal_decoder.width": None, "model.multimodal_decoder.layers": None,
                  "model.multimodal_decoder.heads": None, "model.caption_pooler.n_query": None,
                  "model.caption_pooler.heads": None}}


def _overrides(family: str, tmp: Path, **extra) -> dict:
    base = micro(tmp, **extra)
    shape = SHAPE.get("clip" if family == "siglip" else family, {})
    for key, value in shape.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("scale", ["tiny", "base"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_zoo_config_validates_and_builds(family: str, scale: str) -> None:
    config, registry = configfile.load(ZOO / f"{family}_{scale}.yaml")
    model = build_model(config, registry=registry, device="meta")
    caps = model.capabilities
    assert (Capability.CONTRASTIVE in caps) == (family != "cappa")
    assert (Capability.CAPTIONING in caps) == (family in ("coca", "cappa"))
    if family == "siglip":
        assert type(model.objectives["contrastive"]).__name__ == "SigmoidLoss"


def test_cappa_parallel_prediction_reads_mask_tokens_both_ways(tmp_path: Path) -> None:
    config, registry = configfile.load(ZOO / "cappa_tiny.yaml", _overrides("cappa", tmp_path))
    torch.manual_seed(0)
    model = build_model(config, registry=registry)
    images = torch.randn(2, 3, 64, 64)
    text = torch.randint(5, 500, (2, 10))
    text[:, 0] = 1
    mask = torch.ones_like(text, dtype=torch.bool)
    context = model.caption_context(images)
    par = model._parallel_states(text, mask, context)
    # The inputs after BOS are the mask token: the caption's own tokens change nothing ...
    other = text.clone()
    other[:, 1:] = torch.randint(5, 500, (2, 9))
    assert_close(model._parallel_states(other, mask, context), par)
    # ... and position 1 sees later positions (hiding key 5 changes it): bidirectional.
    shorter = mask.clone()
    shorter[:, 5:] = False
    assert not torch.allclose(model._parallel_states(text, shorter, context)[:, 1], par[:, 1])
    # Training mode: 75% of the batch (3 of 4 rows) is decoded in parallel; the mask token learns.
    model.train()
    out = model(torch.randn(4, 3, 64, 64), torch.cat([text, text]))
    out.loss.backward()
    assert model.text_decoder.mask_token.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()  # evaluation and generation are autoregressive: the mask token is not used
    model(images, text).loss.backward()
    assert model.text_decoder.mask_token.grad is None or model.text_decoder.mask_token.grad.abs().sum() == 0


def test_parallel_prediction_without_a_captioner_is_one_clear_line(tmp_path: Path) -> None:
    result = run_main("config", "validate", str(ZOO / "clip_tiny.yaml"), "--set", "model.parallel_prediction=0.5")
    assert result.code == 2
    assert "model.parallel_prediction: parallel prediction is a way of captioning" in result.err


@pytest.fixture(scope="module")
def trained_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for family in FAMILIES:
        tmp = tmp_path_factory.mktemp(f"zoo_{family}")
        result = run_main("train", str(ZOO / f"{family}_tiny.yaml"), "--run-dir", str(tmp / "run"),
                          *sets(_overrides(family, tmp, **{"train.steps": 4, "train.checkpoint_every": None})))
        assert result.code == 0, (family, result.err[-2000:])
        runs[family] = tmp / "run"
    return runs


def test_siglip_logs_its_scale_and_bias(tmp_path: Path) -> None:
    from vlframe.training.trainer import Trainer

    config, registry = configfile.load(ZOO / "siglip_tiny.yaml",
                                       _overrides("siglip", tmp_path, **{"train.steps": 2, "train.checkpoint_every": None}))
    result = Trainer(config, registry, run_dir=tmp_path / "run").fit()
    last = result.history[-1]
    assert last["train/contrastive/scale"] == pytest.approx(10.0, rel=0.05)
    assert last["train/contrastive/bias"] == pytest.approx(-10.0, abs=0.1)


def test_each_family_runs_what_it_can_and_refuses_the_rest_in_one_line(trained_zoo, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    folder = tmp_path / "colours"
    for colour, rgb in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (folder / colour).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), tuple(max(0, c - 10 * i) for c in rgb)).save(folder / colour / f"{i}.png")
    for family, run in trained_zoo.items():
        captioner = family in ("coca", "cappa")
        contrastive = family != "cappa"
        for strategy in ("greedy", "beam", "sample"):
            result = run_main("caption", str(run), str(image), "--strategy", strategy, "--json")
            if captioner:
                assert result.code == 0, (family, strategy, result.err[-1500:])
                assert json.loads(result.out.splitlines()[-1])["captions"]
            else:
                errors = [line for line in result.err.splitlines() if line.startswith("error:")]
                assert result.code == 2 and len(errors) == 1 and "captioning" in errors[0], (family, result.err)
        retrieval = run_main("eval", str(run), "--task", "retrieval", "--limit", "16", "--no-track")
        zeroshot = run_main("eval", str(run), "--task", "zeroshot", "--data", str(folder), "--no-track")
        for result in (retrieval, zeroshot):
            if contrastive:
                assert result.code == 0, (family, result.err[-1500:])
            else:
                errors = [line for line in result.err.splitlines() if line.startswith("error:")]
                assert result.code == 2 and len(errors) == 1 and "contrastive" in errors[0], (family, result.err)
    probe = run_main("eval", str(trained_zoo["cappa"]), "--task", "probe", "--data", str(folder), "--steps", "5",
                     "--no-track")
    assert probe.code == 0, probe.err[-1500:]
    # CapPa's multimodal states serve the understanding head (does this caption fit the image).
    config = trained_zoo["cappa"] / "config.yaml"
    for split, limit in (("train", "48"), ("val", "24")):
        made = run_main("data", "match-pairs", str(config), "--split", split, "--limit", limit,
                        "--out", str(tmp_path / split), "--set",
                        "data.val={type: synthetic, val_size: 32, image_size: 64}")
        assert made.code == 0, made.err[-1500:]
    understanding = run_main("eval", str(trained_zoo["cappa"]), "--task", "understanding", "--train-data",
                             str(tmp_path / "train" / "pairs.jsonl"), "--data", str(tmp_path / "val" / "pairs.jsonl"),
                             "--steps", "5", "--no-track")
    assert understanding.code == 0, understanding.err[-1500:]


def test_cappa_cached_generation_equals_uncached(trained_zoo) -> None:
    from vlframe.inference.trained import load_trained

    trained = load_trained(trained_zoo["cappa"])
    images = torch.randn(2, 3, 64, 64)
    tok = trained.tokenizer
    for settings in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}):
        cached = generate(trained.model, images, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          max_length=8, use_cache=True, **settings)
        plain = generate(trained.model, images, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         max_length=8, use_cache=False, **settings)
        assert torch.equal(cached.tokens, plain.tokens), settings
