"""Caption generation: greedy decoding, beam search and sampling, over a key/value cache.

Works with any model with the captioning capability (:class:`registry.protocols.CaptioningModel`):
``caption_context(images)`` (the image side, run once per image) and ``caption_logits(tokens,
context, cache)`` (next-token logits; with a :class:`~vlframe.nn.KVCache` only the new tokens are
fed), and ``context_length``. With the cache a step costs one
token's worth of decoder work instead of the whole prefix, and the cross-attention keys and
values of the image context are projected once.
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from registry import ConfigModel
from registry.protocols import CaptioningModel as Captioner
from vlframe.nn.cache import KVCache


class GenerationConfig(ConfigModel):
    """How captions are decoded. Lengths count generated tokens, not the prompt."""

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    max_length: int | None = Field(
        None, gt=0, description="Most tokens generated after the prompt, EOS included; default: as many as the "
        "model was trained to predict (its context length less the prompt).")
    min_length: int = Field(0, ge=0, description="Tokens a caption has at least before its EOS.")
    num_beams: int = Field(4, gt=0, description="beam: hypotheses kept at every step.")
    length_penalty: float = Field(
        1.0, description="beam: a finished hypothesis scores sum(log p) / length**length_penalty.")
    num_return_sequences: int = Field(1, gt=0, description="Captions per image (beam: the n best).")
    temperature: float = Field(1.0, gt=0, description="sample: logits are divided by it.")
    top_k: int | None = Field(None, gt=0, description="sample: draw only from the k likeliest tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="sample: from the smallest set with this much mass.")
    repetition_penalty: float = Field(
        1.0, gt=0, description="> 1 discourages tokens already generated (positive logits divided, negative multiplied).")
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="n > 0: never generate a token that would repeat an n-gram already in the caption "
        "(n-gram blocking: stops the 'a man in a red shirt and a woman in a red shirt' loop; measured on Flickr8k, "
        "README); 0: off, plain greedy/beam/sampling.")
    use_cache: bool = Field(True, description="Keep keys/values between steps (false recomputes the prefix).")
    compile: bool = Field(
        False, description="Compile the decode step (torch.compile over a static key/value cache): the first "
        "captions of a process wait for the compilation (about 10 s on a 2-core CPU), every step after runs as one "
        "compiled graph. Measured on a CPU it is not faster than eager (benchmarks/generate.py); off by default.")
    seed: int | None = Field(None, description="sample: seed of the random draws.")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationConfig:
        if self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise ValueError("greedy decoding returns one caption per image (use beam or sample for more)")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences {self.num_return_sequences} exceeds num_beams {self.num_beams}")
        return self

    @classmethod
    def for_captions(cls, **given: Any) -> GenerationConfig:
        """The settings ``vlframe caption``, ``vlframe eval``'s caption task and ``Trained.caption``
        start from: ``CAPTION_DEFAULTS`` under what is ``given``."""
        return cls.model_validate({**CAPTION_DEFAULTS, **given})


#: What captioning commands decode with unless told otherwise: beam search over 4 hypotheses with
#: bigram blocking. Measured on Flickr8k val (README, Decoding defaults): on the zoo's three
#: 300-step CoCa runs bigram blocking lifts greedy CIDEr 6.0 -> 14.2; on configs/flickr8k.yaml's
#: three 2,400-step runs beam 4 + blocking gives CIDEr 23.8 against greedy's 16.9 and BLEU-4
#: 9.9 against 7.6. ``generate`` itself decodes plainly (its field defaults) unless asked;
#: ``{strategy: greedy, no_repeat_ngram_size: 0}`` (``--strategy greedy --no-repeat-ngram-size 0``)
#: is the plain greedy.
CAPTION_DEFAULTS: dict[str, Any] = {"strategy": "beam", "num_beams": 4, "no_repeat_ngram_size": 2}


@dataclass
class Generated:
    """``tokens`` ``(B, n, L)``: generated ids after the prompt, EOS included, then padding.
    ``scores`` ``(B, n)``: each caption's summed log-probability (beam: divided by its length
    to the power ``length_penalty``), best first."""

    tokens: Tensor
    scores: Tensor


_COMPILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _compiled_step(model: Captioner) -> Any:
    """``model.caption_logits`` compiled once per model. The cache's offset is read as a Python
    int: after the first change dynamo makes it symbolic, so one graph serves every step."""
    step = _COMPILED.get(model)
    if step is None:
        from vlframe.runtime.compiling import key_caches_by_isa

        key_caches_by_isa()
        step = _COMPILED[model] = torch.compile(model.caption_logits, dynamic=None)
    return step


class _Stepper:
    """Feeds the growing sequences to the model, with or without the cache."""

    def __init__(self, model: Captioner, context: Tensor, use_cache: bool, vocab_size: int | None = None,
                 capacity: int | None = None) -> None:
        self.model, self.context, self.vocab_size = model, context, vocab_size
        # compiled: a static cache of ``capacity`` positions, so that every step has one shape
        self.cache = KVCache(capacity) if use_cache else None
        self.step = _compiled_step(model) if use_cache and capacity is not None else model.caption_logits
        self.fed = 0

    def next_logits(self, seqs: Tensor) -> Tensor:
        if self.cache is None:
            logits = self.model.caption_logits(seqs, self.context)
        else:
            # The prompt (and the cross-attention keys of the image context) eagerly; the steps compiled.
            step = self.model.caption_logits if self.fed == 0 else self.step
            logits = step(seqs[:, self.fed :], self.context, self.cache)
            self.fed = seqs.shape[1]
        logits = logits[:, -1].float()
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            # The model's vocabulary may be larger than its tokenizer's: ids beyond it mean nothing.
            logits[:, self.vocab_size :] = float("-inf")
        return logits

    def reorder(self, index: Tensor) -> None:
        # Beams of one image share its context, so the context itself stays; the cache moves.
        if self.cache is not None:
            self.cache.reorder(index)


def _adjust(logits: Tensor, generated: Tensor, step: int, cfg: GenerationConfig, eos_id: int,
            banned: tuple[int, ...]) -> Tensor:
    """Repetition penalty, banned tokens, and no EOS before ``min_length``."""
    if cfg.repetition_penalty != 1.0 and generated.shape[1]:
        seen = logits.gather(1, generated)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    forbid = list(banned) + ([eos_id] if step < cfg.min_length else [])
    if forbid:
        logits = logits.index_fill(1, torch.tensor(forbid, device=logits.device), float("-inf"))
    n = cfg.no_repeat_ngram_size
    if n > 0 and generated.shape[1] >= n - 1:
        rows, tokens = _repeating(generated.tolist(), n)
        if rows:
            logits = logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)),
                                      torch.tensor(float("-inf"), device=logits.device))
    return logits


def _repeating(history: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs whose token would complete an n-gram the row has already generated."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, ids in enumerate(history):
        if len(ids) < n - 1:
            continue
        tail = tuple(ids[len(ids) - n + 1 :]) if n > 1 else ()
        for start in range(len(ids) - n + 1):
            if tuple(ids[start : start + n - 1]) == tail:
                rows.append(row)
                tokens.append(ids[start + n - 1])
    return rows, tokens


def _filter(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the ``top_k`` likeliest tokens, then the smallest set holding ``top_p`` of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p (the likeliest always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _greedy_or_sample(stepper: _Stepper, seqs: Tensor, cfg: GenerationConfig, eos_id: int, pad_id: int,
                      banned: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    prompt = seqs.shape[1]
    finished = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    scores = torch.zeros(seqs.shape[0], device=seqs.device)
    generator = None
    if cfg.strategy == "sample" and cfg.seed is not None:
        generator = torch.Generator(seqs.device).manual_seed(cfg.seed)
    for step in range(cfg.max_length):
        logits = _adjust(stepper.next_logits(seqs), seqs[:, prompt:], step, cfg, eos_id, banned)
        if cfg.strategy == "sample":
            probs = _filter(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1).gather(1, token[:, None]).squeeze(1)
        scores += logp.masked_fill(finished, 0.0)
        token = token.masked_fill(finished, pad_id)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return seqs[:, prompt:], scores


def _beam(stepper: _Stepper, seqs: Tensor, cfg: GenerationConfig, batch: int, eos_id: int, pad_id: int,
          banned: tuple[int, ...]) -> list[list[tuple[float, list[int]]]]:
    """Beam search with early stopping: an image is done once ``num_beams`` hypotheses ended."""
    k, prompt, device = cfg.num_beams, seqs.shape[1], seqs.device
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: only one may expand at first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(cfg.max_length):
        logp = _adjust(stepper.next_logits(seqs), seqs[:, prompt:], step, cfg, eos_id, banned).log_softmax(dim=-1)
        vocab = logp.shape[-1]
        candidates = (beam_scores.view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)
        rows = (top_index // vocab).tolist()
        tokens, values = (top_index % vocab).tolist(), top_scores.tolist()
        new_scores = torch.full((batch, k), float("-inf"), device=device)
        source = torch.arange(batch, device=device)[:, None].mul(k).expand(batch, k).clone()
        new_tokens = torch.full((batch, k), pad_id, dtype=torch.long, device=device)
        history = seqs[:, prompt:].tolist()
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank in range(2 * k):
                score, token, row = values[b][rank], tokens[b][rank], b * k + rows[b][rank]
                if score == float("-inf"):
                    break
                if token == eos_id:
                    if rank < k:  # an EOS outside the top k would not have survived as a beam
                        finished[b].append((score / (step + 1) ** cfg.length_penalty, history[row] + [eos_id]))
                    continue
                new_scores[b, kept], source[b, kept], new_tokens[b, kept] = score, row, token
                kept += 1
                if kept == k:
                    break
            done[b] = len(finished[b]) >= k
        if all(done):
            break
        index = source.view(-1)
        seqs = torch.cat([seqs.index_select(0, index), new_tokens.view(-1, 1)], dim=1)
        stepper.reorder(index)
        beam_scores = new_scores
    else:
        # Out of length: the live beams compete as they are.
        history = seqs[:, prompt:].tolist()
        for b in range(batch):
            if not done[b]:
                for j in range(k):
                    score = float(beam_scores[b, j])
                    if score > float("-inf"):
                        finished[b].append((score / cfg.max_length ** cfg.length_penalty, history[b * k + j]))
    return finished


@torch.no_grad()  # not inference_mode: under it autocast re-casts every weight at every step
def generate(
    model: Captioner,
    images: Tensor,
    config: GenerationConfig | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    prompt: Tensor | None = None,
    banned_ids: tuple[int, ...] | None = None,
    vocab_size: int | None = None,
    **overrides: Any,
) -> Generated:
    """Caption ``images`` ``(B, 3, H, W)``; ``config`` fields may also be given as keywords.

    ``prompt`` ``(B, P)`` starts every caption (default: BOS alone). ``banned_ids`` are never
    generated (default: padding and BOS), nor are ids from ``vocab_size`` on (the tokenizer's
    vocabulary, when smaller than the model's).
    """
    cfg = GenerationConfig.model_validate({**(config.model_dump() if config else {}), **overrides})
    batch, device = images.shape[0], images.device
    if prompt is None:
        prompt = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    if prompt.shape[0] != batch:
        raise ValueError(f"prompt has {prompt.shape[0]} rows for {batch} images")
    context_length = getattr(model, "context_length", None)
    # Training predicts tokens 1 .. context_length - 1 of a sequence: a prompt of P tokens leaves
    # context_length - P tokens the model has learnt to predict, the EOS among them.
    if cfg.max_length is None:
        cfg = cfg.model_copy(update={"max_length": max(1, context_length - prompt.shape[1]) if context_length else 32})
        if cfg.min_length > cfg.max_length:
            raise ValueError(f"min_length {cfg.min_length} exceeds the {cfg.max_length} tokens the context allows")
    if context_length is not None and prompt.shape[1] + cfg.max_length > context_length:
        raise ValueError(f"a {prompt.shape[1]}-token prompt plus max_length {cfg.max_length} exceeds the "
                         f"model's context_length {context_length}")
    banned = tuple(banned_ids) if banned_ids is not None else tuple({pad_id, bos_id} - {eos_id})
    context = model.caption_context(images)
    copies = cfg.num_beams if cfg.strategy == "beam" else cfg.num_return_sequences
    capacity = prompt.shape[1] + cfg.max_length if cfg.compile else None
    stepper = _Stepper(model, context.repeat_interleave(copies, dim=0), cfg.use_cache, vocab_size, capacity)
    seqs = prompt.repeat_interleave(copies, dim=0)
    n = cfg.num_return_sequences
    if cfg.strategy != "beam":
        tokens, scores = _greedy_or_sample(stepper, seqs, cfg, eos_id, pad_id, banned)
        tokens, scores = tokens.view(batch, n, -1), scores.view(batch, n)
        order = scores.argsort(dim=1, descending=True)  # several samples per image: best first
        return Generated(tokens.gather(1, order[..., None].expand_as(tokens)), scores.gather(1, order))
    hypotheses = _beam(stepper, seqs, cfg, batch, eos_id, pad_id, banned)
    best = [sorted(h, key=lambda item: -item[0])[:n] for h in hypotheses]
    length = max(len(ids) for h in best for _, ids in h)
    tokens = torch.full((batch, n, length), pad_id, dtype=torch.long, device=device)
    scores = torch.full((batch, n), float("-inf"), device=device)
    for b, hyps in enumerate(best):
        for j, (score, ids) in enumerate(hyps):
            tokens[b, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            scores[b, j] = score
    return Generated(tokens, scores)


def caption(model: Captioner, tokenizer: Any, images: Tensor, config: GenerationConfig | None = None,
            **overrides: Any) -> list[list[str]]:
    """Captions as text: ``num_return_sequences`` strings per image, best first.

    The tokenizer's special tokens other than EOS (padding, BOS, unknown, CLS) are never
    generated: decoding would drop them, so they would only use up length; nor are ids the
    tokenizer does not have (a model's vocabulary is an upper bound of its tokenizer's)."""
    specials = {getattr(tokenizer, name, None) for name in ("pad_id", "bos_id", "unk_id", "cls_id")}
    banned = tuple(sorted(i for i in specials if i is not None and i != tokenizer.eos_id))
    overrides.setdefault("banned_ids", banned)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    out = generate(model, images, config, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   **overrides)
    return [[tokenizer.decode(row) for row in per_image] for per_image in out.tokens.tolist()]
