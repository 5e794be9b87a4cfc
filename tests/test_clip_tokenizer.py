"""CLIP's BPE tokenizer plugin against open_clip's own tokenizer (a test dependency)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from registry import Kind, Registry

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer", reason="open-clip-torch is a test dependency")

SENTENCES = [
    "A dog runs through the snow.",
    "Two children, aged 5 and 7, play on the beach!!!",
    "It's a man's hat; they're here, we've gone, I'm sure, you'll see, he'd go.",
    "HTML &amp; entities: &lt;b&gt;bold&lt;/b&gt; and &quot;quotes&quot;",
    "Unicode: café, naïve, Straße, Ελληνικά, 日本語のテキスト, emoji 🐶🚲",
    "numbers 3.14159 and 2,718 and 1e10; dashes — and – hyphens - ok",
    "   lots   of\twhitespace\nand newlines  ",
    "mojibake: donâ€™t",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(registry: Registry):
    catalog = registry.catalog
    config = catalog.get(Kind.TOKENIZER, "clip_bpe").spec.config(type="clip_bpe")
    return catalog.build(Kind.TOKENIZER, config, path="tokenizer", vocab_size=49408)


def test_ids_equal_open_clips_on_punctuation_and_unicode(tokenizer) -> None:
    theirs = open_clip_tokenizer.tokenize(SENTENCES, context_length=76)  # CoCa's context
    ours, mask = tokenizer.encode(SENTENCES, 76)
    assert ours.shape == theirs.shape == (len(SENTENCES), 76)
    for i, sentence in enumerate(SENTENCES):
        assert ours[i].tolist() == theirs[i].tolist(), sentence
        n = int(mask[i].sum())
        assert mask[i, :n].all() and ours[i, n - 1] == tokenizer.eos_id
    assert tokenizer.vocab_size == 49408 and ours[:, 0].eq(49406).all()


def test_pad_to_longest_when_asked(registry: Registry) -> None:
    catalog = registry.catalog
    config = catalog.get(Kind.TOKENIZER, "clip_bpe").spec.config(type="clip_bpe", pad_to_context=False)
    short = catalog.build(Kind.TOKENIZER, config, path="tokenizer", vocab_size=49408)
    ids, mask = short.encode(["a dog", "a dog runs fast"], 76)
    assert ids.shape == (2, 6) and mask.sum(1).tolist() == [4, 6]


def test_long_text_keeps_its_start_and_ends_with_eos(tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(100))
    theirs = open_clip_tokenizer.tokenize([text], context_length=20)
    ours, mask = tokenizer.encode([text], 20)
    assert ours.shape == (1, 20) and mask.all()
    assert ours.tolist() == theirs.tolist() and ours[0, -1] == tokenizer.eos_id


def test_decode_inverts_encode_after_cleaning(tokenizer) -> None:
    for sentence in SENTENCES:
        ids, mask = tokenizer.encode([sentence], 77)
        assert tokenizer.decode(ids[0]) == " ".join(open_clip_tokenizer.SimpleTokenizer().decode(
            ids[0, 1 : int(mask[0].sum()) - 1].tolist()).split())


def test_the_vocabulary_travels_with_a_run_and_bad_files_are_refused(tokenizer, tmp_path: Path, registry) -> None:
    saved = tokenizer.save(tmp_path)
    assert saved.name == "tokenizer.model" and gzip.open(saved).read(20)
    catalog = registry.catalog
    spec = catalog.get(Kind.TOKENIZER, "clip_bpe").spec
    again = catalog.build(Kind.TOKENIZER, spec.config(type="clip_bpe", path=saved), vocab_size=49408)
    assert torch.equal(again.encode(["a red circle"], 16)[0], tokenizer.encode(["a red circle"], 16)[0])
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(Exception, match="not a gzipped CLIP BPE vocabulary"):
        catalog.build(Kind.TOKENIZER, spec.config(type="clip_bpe", path=broken), path="tokenizer", vocab_size=49408)
    with pytest.raises(Exception, match="more than the model's vocab_size 8192"):
        catalog.build(Kind.TOKENIZER, spec.config(type="clip_bpe"), path="tokenizer", vocab_size=8192)
