"""Caption generation: the cache changes nothing, and each decoding rule does what it says.

Two kinds of model: coca_tiny itself (random weights, its LM head sharpened so that the choices
are not near-ties), for cache equivalence; and a scripted captioner whose next-token scores are
a fixed function of the prefix, for rules whose right answer must be known exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from numerics import assert_close
from registry import Registry
from vlframe import build_model
from vlframe.inference.generation import GenerationConfig, generate
from vlframe.nn import KVCache

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def tiny(registry: Registry):
    torch.manual_seed(0)
    model = build_model(CONFIGS / "coca_tiny.yaml", registry=registry).eval()
    with torch.no_grad():
        model.lm_head.proj.weight.mul_(30.0)  # sharp, varied next-token distributions
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("settings", [
    {"strategy": "greedy"},
    {"strategy": "beam", "num_beams": 3, "num_return_sequences": 2},
    {"strategy": "sample", "top_k": 40, "top_p": 0.9, "temperature": 0.8, "repetition_penalty": 1.3,
     "num_return_sequences": 2, "seed": 3},
], ids=lambda s: s["strategy"])
def test_cached_generation_yields_exactly_the_tokens_of_uncached(tiny, images, settings) -> None:
    cached = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, **settings)
    plain = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, use_cache=False, **settings)
    assert torch.equal(cached.tokens, plain.tokens)
    assert_close(cached.scores, plain.scores, depth="model")
    n = settings.get("num_return_sequences", 1)
    assert cached.tokens.shape[:2] == (3, n)


def test_cached_logits_equal_full_prefix_logits_for_a_longer_prompt(tiny, images) -> None:
    prompt = torch.tensor([[BOS, 17, 33, 90, 5]] * 3)
    with torch.no_grad():
        context = tiny.caption_context(images)
        full = tiny.caption_logits(prompt, context)
        cache = KVCache()
        first = tiny.caption_logits(prompt[:, :3], context, cache)  # a prompt of several tokens at once
        rest = [tiny.caption_logits(prompt[:, i : i + 1], context, cache) for i in (3, 4)]
    assert_close(torch.cat([first, *rest], dim=1), full)
    assert cache.offset == 5


def test_beam_width_one_equals_greedy(tiny, images) -> None:
    greedy = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=15)
    beam = generate(tiny, images, strategy="beam", num_beams=1, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=15)
    assert torch.equal(greedy.tokens, beam.tokens)


def test_fixed_length_and_sampling_limits_on_the_real_model(tiny, images) -> None:
    out = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, min_length=9, max_length=9)
    assert out.tokens.shape[-1] == 9 and not (out.tokens == EOS).any()  # exactly 9 tokens, never EOS
    greedy = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=10)
    top1 = generate(tiny, images, strategy="sample", top_k=1, seed=0, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=10)
    nucleus = generate(tiny, images, strategy="sample", top_p=1e-6, seed=0, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                       max_length=10)
    assert torch.equal(top1.tokens, greedy.tokens) and torch.equal(nucleus.tokens, greedy.tokens)
    # Training predicts tokens 1..31 of a 32-token context: after BOS, at most 31 tokens by default.
    default = generate(tiny, images[:1], bos_id=BOS, eos_id=EOS, pad_id=PAD, min_length=31)
    assert default.tokens.shape[-1] == 31
    for too_long in (32, 40):
        with pytest.raises(ValueError, match="exceeds the model's context_length 32"):
            generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=too_long)


class Scripted:
    """A captioner whose log-probabilities come from ``table[last token]`` (a ``(V, V)`` tensor).

    With several tables, image ``i`` uses the table its pixel value ``images[i, 0, 0, 0]`` names,
    so different images can finish at different steps.
    """

    def __init__(self, *tables: torch.Tensor) -> None:
        self.tables = torch.stack([t.log_softmax(dim=-1) for t in tables])
        self.table = self.tables[0]

    def caption_context(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1, :1, 0]  # (B, 1, 1): which table

    def caption_logits(self, tokens, context, cache=None):
        if cache is not None:
            cache.offset += tokens.shape[1]
        return self.tables[context[:, 0, 0].long()[:, None], tokens]


def _table(vocab: int, prefer: dict[int, dict[int, float]]) -> torch.Tensor:
    table = torch.full((vocab, vocab), -9.0)
    for last, choices in prefer.items():
        for token, p in choices.items():
            table[last, token] = torch.tensor(p).log()
    return table


def test_eos_ends_a_caption_and_padding_follows() -> None:
    short = _table(6, {BOS: {3: 0.9}, 3: {EOS: 0.9}, EOS: {4: 0.9}, 4: {4: 0.9}})
    longer = _table(6, {BOS: {3: 0.9}, 3: {4: 0.9}, 4: {5: 0.9}, 5: {EOS: 0.9}, EOS: {4: 0.9}})
    images = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 3, 4, 4)  # tables 0, 1, 0
    model = Scripted(short, longer)
    for strategy in ("greedy", "beam"):
        out = generate(model, images, strategy=strategy, num_beams=2, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=6)
        assert out.tokens[:, 0].tolist() == [[3, EOS, PAD, PAD], [3, 4, 5, EOS], [3, EOS, PAD, PAD]], strategy


def test_min_length_holds_eos_back_and_max_length_cuts() -> None:
    eager_to_end = Scripted(_table(6, {BOS: {EOS: 0.9, 3: 0.05}, 3: {EOS: 0.9, 4: 0.05}, 4: {EOS: 0.9, 3: 0.05}}))
    for strategy in ("greedy", "beam", "sample"):
        extra = {"seed": 0} if strategy == "sample" else {}
        out = generate(eager_to_end, torch.zeros(1, 3, 4, 4), strategy=strategy, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                       min_length=4, max_length=8, **extra)
        row = out.tokens[0, 0].tolist()
        assert row.index(EOS) == 4, (strategy, row)  # four tokens, then EOS at once
    never_ends = Scripted(_table(6, {BOS: {3: 0.9}, 3: {4: 0.9}, 4: {3: 0.9}}))
    out = generate(never_ends, torch.zeros(1, 3, 4, 4), bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=5)
    assert out.tokens[0, 0].tolist() == [3, 4, 3, 4, 3]


def test_length_penalty_decides_between_short_and_long_hypotheses() -> None:
    # [EOS] at once: log 0.5 = -0.69. [3, 4, EOS]: log(0.45 * 0.9 * 0.9) = -1.01, or -0.34 per token.
    # (The second live beam, 5 5 5 ..., never ends.)
    model = Scripted(_table(6, {BOS: {EOS: 0.5, 3: 0.45, 5: 0.04}, 3: {4: 0.9}, 4: {EOS: 0.9}, 5: {5: 0.9}}))
    images = torch.zeros(1, 3, 4, 4)
    common = {"strategy": "beam", "num_beams": 2, "num_return_sequences": 2, "bos_id": BOS, "eos_id": EOS,
              "pad_id": PAD, "max_length": 6}
    plain = generate(model, images, length_penalty=0.0, **common)
    per_token = generate(model, images, length_penalty=1.0, **common)
    assert plain.tokens[0].tolist() == [[EOS, PAD, PAD], [3, 4, EOS]]
    assert per_token.tokens[0].tolist() == [[3, 4, EOS], [EOS, PAD, PAD]]
    torch.testing.assert_close(per_token.scores[0, 0] * 3, plain.scores[0, 1])


def test_beam_search_stops_at_max_length_with_the_live_beams() -> None:
    never_ends = Scripted(_table(6, {BOS: {3: 0.6, 4: 0.4}, 3: {4: 0.9}, 4: {3: 0.9}}))
    out = generate(never_ends, torch.zeros(1, 3, 4, 4), strategy="beam", num_beams=2, num_return_sequences=2,
                   bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=5, length_penalty=0.0)
    assert out.tokens[0].tolist() == [[3, 4, 3, 4, 3], [4, 3, 4, 3, 4]]


def test_beam_search_finds_the_likelier_caption_that_greedy_misses() -> None:
    # Greedy takes 3 (0.6) and is then stuck with 0.3 at best; 4 (0.4) leads to 0.95: 0.38 > 0.18.
    model = Scripted(_table(8, {BOS: {3: 0.6, 4: 0.4}, 3: {5: 0.3, 6: 0.3, 7: 0.3}, 4: {5: 0.95},
                                5: {EOS: 0.99}, 6: {EOS: 0.99}, 7: {EOS: 0.99}}))
    images = torch.zeros(1, 3, 4, 4)
    greedy = generate(model, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=5)
    beam = generate(model, images, strategy="beam", num_beams=2, num_return_sequences=2, bos_id=BOS, eos_id=EOS,
                    pad_id=PAD, max_length=5, length_penalty=0.0)
    assert greedy.tokens[0, 0].tolist()[:2] == [3, 5]
    assert beam.tokens[0, 0].tolist() == [4, 5, EOS]
    assert beam.scores[0, 0] > beam.scores[0, 1]  # n-best, best first
    # Scores are log-probabilities once the banned tokens (PAD, BOS) are ruled out; length_penalty
    # 0 leaves their plain sum.
    allowed = model.table.index_fill(1, torch.tensor([PAD, BOS]), float("-inf")).log_softmax(dim=-1)
    torch.testing.assert_close(beam.scores[0, 0], allowed[BOS, 4] + allowed[4, 5] + allowed[5, EOS])


def test_repetition_penalty_discourages_repeats() -> None:
    model = Scripted(_table(8, {BOS: {3: 0.5, 4: 0.3}, 3: {3: 0.5, 4: 0.3, 5: 0.1}, 4: {3: 0.5, 4: 0.3, 5: 0.1},
                                5: {3: 0.5, 4: 0.3, 5: 0.1}}))
    images = torch.zeros(1, 3, 4, 4)
    plain = generate(model, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4).tokens[0, 0].tolist()
    penalised = generate(model, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4,
                         repetition_penalty=3.0).tokens[0, 0].tolist()
    assert plain == [3, 3, 3, 3]
    assert len(set(penalised)) > 1 and penalised[0] == 3


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_ngram_blocking_never_repeats_an_ngram(strategy) -> None:
    # The likeliest path loops 3 4 5 3 4 5 ...; blocking bigrams must leave that loop.
    model = Scripted(_table(9, {BOS: {3: 0.6, 6: 0.2}, 3: {4: 0.6, 7: 0.2}, 4: {5: 0.6, 8: 0.2},
                                5: {3: 0.6, 6: 0.2}, 6: {3: 0.5, 7: 0.3}, 7: {4: 0.5, 8: 0.3},
                                8: {5: 0.5, 6: 0.3}}))
    images = torch.zeros(1, 3, 4, 4)
    settings = {"strategy": strategy, "num_beams": 3} if strategy == "beam" else {}
    loop = generate(model, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=9, **settings).tokens[0, 0].tolist()
    assert len(set(_ngrams(loop, 2))) < len(_ngrams(loop, 2))  # it repeats without blocking
    for n in (2, 3):
        out = generate(model, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=9, no_repeat_ngram_size=n,
                       **settings).tokens[0, 0].tolist()
        ids = [t for t in out if t not in (PAD, EOS)]
        assert len(set(_ngrams(ids, n))) == len(_ngrams(ids, n)), (n, out)
        assert ids[:n - 1] == loop[:n - 1]  # nothing changes before a repeat is possible


def test_ngram_blocking_cached_equals_uncached(tiny, images) -> None:
    settings = {"strategy": "greedy", "no_repeat_ngram_size": 2}
    cached = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, **settings)
    plain = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, use_cache=False, **settings)
    assert torch.equal(cached.tokens, plain.tokens)


def test_banned_tokens_are_never_generated() -> None:
    model = Scripted(_table(6, {BOS: {PAD: 0.5, BOS: 0.3, 3: 0.1}, 3: {EOS: 0.9}}))
    out = generate(model, torch.zeros(1, 3, 4, 4), bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4)
    assert out.tokens[0, 0].tolist() == [3, EOS]


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "greedy", "num_return_sequences": 2}, "greedy decoding returns one caption"),
    ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "num_return_sequences 3 exceeds num_beams 2"),
    ({"min_length": 9, "max_length": 4}, "min_length 9 exceeds max_length 4"),
    ({"top_p": 1.5}, "top_p"),
    ({"strategy": "nucleus"}, "strategy"),
])
def test_generation_settings_are_validated(settings, message) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationConfig(**settings)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_ids_beyond_the_tokenizers_vocabulary_are_never_generated(tiny, images, strategy) -> None:
    # The model's vocabulary (8192) is an upper bound of its tokenizer's: a tokenizer trained on a
    # small corpus has fewer pieces, and decoding an id it does not have would fail.
    settings = {"greedy": {}, "beam": {"num_beams": 3}, "sample": {"seed": 0, "temperature": 3.0}}[strategy]
    free = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, strategy=strategy, **settings)
    assert (free.tokens >= 100).any()  # without a limit the random model does reach them
    limited = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, strategy=strategy,
                       vocab_size=100, **settings)
    assert (limited.tokens < 100).all()


def test_captioning_commands_default_to_blocked_beam_search_and_plain_greedy_stays_available() -> None:
    from vlframe.cli import parser as build_parser
    from vlframe.commands.base import generation_config as _generation_config
    from vlframe_builtins.tasks.caption import CaptionTaskConfig

    plain = GenerationConfig()  # generate() itself decodes plainly
    assert (plain.strategy, plain.no_repeat_ngram_size) == ("greedy", 0)
    default = GenerationConfig.for_captions()
    assert (default.strategy, default.num_beams, default.no_repeat_ngram_size) == ("beam", 4, 2)
    assert CaptionTaskConfig(type="caption").generation == default
    # A partial generation block (e.g. from eval's --strategy flag) keeps the other captioning defaults...
    greedy = CaptionTaskConfig(type="caption", generation={"strategy": "greedy"}).generation
    assert (greedy.strategy, greedy.no_repeat_ngram_size) == ("greedy", 2)
    # ...and the plain greedy of the reference protocol is two settings away.
    plain_task = CaptionTaskConfig(type="caption", generation={"strategy": "greedy", "no_repeat_ngram_size": 0})
    assert (plain_task.generation.strategy, plain_task.generation.no_repeat_ngram_size) == ("greedy", 0)
    args = build_parser().parse_args(["caption", "RUN", "x.jpg"])
    assert _generation_config(args) == default
    args = build_parser().parse_args(["caption", "RUN", "x.jpg", "--strategy", "greedy", "--no-repeat-ngram-size", "0"])
    assert (_generation_config(args).strategy, _generation_config(args).no_repeat_ngram_size) == ("greedy", 0)


@pytest.mark.parametrize("settings", [
    {"strategy": "greedy"},
    {"strategy": "beam", "num_beams": 3, "num_return_sequences": 2},
    {"strategy": "sample", "top_k": 40, "num_return_sequences": 2, "seed": 3},
], ids=lambda s: s["strategy"])
def test_a_static_cache_yields_the_tokens_of_the_growing_one(tiny, images, settings, monkeypatch) -> None:
    """The static layout (compile's) decoded eagerly: the same tokens and scores."""
    import vlframe.inference.generation as generation

    monkeypatch.setattr(generation, "_compiled_step", lambda model: model.caption_logits)
    static = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, compile=True, **settings)
    growing = generate(tiny, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=12, **settings)
    assert torch.equal(static.tokens, growing.tokens)
    assert_close(static.scores, growing.scores)


@pytest.mark.slow
def test_a_compiled_decode_step_yields_the_tokens_of_eager_decoding(registry: Registry) -> None:
    torch.manual_seed(0)
    small = build_model(CONFIGS / "coca_tiny.yaml", ["model.text_decoder.layers=1", "model.multimodal_decoder.layers=1",
                                                      "model.image_encoder.layers=1"], registry=registry).eval()
    with torch.no_grad():
        small.lm_head.proj.weight.mul_(30.0)
    pictures = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    compiled = generate(small, pictures, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=8, compile=True)
    eager = generate(small, pictures, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=8)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert_close(compiled.scores, eager.scores)
