"""open_clip's CoCa checkpoints in vlframe: the converted model computes what open_clip computes.

open_clip (a test dependency) builds its models here with random initialisation (nothing is
downloaded); every parameter is then perturbed, so that a LayerNorm or bias mapped to the wrong
place cannot hide behind its ones/zeros initial value. The checkpoint goes through the real path:
a file on disk, ``vlframe convert``, a vlframe checkpoint folder, ``load_trained``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from registry import Kind, Registry
from conftest import CONFIGS
from numerics import assert_close

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is a test dependency")
from open_clip.coca_model import CoCa as OpenClipCoCa  # noqa: E402
from open_clip.loss import CoCaLoss  # noqa: E402

from vlframe_builtins.importers.open_clip import ARCHITECTURES, vlframe_config  # noqa: E402
from vlframe.interchange.convert import ConversionError, convert_checkpoint, import_checkpoint  # noqa: E402
from vlframe.inference.generation import generate  # noqa: E402
from vlframe.inference.trained import load_trained  # noqa: E402

SOT, EOT = 49406, 49407

# A small open_clip CoCa: QuickGELU, a pooler whose key width differs from its query width
# (separate q/k/v weights in open_clip), 3-head ViT.
SMALL = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
}
# The same with the ViT as wide as the embedding: open_clip then packs the pooler's q/k/v.
PACKED = copy.deepcopy(SMALL)
PACKED["quick_gelu"] = False
PACKED["vision_cfg"].update(width=64, head_width=16)

TEXTS = [
    "a dog runs through the snow.",
    "two children play on the beach , one holds a red bucket and a small blue spade",
    "café naïve 日本語 🐶",
    "a",
]


def _open_clip_model(oc: dict, seed: int) -> OpenClipCoCa:
    torch.manual_seed(seed)
    model = OpenClipCoCa(oc["embed_dim"], oc["multimodal_cfg"], oc["text_cfg"], oc["vision_cfg"],
                         quick_gelu=oc.get("quick_gelu", False))
    # open_clip's MultimodalTransformer never initialises its LM head (its init_parameters is not
    # called, and would fail): it holds whatever torch.empty found in memory until weights load.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(1 / 0.05))  # within vlframe's clamp (temperature >= 0.01), like trained weights
            else:
                p.add_(torch.randn_like(p) * 0.05)
    assert all(p.abs().max() < 100 for p in model.parameters())
    return model.eval()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _convert(tmp_path: Path, oc: dict, name: str, registry: Registry, seed: int = 0):
    reference = _open_clip_model(oc, seed)
    weights = tmp_path / f"{name}.pt"
    torch.save(reference.state_dict(), weights)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(oc))
    out = convert_checkpoint("open-clip", spec, weights, tmp_path / name, registry=registry)
    return reference, load_trained(out, registry=registry)


def _greedy_open_clip(model: OpenClipCoCa, images: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with open_clip's own forward, recomputing the whole prefix at every step."""
    out = torch.full((images.shape[0], 1), SOT, dtype=torch.long)
    latent, embs = model._encode_image(images)
    for _ in range(steps):
        logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out[:, 1:]


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str, depth: str = "model") -> None:
    """Equal up to the rounding of two implementations of the same forward (tests/numerics.py)."""
    assert_close(ours, theirs, depth=depth, what=what)


def _check_equivalence(reference: OpenClipCoCa, trained, image_size: int, context: int, steps: int) -> None:
    model = trained.model
    images = _images(3, image_size)
    text = open_clip.tokenizer.tokenize(TEXTS[:3], context_length=context)
    with torch.no_grad():
        theirs = reference(images, text)
        ours = model(images, text, return_logits=True)
        _assert_same(model.encode_image(images), reference.encode_image(images), "image embeddings")
        _assert_same(model.encode_text(text), reference.encode_text(text), "text embeddings")
        _assert_same(ours.image_embeds, theirs["image_features"], "image embeddings (forward)")
        _assert_same(ours.text_embeds, theirs["text_features"], "text embeddings (forward)")
        # open_clip's logits are for text[:, :-1] (teacher forcing); every position is compared, padding too
        _assert_same(ours.logits[:, :-1], theirs["logits"], "caption logits")
        clip_loss, caption_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)(**theirs)
        _assert_same(ours.losses["contrastive"], clip_loss, "contrastive loss")
        _assert_same(ours.losses["caption"] * 2.0, caption_loss, "captioning loss x2")
        _assert_same(ours.loss, clip_loss + caption_loss, "total loss")
        expected = _greedy_open_clip(reference, images, steps)
        got = generate(model, images, bos_id=SOT, eos_id=EOT, pad_id=0, banned_ids=(), strategy="greedy",
                       max_length=steps).tokens[:, 0]
    for row in range(images.shape[0]):
        want = expected[row].tolist()
        want = want[: want.index(EOT) + 1] if EOT in want else want
        assert got[row, : len(want)].tolist() == want, f"greedy caption {row}"


@pytest.mark.parametrize("oc", [SMALL, PACKED], ids=["quick_gelu-split_qkv_pooler", "gelu-packed_qkv_pooler"])
def test_a_small_open_clip_coca_converts_exactly(oc: dict, tmp_path: Path, registry: Registry) -> None:
    reference, trained = _convert(tmp_path, oc, "small", registry)
    assert trained.config.model.context_length == 20 and trained.config.tokenizer.type == "clip_bpe"
    assert trained.config.model.image_encoder.activation == ("quick_gelu" if oc["quick_gelu"] else "gelu")
    _check_equivalence(reference, trained, image_size=32, context=20, steps=18)


@pytest.mark.slow
def test_coca_vit_b_32_converts_exactly(tmp_path: Path, registry: Registry) -> None:
    reference, trained = _convert(tmp_path, ARCHITECTURES["coca_ViT-B-32"], "b32", registry)
    _check_equivalence(reference, trained, image_size=224, context=76, steps=12)
    # the whole pipeline: vlframe's tokenizer and image transform give open_clip's inputs
    ids, mask = trained.tokenize(TEXTS)
    assert torch.equal(ids, open_clip.tokenizer.tokenize(TEXTS, context_length=76))
    with torch.no_grad():
        _assert_same(trained.embed_texts(TEXTS), reference.encode_text(ids), "text embeddings from strings")


def test_the_bundled_architectures_match_open_clips_configs_and_configs_folder(registry: Registry) -> None:
    for name, oc in ARCHITECTURES.items():
        assert oc == open_clip.get_model_config(name), name
        written = CONFIGS / "open_clip" / f"{name}.yaml"
        from vlframe.config import files as configfile

        config, _ = configfile.load(written, registry=registry)
        expected, _ = configfile.load(vlframe_config(oc, description=config.description), registry=registry)
        assert config.model == expected.model and config.tokenizer == expected.tokenizer, written


def test_the_legacy_mask_refuses_texts_not_padded_to_the_context(tmp_path: Path, registry: Registry) -> None:
    _, trained = _convert(tmp_path, SMALL, "small", registry)
    short = open_clip.tokenizer.tokenize(["a dog"], context_length=20)[:, :8]
    with pytest.raises(ValueError, match="needs texts padded to context_length 20, got 8 tokens"):
        trained.model.encode_text(short)


def test_the_image_transform_matches_open_clips(tmp_path: Path, registry: Registry) -> None:
    from PIL import Image

    reference, trained = _convert(tmp_path, SMALL, "small", registry)
    picture = Image.fromarray(torch.randint(0, 256, (45, 70, 3), generator=torch.Generator().manual_seed(1),
                                            dtype=torch.uint8).numpy())
    theirs = open_clip.image_transform(32, is_train=False)(picture)
    _assert_same(trained.load_images([picture])[0], theirs, "preprocessed image", depth="layer")


def test_missing_and_unexpected_keys_are_refused_with_their_names(tmp_path: Path, registry: Registry) -> None:
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SMALL))
    state = _open_clip_model(SMALL, 0).state_dict()
    del state["text_decoder.cross_attn.1.ln_1_kv.weight"], state["visual.attn_pool.ln_q.bias"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint("open-clip", spec, broken, tmp_path / "out", registry=registry)
    message = str(err.value)
    assert str(broken) in message
    assert "missing keys 2: text_decoder.cross_attn.1.ln_1_kv.weight, visual.attn_pool.ln_q.bias" in message
    assert "unexpected keys 1: visual.extra_head.weight" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    # a checkpoint of another architecture: the shapes say so
    coarser = copy.deepcopy(SMALL)
    coarser["vision_cfg"]["patch_size"] = 16
    other = tmp_path / "patch16.pt"
    torch.save(_open_clip_model(coarser, 0).state_dict(), other)
    with pytest.raises(ConversionError, match=r"shapes differ \(image_encoder.patch_embed.weight: checkpoint "
                                              r"\(96, 3, 16, 16\), model \(96, 3, 8, 8\)"):
        import_checkpoint("open-clip", spec, other, registry=registry)
    # a training checkpoint ({"state_dict": ...} with DDP's module. prefix) converts as well
    wrapped = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in _open_clip_model(SMALL, 0).state_dict().items()}},
               wrapped)
    model, _, source = import_checkpoint("open-clip", spec, wrapped, registry=registry)
    assert source["checkpoint"] == str(wrapped.resolve()) and not model.training


def test_unsupported_open_clip_settings_are_named(tmp_path: Path, registry: Registry) -> None:
    spec = tmp_path / "odd.json"
    odd = copy.deepcopy(SMALL)
    odd["vision_cfg"]["attentional_pool"] = "parallel"
    odd["text_cfg"]["hf_model_name"] = "roberta-base"
    spec.write_text(json.dumps(odd))
    with pytest.raises(ConversionError, match=r"vision_cfg.attentional_pool: 'parallel'.*text_cfg.hf_model_name"):
        import_checkpoint("open-clip", spec, tmp_path / "none.pt", registry=registry)
    # a hub repository's open_clip_config.json wraps the model config
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": SMALL, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}))
    assert registry.catalog.build(Kind.IMPORTER, registry.catalog.get(Kind.IMPORTER, "open-clip").spec.config(
        type="open-clip")).config(wrapped)["model"]["embed_dim"] == 64
    with pytest.raises(ConversionError, match="unknown open_clip CoCa architecture 'coca_ViT-H-14'"):
        import_checkpoint("open-clip", "coca_ViT-H-14", tmp_path / "none.pt", registry=registry)


@pytest.mark.slow
def test_a_converted_model_fine_tunes_with_vlframe_train_and_is_tracked(tmp_path: Path, registry: Registry) -> None:
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from conftest import run_main as run_cli  # the vlframe command, in this process

    _, trained = _convert(tmp_path, SMALL, "small", registry)
    start = load_file(str(trained.checkpoint / "model.safetensors"))
    converted = tmp_path / "small"
    sets = {"train.init_from": str(converted), "data.train": {"type": "synthetic", "size": 64, "image_size": 48},
            "data.num_workers": 0, "train.steps": 3, "train.batch_size": 8, "train.lr": 1e-5, "train.log_every": 1,
            "train.precision": "fp32", "train.output_dir": str(tmp_path / "runs")}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    result = run_cli("train", str(converted / "config.yaml"), "--run-dir", str(tmp_path / "runs" / "ft"), *args)
    assert result.code == 0, result.out + result.err
    assert f"initialised from {converted}" in result.out + result.err
    tuned = load_file(str(tmp_path / "runs" / "ft" / "checkpoints" / "step_000003" / "model.safetensors"))
    moved = max((tuned[k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 1e-3  # 3 small steps away from the converted weights, not from a fresh initialisation
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("vlframe").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.init_from"] == str(converted)
    assert len(client.get_metric_history(run.info.run_id, "train/loss_caption")) == 3


@pytest.mark.slow
def test_convert_then_caption_and_embed_from_the_command_line(tmp_path: Path) -> None:
    from PIL import Image

    from conftest import run_main as run_cli  # the vlframe command, in this process

    weights, spec = tmp_path / "open_clip_model.pt", tmp_path / "small.json"
    torch.save(_open_clip_model(SMALL, 0).state_dict(), weights)
    spec.write_text(json.dumps(SMALL))
    out = tmp_path / "converted"
    result = run_cli("convert", "open-clip", "--model", str(spec), "--checkpoint", str(weights), "--out", str(out))
    assert result.code == 0, result.err
    assert f"wrote {out}" in result.out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "state.json", "state.safetensors", "tokenizer.model"]
    picture = tmp_path / "street.png"
    Image.fromarray(torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy()).save(picture)
    result = run_cli("caption", str(out), str(picture), "--json", "--max-length", "6")
    assert result.code == 0, result.err
    captions = json.loads(result.out)["captions"]
    assert len(captions) == 1 and isinstance(captions[0], str)
    result = run_cli("embed", str(out), "--images", str(picture), "--out", str(tmp_path / "e.safetensors"))
    assert result.code == 0, result.err
    # a second conversion replaces the first (here with the vocabulary from a path, not the package);
    # a folder that is not a checkpoint is never overwritten
    vocab = tmp_path / "vocab.gz"
    vocab.write_bytes((out / "tokenizer.model").read_bytes())
    result = run_cli("convert", "open-clip", "--model", str(spec), "--checkpoint", str(weights), "--out", str(out),
                     "--set", f"tokenizer.path={vocab}")
    assert result.code == 0, result.err
    assert f"path: {vocab}" in (out / "config.yaml").read_text()
    result = run_cli("convert", "open-clip", "--model", str(spec), "--checkpoint", str(weights), "--out", str(tmp_path))
    assert result.code == 2 and "exists and is not an earlier conversion" in result.err
    # nor is a training checkpoint, and resuming from a conversion points to init_from
    (tmp_path / "ckpt").mkdir()
    torch.save({"step": 3, "optimizer": {}}, tmp_path / "ckpt" / "state.pt")
    result = run_cli("convert", "open-clip", "--model", str(spec), "--checkpoint", str(weights),
                     "--out", str(tmp_path / "ckpt"))
    assert result.code == 2 and (tmp_path / "ckpt" / "state.pt").is_file()
    result = run_cli("train", str(out / "config.yaml"), "--resume", str(out), "--set",
                     'data.train={"type": "synthetic", "size": 8}', "--set", "tracking.enabled=false")
    assert result.code == 2 and f"use --set train.init_from={out}" in result.err
    result = run_cli("convert", "open-clip", "--model", "coca_ViT-B-32", "--checkpoint", str(tmp_path / "nope.pt"),
                     "--out", str(tmp_path / "x"))
    assert result.code == 2 and f"{tmp_path / 'nope.pt'}: no such file" in result.err


def test_coca_vit_l_14_maps_every_weight_to_its_vlframe_shape(registry: Registry) -> None:
    """The large architecture, on the meta device (no memory): every key and shape lines up."""
    from vlframe.api import build_model

    oc = ARCHITECTURES["coca_ViT-L-14"]
    with torch.device("meta"):
        reference = OpenClipCoCa(oc["embed_dim"], oc["multimodal_cfg"], oc["text_cfg"], oc["vision_cfg"])
    from vlframe_builtins.importers.open_clip import convert_weights

    converted = convert_weights(reference.state_dict(), oc)
    model = build_model(CONFIGS / "open_clip" / "coca_ViT-L-14.yaml", registry=registry, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


@pytest.mark.slow
def test_an_ablation_starts_from_the_weights_that_fit(tmp_path: Path, registry: Registry) -> None:
    """Captioning-only from open_clip's weights: strict loading refuses, init_strict: false takes what fits."""
    from conftest import run_main as run_cli  # the vlframe command, in this process

    _convert(tmp_path, SMALL, "small", registry)
    converted = tmp_path / "small"
    sets = {"train.init_from": str(converted), "data.train": {"type": "synthetic", "size": 32, "image_size": 48},
            "data.num_workers": 0, "train.steps": 1, "train.batch_size": 4, "train.precision": "fp32",
            "train.output_dir": str(tmp_path / "runs"), "tracking.enabled": False,
            "model.contrastive_pooler": None, "model.image_projection": None, "model.text_projection": None,
            "model.objectives.contrastive": None}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    strict = run_cli("train", str(converted / "config.yaml"), *args)
    assert strict.code == 2 and "train.init_from" in strict.err and "init_strict" in strict.err
    assert "objectives.contrastive.log_inv_temperature" in strict.err
    loose = run_cli("train", str(converted / "config.yaml"), *args, "--set", "train.init_strict=false")
    assert loose.code == 0, loose.err
    assert (f"initialised from {converted}: 0 tensors of the model start fresh, 6 of the checkpoint unused "
            "(image_projection.weight, objectives.contrastive.log_inv_temperature, text_decoder.cls_token, "
            "text_decoder.norm.bias, text_decoder.norm.weight, text_projection.weight)") in loose.err
