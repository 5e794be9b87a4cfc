"""CoCa assembled from plugins: forward/backward, gradients, ablations, embeddings, objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from registry import BuildError, ConfigError, Registry
from vlframe import build_model, load_config, set_attention_backend
from vlframe.config import files as configfile

from conftest import CONFIGS
from numerics import assert_all_close, assert_close

torch.set_num_threads(2)


def batch(model, n: int = 4, length: int = 12, seed: int = 0):
    """Random images and captions with ragged lengths: BOS=1 ... EOS=2, then padding (0)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.image_encoder.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    text = torch.randint(3, cfg.vocab_size, (n, length), generator=g)
    lengths = torch.linspace(length, 4, n).long()
    for i, stop in enumerate(lengths):
        text[i, 0], text[i, stop - 1] = 1, 2
        text[i, stop:] = 0
    return images, text


def assert_every_parameter_learns(model, out) -> None:
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} received no gradient"
            assert param.grad.abs().sum() > 0, f"{name} received a zero gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


@pytest.fixture(scope="module")
def tiny(registry: Registry):
    torch.manual_seed(0)
    return build_model(CONFIGS / "coca_tiny.yaml", registry=registry)


def test_coca_tiny_forward_backward(tiny) -> None:
    images, text = batch(tiny)
    out = tiny(images, text, return_logits=True)
    assert set(out.losses) == {"caption", "contrastive"}
    assert all(torch.isfinite(loss) for loss in out.losses.values())
    torch.testing.assert_close(out.loss, 2.0 * out.losses["caption"] + 1.0 * out.losses["contrastive"])
    # At initialisation the caption loss is close to uniform over the vocabulary.
    assert abs(out.losses["caption"].item() - torch.log(torch.tensor(8192.0)).item()) < 0.5
    assert out.logits.shape == (4, 12, 8192)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 256)
    tiny.zero_grad()
    assert_every_parameter_learns(tiny, out)


def test_embeddings_are_normalised_and_ignore_padding(tiny) -> None:
    images, text = batch(tiny)
    with torch.no_grad():
        image_embeds = tiny.encode_image(images)
        padded = tiny.encode_text(text)
        # The same captions cut to their real length (no padding at all) embed identically.
        alone = [tiny.encode_text(row[row != 0][None]) for row in text]
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(padded.norm(dim=-1), torch.ones(4))
    assert_close(padded, torch.cat(alone))


def test_captioning_loss_ignores_padding(tiny) -> None:
    images, text = batch(tiny)
    with torch.no_grad():
        out = tiny(images, text, return_logits=True)
    targets, valid = text[:, 1:], text[:, 1:] != 0
    manual = F.cross_entropy(out.logits[:, :-1][valid], targets[valid])
    assert_close(out.losses["caption"], manual, depth="layer")


@pytest.mark.parametrize("chunk", [None, 7, 1024])
def test_chunked_caption_loss_matches_full_logits_in_value_and_gradient(chunk, registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS / "coca_tiny.yaml", [f"model.objectives.caption.chunk_tokens={json_null(chunk)}"],
                        registry=registry)
    images, text = batch(model)
    out = model(images, text, return_logits=True)
    targets, valid = text[:, 1:], text[:, 1:] != 0
    manual = F.cross_entropy(out.logits[:, :-1][valid], targets[valid])
    assert_close(out.losses["caption"], manual, depth="layer")
    grads = torch.autograd.grad(out.losses["caption"], [model.lm_head.proj.weight, model.caption_pooler.queries],
                                retain_graph=True)
    expected = torch.autograd.grad(manual, [model.lm_head.proj.weight, model.caption_pooler.queries])
    assert_all_close(dict(zip("wq", grads)), dict(zip("wq", expected)))


def json_null(value):
    return "null" if value is None else value


def test_attention_backends_give_the_same_losses(registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS / "coca_tiny.yaml", registry=registry)
    images, text = batch(model)
    with torch.no_grad():
        sdpa = model(images, text)
        math = set_attention_backend(model, "math")(images, text)
    for name in sdpa.losses:
        assert_close(sdpa.losses[name], math.losses[name], what=name)


def test_contrastive_only_has_no_multimodal_parameters(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml", [
        "model.multimodal_decoder=null", "model.caption_pooler=null", "model.lm_head=null",
        "model.objectives.caption=null", "model.pooler_arrangement=parallel",
    ], registry=registry)
    names = [name for name, _ in model.named_parameters()]
    assert not any(n.startswith(("multimodal_decoder", "lm_head", "caption_pooler")) for n in names)
    out = model(*batch(model))
    assert set(out.losses) == {"contrastive"} and out.logits is None
    assert_every_parameter_learns(model, out)


def test_captioning_only_has_no_contrastive_pooler_or_temperature(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml", [
        "model.contrastive_pooler=null", "model.image_projection=null", "model.text_projection=null",
        "model.objectives.contrastive=null",
    ], registry=registry)
    names = [name for name, _ in model.named_parameters()]
    assert not any("contrastive" in n or "temperature" in n or "projection" in n for n in names)
    assert model.text_decoder.cls_token is None  # no text embedding is needed
    out = model(*batch(model))
    assert set(out.losses) == {"caption"} and out.image_embeds is None
    assert_every_parameter_learns(model, out)
    with pytest.raises(RuntimeError, match="encode_image: this model has no contrastive_pooler"):
        model.encode_image(batch(model)[0])


# Shrink the Base-scale ablations so that each row runs a real step in a test.
SHRINK = {
    "model.vocab_size": 128, "model.embed_dim": 32, "model.context_length": 16,
    "model.image_encoder.image_size": 36, "model.image_encoder.width": 32, "model.image_encoder.layers": 1,
    "model.image_encoder.heads": 2, "model.image_encoder.mlp_dim": 64,
    "model.text_decoder.width": 32, "model.text_decoder.heads": 2, "model.text_decoder.mlp_dim": 64,
}
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_each_table8_ablation_trains_a_step(path: Path, registry: Registry) -> None:
    data = configfile.compose(path)
    model_cfg = data["model"]
    shrink = dict(SHRINK)
    if "multimodal_decoder" in model_cfg:
        shrink.update({"model.multimodal_decoder.width": 32, "model.multimodal_decoder.heads": 2,
                       "model.multimodal_decoder.mlp_dim": 64})
    for pooler in ("caption_pooler", "contrastive_pooler"):
        if model_cfg.get(pooler, {}).get("type") == "attentional":
            shrink[f"model.{pooler}.heads"] = 2
    torch.manual_seed(0)
    model = build_model(path, shrink, registry=registry)
    out = model(*batch(model, length=10))
    expected = load_config(path, registry=registry).model
    assert set(out.losses) == set(expected.objectives)
    for name, objective in expected.objectives.items():
        assert model.loss_weights[name] == objective.weight
    assert len(model.text_decoder.blocks) == expected.text_decoder.layers
    # What each row changes reaches the built model.
    for part in ("caption_pooler", "contrastive_pooler", "multimodal_decoder", "lm_head",
                 "image_projection", "text_projection"):
        assert (getattr(model, part) is None) == (getattr(expected, part) is None), part
    if expected.multimodal_decoder is not None:
        assert len(model.multimodal_decoder.blocks) == expected.multimodal_decoder.layers
    if expected.caption_pooler is not None and expected.caption_pooler.type == "attentional":
        assert model.caption_pooler.queries.shape[0] == expected.caption_pooler.n_query
    assert model.cascade == (expected.pooler_arrangement == "cascade")
    assert model.text_decoder.mode == (expected.text_decoder.embedding if expected.text_projection else None)
    assert_every_parameter_learns(model, out)


def test_shipped_objective_ablations_drop_their_parts(registry: Registry) -> None:
    names = {}
    for row in ("objectives_contrastive_only", "objectives_captioning_only"):
        model = build_model(CONFIGS / "ablations" / f"{row}.yaml", registry=registry, device="meta")
        names[row] = [name for name, _ in model.named_parameters()]
    assert not any(n.startswith(("multimodal_decoder.", "lm_head.", "caption_pooler."))
                   for n in names["objectives_contrastive_only"])
    assert "objectives.contrastive.log_inv_temperature" in names["objectives_contrastive_only"]
    assert not any(n.startswith(("contrastive_pooler.", "image_projection.", "text_projection.", "objectives."))
                   or n == "text_decoder.cls_token" for n in names["objectives_captioning_only"])
    assert any(n.startswith("multimodal_decoder.") for n in names["objectives_captioning_only"])


def test_ablation_rows_change_what_they_say(registry: Registry) -> None:
    def cfg(name):
        return load_config(CONFIGS / "ablations" / f"{name}.yaml", registry=registry).model

    assert (cfg("decoder_split_3_9").text_decoder.layers, cfg("decoder_split_3_9").multimodal_decoder.layers) == (3, 9)
    assert (cfg("decoder_split_9_3").text_decoder.layers, cfg("decoder_split_9_3").multimodal_decoder.layers) == (9, 3)
    assert cfg("pooler_parallel").pooler_arrangement == "parallel"
    assert cfg("n_query_0").caption_pooler.type == "none"
    assert [cfg(f"n_query_{n}").caption_pooler.n_query for n in (1, 32, 256)] == [1, 32, 256]
    assert cfg("loss_ratio_1_2").objectives["contrastive"].weight == 2.0
    assert cfg("text_embedding_mean").text_decoder.embedding == "mean"
    assert cfg("objectives_contrastive_only").multimodal_decoder is None
    assert cfg("objectives_captioning_only").contrastive_pooler is None


@pytest.mark.parametrize("arrangement, seen", [("parallel", 64), ("cascade", 16)])
def test_pooler_arrangement_decides_what_the_contrastive_pooler_reads(arrangement, seen, registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml", [
        f"model.pooler_arrangement={arrangement}", "model.caption_pooler.n_query=16",
    ], registry=registry)
    calls = []
    model.contrastive_pooler.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    images = batch(model)[0]
    model.encode_image(images)
    # parallel: the 64 image tokens; cascade: the caption pooler's 16 queries
    assert calls == [(4, seen, 256)]
    before = model.encode_image(images)
    with torch.no_grad():
        model.caption_pooler.queries.add_(1.0)
    changed = not torch.allclose(before, model.encode_image(images))
    assert changed == (arrangement == "cascade")


def test_later_tokens_and_padding_do_not_leak_into_earlier_positions(tiny) -> None:
    images, text = batch(tiny, n=2, length=12)
    text[:, 6:] = torch.randint(3, 8192, (2, 6))  # no padding: all 12 tokens are real
    mask = torch.ones_like(text, dtype=torch.bool)
    with torch.no_grad():
        base = tiny(images, text, mask, return_logits=True).logits
        changed = text.clone()
        changed[:, 8:] = torch.randint(3, 8192, (2, 4))
        # Causal: positions before 8 cannot see tokens 8..11.
        assert_close(tiny(images, changed, mask, return_logits=True).logits[:, :8], base[:, :8])
        # Padding: whatever sits in padded positions changes neither logits nor losses.
        pad_mask = mask.clone()
        pad_mask[:, 9:] = False
        a = tiny(images, text, pad_mask, return_logits=True)
        other_padding = torch.cat([text[:, :9], changed[:, 9:]], dim=1)
        b = tiny(images, other_padding, pad_mask, return_logits=True)
    assert_close(a.logits[:, :9], b.logits[:, :9])
    for name in a.losses:
        assert_close(a.losses[name], b.losses[name], what=name)


def test_cls_pooler_needs_a_class_token(registry: Registry) -> None:
    overrides = ["model.pooler_arrangement=parallel", "model.contrastive_pooler={type: cls}"]
    with pytest.raises(BuildError) as err:
        build_model(CONFIGS / "coca_tiny.yaml", overrides, registry=registry)
    assert str(err.value).startswith("model.contrastive_pooler (pooler 'cls' [poolers]): the cls pooler needs a class token")
    model = build_model(CONFIGS / "coca_tiny.yaml", [*overrides, "model.image_encoder.class_token=true"],
                        registry=registry)
    out = model(*batch(model))
    assert_every_parameter_learns(model, out)


def test_mean_text_embedding_and_mean_image_pooler(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca_tiny.yaml", [
        "model.text_decoder.embedding=mean", "model.contrastive_pooler={type: mean}",
    ], registry=registry)
    assert model.text_decoder.cls_token is None
    images, text = batch(model)
    out = model(images, text)
    assert_every_parameter_learns(model, out)
    with torch.no_grad():
        alone = torch.cat([model.encode_text(row[row != 0][None]) for row in text])
        assert_close(model.encode_text(text), alone)


def test_contrastive_temperature_starts_at_007_and_is_clamped(tiny) -> None:
    objective = tiny.objectives["contrastive"]
    torch.testing.assert_close(objective.temperature, torch.tensor(0.07))
    with torch.no_grad():
        objective.log_inv_temperature.fill_(10.0)
    torch.testing.assert_close(objective.temperature, torch.tensor(0.01))
    with torch.no_grad():
        objective.log_inv_temperature.fill_(torch.log(torch.tensor(1 / 0.07)).item())


def test_caption_loss_of_a_batch_without_targets_is_zero(tiny) -> None:
    images, text = batch(tiny, n=2, length=4)
    mask = torch.zeros_like(text, dtype=torch.bool)
    mask[:, 0] = True  # only a BOS: nothing to predict
    out = tiny(images, text, mask)
    assert out.losses["caption"].item() == 0.0
    assert torch.isfinite(out.loss)


def test_label_smoothing_changes_the_caption_loss(registry: Registry) -> None:
    torch.manual_seed(0)
    plain = build_model(CONFIGS / "coca_tiny.yaml", registry=registry)
    torch.manual_seed(0)
    smooth = build_model(CONFIGS / "coca_tiny.yaml", ["model.objectives.caption.label_smoothing=0.1"],
                         registry=registry)
    images, text = batch(plain)
    with torch.no_grad():
        a, b = plain(images, text, return_logits=True), smooth(images, text, return_logits=True)
    assert_close(a.logits, b.logits)
    assert not torch.isclose(a.losses["caption"], b.losses["caption"])


def test_heads_that_do_not_divide_the_width_name_the_part(registry: Registry) -> None:
    with pytest.raises(BuildError) as err:
        build_model(CONFIGS / "coca_tiny.yaml", ["model.caption_pooler.heads=3"], registry=registry)
    assert str(err.value) == "model.caption_pooler (pooler 'attentional' [poolers]): heads=3 does not divide width 256"


def test_sincos_patch_positions_are_fixed_rebuilt_and_left_out_of_the_weights(registry: Registry) -> None:
    from vlframe.testing import uninitialised

    sets = ["model.image_encoder.pos_embed=sincos"]
    model = build_model(CONFIGS / "coca_tiny.yaml", sets, registry=registry)
    learned = build_model(CONFIGS / "coca_tiny.yaml", registry=registry)
    encoder, grid = model.image_encoder, 128 // 16
    table = encoder.pos_embed[0]
    assert not any("image_encoder.pos_embed" in name for name, _ in model.named_parameters())
    assert "image_encoder.pos_embed" not in model.state_dict() and "image_encoder.pos_embed" in learned.state_dict()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(learned) - n(model) == grid * grid * 256
    # Row-major patches: the first quarter is sin(column * w) (0 on column 0), the third sin(row * w).
    assert table.shape == (grid * grid, 256) and torch.all(table[0, :64] == 0) and torch.all(table[0, 64:128] == 1)
    assert torch.equal(table[1, 128:], table[0, 128:]) and not torch.equal(table[grid, 128:], table[0, 128:])
    assert len({tuple(row.tolist()) for row in table}) == grid * grid  # every patch has a position of its own
    images, text = batch(model)
    assert_every_parameter_learns(model, model(images, text))
    # Built on the meta device (FSDP), the table comes back from reset_parameters(), equal.
    meta = build_model(CONFIGS / "coca_tiny.yaml", sets, registry=registry, device="meta")
    assert uninitialised(meta) == []
    assert torch.equal(meta.image_encoder.pos_embed, encoder.pos_embed)
    with pytest.raises(ConfigError, match=r"model\.image_encoder\.width: 254 is not a multiple of 4"):
        build_model(CONFIGS / "coca_tiny.yaml", [*sets, "model.image_encoder.width=254",
                                                 "model.image_encoder.heads=2"], registry=registry)
