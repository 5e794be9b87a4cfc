"""What backward recomputes is a choice (train.recompute) with a default per precision: every
choice gives the same losses and gradients, and the choice reaches the parts it names."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, run_main
from numerics import assert_all_close, assert_close
from registry import Registry
from test_model import batch
from training_configs import micro, sets
from vlframe import build_model
from vlframe.nn import recompute


def test_auto_takes_the_precision_default_and_names_are_checked() -> None:
    assert recompute.resolve("auto", "fp32") == recompute.DEFAULTS["fp32"]
    assert recompute.resolve("auto", "bf16") == recompute.DEFAULTS["bf16"]
    assert recompute.resolve("none", "fp32") == frozenset()
    assert recompute.resolve("all", "bf16") == frozenset(recompute.PARTS)
    assert recompute.resolve(["activation"], "fp32") == {"activation"}
    with pytest.raises(ValueError, match="unknown recompute part.*attention"):
        recompute.resolve(["attention"], "fp32")


def _grads(model, images, text, parts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with recompute.recompute(parts):
        out = model(images, text)
        out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("parts", [[], ["norm"], ["activation"], ["caption_logits"], list(recompute.PARTS)])
def test_every_choice_gives_the_losses_and_gradients_of_no_recomputation(parts, registry: Registry) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS / "coca_tiny.yaml", ["model.objectives.caption.chunk_tokens=7"], registry=registry)
    images, text = batch(model)
    loss, grads = _grads(model, images, text, [])
    got_loss, got = _grads(model, images, text, parts)
    assert_close(got_loss, loss)
    assert_all_close(got, grads)


def test_a_choice_reaches_the_recomputing_functions(registry: Registry) -> None:
    """The autograd graph shows what is recomputed: a recomputed linear is one custom Function,
    the caption chunks are checkpoints; with nothing recomputed neither appears."""
    torch.manual_seed(0)
    model = build_model(CONFIGS / "coca_tiny.yaml", ["model.objectives.caption.chunk_tokens=7"], registry=registry)
    images, text = batch(model)

    def nodes(parts) -> list[str]:
        with recompute.recompute(parts):
            loss = model(images, text).loss
        seen, stack = set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
        return [type(f).__name__ for f in seen]

    assert not any("Recomputed" in n for n in nodes([]))
    assert any("Recomputed" in n for n in nodes(["activation"]))
    assert any("Recomputed" in n for n in nodes(["norm"]))
    # The chunked caption loss is several cross-entropy pieces instead of one (beside the
    # contrastive loss's two, image->text and text->image).
    count = lambda parts: sum(1 for n in nodes(parts) if n.startswith("NllLoss"))  # noqa: E731
    assert count([]) == 3 and count(["caption_logits"]) > 4


def test_train_recompute_is_validated_and_trains(tmp_path) -> None:
    bad = run_main("train", str(CONFIGS / "coca_tiny.yaml"), *sets(micro(tmp_path, **{"train.recompute": ["everything"]})))
    assert bad.code == 2 and "train.recompute" in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    good = run_main("train", str(CONFIGS / "coca_tiny.yaml"),
                    *sets(micro(tmp_path, **{"train.recompute": "none", "train.steps": 2, "train.checkpoint_every": None})))
    assert good.code == 0, good.err[-2000:]
