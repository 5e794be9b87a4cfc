"""SentencePiece tokenizer (the paper's choice), trained from a dataset's captions.

Reserved ids: 0 padding, 1 start (BOS), 2 end (EOS), 3 unknown, 4 ``<cls>`` (kept for decoders
that embed their CLS as a token; CoCa's text decoder learns its own CLS vector). A caption
becomes ``BOS pieces EOS``, cut to the context length with its EOS kept.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from registry import ComponentSpec, ExistingFile, TokenizerConfig, hookimpl

FILENAME = "tokenizer.model"
#: Smallest vocabulary worth training: the reserved pieces plus the lower-case letters and digits.
MIN_VOCAB = 48


class SentencePieceConfig(TokenizerConfig):
    path: ExistingFile | None = Field(
        None, description="A trained tokenizer.model; without one, `vlframe train` trains it on the training captions."
    )
    vocab_size: int | None = Field(None, gt=8, description="Target vocabulary; default the model's vocab_size.")
    model_type: Literal["unigram", "bpe"] = "unigram"
    lowercase: bool = Field(True, description="Lower-case text before training and encoding.")
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    max_sentences: int = Field(1_000_000, gt=0, description="Captions sampled for training, at most.")


class SentencePieceTokenizer:
    pad_id, bos_id, eos_id, unk_id, cls_id = 0, 1, 2, 3, 4

    def __init__(self, cfg: SentencePieceConfig, *, vocab_size: int) -> None:
        if cfg.path is None and min(cfg.vocab_size or vocab_size, vocab_size) < MIN_VOCAB:
            raise ValueError(f"a vocabulary of {min(cfg.vocab_size or vocab_size, vocab_size)} is too small to train: "
                             f"SentencePiece needs at least {MIN_VOCAB} pieces (5 reserved, the rest for the "
                             "captions' characters); raise model.vocab_size")
        self.cfg = cfg
        self.max_vocab = vocab_size
        self._sp = None
        if cfg.path is not None:
            self.load(cfg.path)

    @property
    def trained(self) -> bool:
        return self._sp is not None

    @property
    def vocab_size(self) -> int:
        return self._processor().vocab_size()

    def _processor(self):
        if self._sp is None:
            raise RuntimeError("the tokenizer is not trained yet (run `vlframe tokenizer train` or set tokenizer.path)")
        return self._sp

    def _normalise(self, text: str) -> str:
        return text.strip().lower() if self.cfg.lowercase else text.strip()

    def load(self, path: Path) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot load SentencePiece model {path}: {exc}") from exc
        if self._sp.vocab_size() > self.max_vocab:
            raise ValueError(
                f"{path} has {self._sp.vocab_size()} pieces, more than the model's vocab_size {self.max_vocab}"
            )

    def train(self, texts: Iterable[str], directory: Path) -> Path:
        """Fit to ``texts`` and save ``directory/tokenizer.model``; return its path."""
        import sentencepiece as spm

        target = min(self.cfg.vocab_size or self.max_vocab, self.max_vocab)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(self._normalise(t) for t in texts if t and t.strip()),
                model_writer=model,
                vocab_size=target,
                hard_vocab_limit=False,  # a small corpus (synthetic captions) has fewer pieces: fine
                model_type=self.cfg.model_type,
                character_coverage=self.cfg.character_coverage,
                input_sentence_size=self.cfg.max_sentences,
                shuffle_input_sentence=True,
                pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id,
                user_defined_symbols=["<cls>"],
                num_threads=1,  # one thread: the same captions always give the same vocabulary
                minloglevel=2,
            )
        except RuntimeError as exc:  # its messages are one line naming the setting to change
            text = " ".join(str(exc).split())
            why = text.rpartition("] ")[2] if "] " in text else text  # drop the C++ assertion
            raise ValueError(f"SentencePiece could not train a {target}-piece vocabulary on these captions: {why} "
                             "(the settings: model.vocab_size, tokenizer.character_coverage)") from None
        self._sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        return self.save(directory)

    def save(self, directory: Path) -> Path:
        """Write ``directory/tokenizer.model`` atomically; return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_bytes(self._processor().serialized_model_proto())
            os.replace(tmp, path)
        finally:  # a full disk leaves no partial file behind
            tmp.unlink(missing_ok=True)
        return path

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        """Token ids ``(B, L)`` padded to the longest caption (at most ``context_length``), and the mask."""
        sp = self._processor()
        rows = []
        for ids in sp.encode([self._normalise(t) for t in texts]):
            ids = [self.bos_id, *ids[: context_length - 2], self.eos_id]
            rows.append(ids)
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = torch.tensor(ids)
        return out, out != self.pad_id

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of one id sequence, stopping at EOS and skipping special tokens."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._processor().decode([i for i in ids if i > self.cls_id])


@hookimpl
def vlframe_tokenizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("sentencepiece", SentencePieceConfig, SentencePieceTokenizer,
                      "SentencePiece (unigram or BPE) trained on the training captions."),
    ]
