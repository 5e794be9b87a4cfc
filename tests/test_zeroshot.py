"""Zero-shot classification: prompt-ensemble classifier, cosine logits and top-k accuracy."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from numerics import assert_close

from vlframe.evaluation.metrics import topk_accuracy
from vlframe.evaluation.zeroshot import PROMPT_TEMPLATES, classify, zero_shot_classifier


def hashed_encoder(dim: int = 16):
    """A fake text tower: a deterministic, unnormalised vector per string; records its calls."""
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        rows = []
        for text in prompts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            rows.append(torch.randn(dim, generator=gen) * (1 + len(text)))
        return torch.stack(rows)

    return encode, calls


def test_templates_are_a_short_ensemble_with_a_slot() -> None:
    assert 8 <= len(PROMPT_TEMPLATES) <= 12 and len(set(PROMPT_TEMPLATES)) == len(PROMPT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)
    assert "a photo of a {}." in PROMPT_TEMPLATES


def test_topk_accuracy_on_one_hot_classes_with_known_answers() -> None:
    classifier = torch.eye(6) * 3.0  # unnormalised on purpose: classify normalises
    e = torch.eye(6)
    images = torch.stack([
        e[0] + 0.1 * e[1],                                            # label 0: right at top-1
        e[2] + 0.5 * e[1],                                            # label 1: second (wrong at top-1)
        e[0] + 0.9 * e[1] + 0.8 * e[2] + 0.7 * e[4] + 0.6 * e[5] + 0.1 * e[3],  # label 3: last of 6
        5.0 * e[5],                                                   # label 5: right at top-1
    ])
    labels = torch.tensor([0, 1, 3, 5])
    logits = classify(images, classifier)
    assert logits.shape == (4, 6)
    assert torch.allclose(logits[3], e[5])  # cosine similarity, whatever the norms
    assert torch.allclose(logits[0], F.normalize(e[0] + 0.1 * e[1], dim=0))
    assert topk_accuracy(logits, labels) == {"top1": 0.5, "top5": 0.75}
    assert topk_accuracy(logits, labels, ks=(1, 2, 6)) == {"top1": 0.5, "top2": 0.75, "top6": 1.0}
    # k above the number of classes is clamped to it: every label is then found
    assert topk_accuracy(logits, labels, ks=(10,)) == {"top10": 1.0}
    three = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.0, 0.4, 0.6]])
    assert topk_accuracy(three, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 5)) == {"top1": 0.75, "top2": 0.75, "top5": 1.0}


def test_topk_accuracy_rejects_bad_input() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="2 rows of logits but 3 labels"):
        topk_accuracy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        topk_accuracy(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="k must be at least 1"):
        topk_accuracy(logits, torch.tensor([0, 1]), ks=(0,))


def test_template_ensemble_normalises_then_averages_then_renormalises() -> None:
    vectors = {
        "a cat.": [3.0, 4.0, 0.0],   # unit: (0.6, 0.8, 0)
        "the cat!": [0.0, 0.0, 2.0],  # unit: (0, 0, 1)
        "a dog.": [0.0, 1.0, 0.0],
        "the dog!": [0.0, 5.0, 0.0],
    }
    calls = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(prompts)
        return torch.tensor([vectors[p] for p in prompts])

    weights = zero_shot_classifier(encode, ["cat", "dog"], ["a {}.", "the {}!"])
    assert calls == [["a cat.", "the cat!", "a dog.", "the dog!"]]  # one batched call, class by class
    # by hand: mean of units (0.3, 0.4, 0.5), norm sqrt(0.5)
    s = math.sqrt(0.5)
    expected = torch.tensor([[0.3 / s, 0.4 / s, 0.5 / s], [0.0, 1.0, 0.0]])
    assert weights.dtype == torch.float32 and torch.allclose(weights, expected)
    # averaging the raw vectors instead would give (1.5, 2, 1)/|.|: a different answer
    assert not torch.allclose(weights[0], F.normalize(torch.tensor([1.5, 2.0, 1.0]), dim=0), atol=1e-2)


def test_batching_does_not_change_the_classifier() -> None:
    names = [f"class {i}" for i in range(37)]
    encode, calls = hashed_encoder()
    whole = zero_shot_classifier(encode, names, batch_size=10_000)
    assert len(calls) == 1 and len(calls[0]) == 37 * len(PROMPT_TEMPLATES)
    calls.clear()
    default = zero_shot_classifier(encode, names)
    per_call = 256 // len(PROMPT_TEMPLATES)
    assert len(calls) == math.ceil(37 / per_call)
    assert all(len(c) <= 256 and len(c) % len(PROMPT_TEMPLATES) == 0 for c in calls)
    calls.clear()
    one_class = zero_shot_classifier(encode, names, batch_size=1)  # below one class: one class per call
    assert len(calls) == 37 and all(len(c) == len(PROMPT_TEMPLATES) for c in calls)
    assert whole.shape == (37, 16)
    assert torch.allclose(whole.norm(dim=1), torch.ones(37))
    assert_close(default, whole, depth="layer")
    assert_close(one_class, whole, depth="layer")
    # each row is this class's own ensemble, whatever its neighbours in the batch
    alone = zero_shot_classifier(encode, [names[20]])
    assert_close(alone[0], whole[20], depth="layer")


def test_classifier_end_to_end_and_errors() -> None:
    encode, _ = hashed_encoder()
    names = ["tench", "chain saw", "church", "parachute"]
    weights = zero_shot_classifier(encode, names, ["a photo of a {}.", "itap of a {}."])
    images = 2.0 * weights[[3, 0, 2, 1, 1]] + 0.05 * torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    assert topk_accuracy(classify(images, weights), torch.tensor([3, 0, 2, 1, 1])) == {"top1": 1.0, "top5": 1.0}
    with pytest.raises(ValueError, match="without '{}'"):
        zero_shot_classifier(encode, names, ["a photo."])
    with pytest.raises(ValueError, match="no class names"):
        zero_shot_classifier(encode, [])
    with pytest.raises(ValueError, match=r"returned shape \(1, 16\) for 2 prompts"):
        zero_shot_classifier(lambda prompts: encode(prompts[:1]), ["x"], ["a {}", "b {}"])
