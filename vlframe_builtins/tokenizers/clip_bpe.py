"""CLIP's byte-level BPE tokenizer: the vocabulary open_clip's CoCa weights were trained with.

The vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, 48,894 merges) ships inside the
open-clip-torch package; it is read from there, or from ``path``, never from the network. Text
is repaired (ftfy), HTML-unescaped, whitespace-collapsed and lower-cased, split into words,
numbers and punctuation runs, and each piece's UTF-8 bytes are merged by rank. Ids follow
open_clip: 49406 starts a text, 49407 ends it, padding is 0, and a text longer than the context
keeps its first ``context_length - 2`` tokens. There is no CLS token: CoCa's text decoder
appends a learned CLS vector, not a token. The vocabulary is fixed: ``train`` only saves it.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import shutil
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from registry import ComponentSpec, ExistingFile, TokenizerConfig, hookimpl

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
FILENAME = "tokenizer.model"  # the name a run and its checkpoints keep a tokenizer under
N_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses (the file holds more)
START, END = "<start_of_text>", "<end_of_text>"
# Words, single digits, and runs of other non-space characters; English contractions first.
PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipBPEConfig(TokenizerConfig):
    path: ExistingFile | None = Field(
        None, description=f"The {VOCAB_FILE} vocabulary; default: the copy inside the installed open-clip-torch.")
    pad_to_context: bool = Field(
        True, description="Pad every text to the context length, as open_clip does (its CoCa weights' legacy "
        "padding mask needs it); false pads a batch to its longest text.")


def packaged_vocab() -> Path:
    """The vocabulary inside the installed open-clip-torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / VOCAB_FILE).is_file():
            return Path(folder) / VOCAB_FILE
    raise ValueError(f"no {VOCAB_FILE}: install open-clip-torch (pip install open-clip-torch) or set tokenizer.path "
                     "to a copy of the file")


def byte_alphabet() -> dict[int, str]:
    """A printable character for each byte: printable Latin-1 bytes stand for themselves, the others
    (spaces, controls) borrow characters from 256 up, so no merge ever involves whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    spare = (chr(256 + i) for i in range(256))
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = next(spare)
    return alphabet


class ClipBPETokenizer:
    pad_id, bos_id, eos_id = 0, 49406, 49407
    cls_id = None  # CoCa's CLS is a learned vector, not a token
    unk_id = None  # byte-level: every text has a spelling
    trained = True

    def __init__(self, cfg: ClipBPEConfig, *, vocab_size: int) -> None:
        import regex

        self.cfg = cfg
        self.path = Path(cfg.path) if cfg.path is not None else packaged_vocab()
        self._bytes = byte_alphabet()
        self._unbytes = {c: b for b, c in self._bytes.items()}
        try:
            lines = gzip.open(self.path, "rt", encoding="utf-8").read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path}: not a gzipped CLIP BPE vocabulary ({exc})") from None
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.path}: expected {N_MERGES} merges of two symbols")
        symbols = list(self._bytes.values())
        vocabulary = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        if len(vocabulary) > vocab_size:
            raise ValueError(f"CLIP's vocabulary has {len(vocabulary)} tokens, more than the model's vocab_size "
                             f"{vocab_size}")
        self.encoder = {token: i for i, token in enumerate(vocabulary)}
        self.decoder = vocabulary
        self.ranks = {m: i for i, m in enumerate(merges)}
        self._pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._bpe = lru_cache(maxsize=65536)(self._merge)

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    @staticmethod
    def clean(text: str) -> str:
        """ftfy repair, HTML entities undone (twice, as scraped text often needs), whitespace
        collapsed, lower case: the normalisation CLIP's training captions went through."""
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, piece: str) -> tuple[str, ...]:
        """BPE of one pre-tokenised piece: merge the best-ranked adjacent pair until none is known."""
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def text_ids(self, text: str) -> list[int]:
        """Ids of one text, without start/end tokens."""
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            spelled = "".join(self._bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(spelled))
        return ids

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        """Ids ``(B, L)`` padded with 0 to ``context_length`` (or to the longest text), and the mask of
        real tokens (by length: id 0 is also the token '!')."""
        rows = [[self.bos_id, *self.text_ids(t)[: context_length - 2], self.eos_id] for t in texts]
        length = context_length if self.cfg.pad_to_context else max(len(r) for r in rows)
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = True
        return out, mask

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of one id sequence: from after the start token to the end token."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.bos_id and 0 <= i < self.bos_id)
        # A word ends at "</w>": a space there; every other character stands for one byte.
        raw = bytes(32 if c == " " else self._unbytes[c] for c in text.replace("</w>", " "))
        return raw.decode("utf-8", errors="replace").strip()

    def train(self, texts: Iterable[str], directory: Path) -> Path:
        """CLIP's vocabulary is fixed: nothing to fit; save it with the run."""
        return self.save(directory)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / FILENAME
        if target.resolve() != self.path.resolve():
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            try:
                shutil.copyfile(self.path, tmp)
                os.replace(tmp, target)
            finally:  # a full disk leaves no partial file behind
                tmp.unlink(missing_ok=True)
        return target

    def load(self, path: Path) -> None:
        self.__init__(self.cfg.model_copy(update={"path": path}), vocab_size=len(self.decoder))


@hookimpl
def vlframe_tokenizers() -> list[ComponentSpec]:
    return [
        ComponentSpec("clip_bpe", ClipBPEConfig, ClipBPETokenizer,
                      "CLIP's byte-level BPE (49,408 tokens), as open_clip's CoCa weights use; vocabulary from "
                      "the installed open-clip-torch or a path."),
    ]
