"""Captioning metrics (BLEU, METEOR, ROUGE-L, CIDEr-D) by the COCO caption-evaluation protocol.

The numbers come from ``pycocoevalcap`` itself rather than a re-implementation, so they can be
compared with published results: captions are first run through its Stanford ``PTBTokenizer``
(lower-cased, punctuation dropped), then scored by its ``Bleu(4)``, ``Meteor``, ``Rouge`` and
``Cider`` classes. ``pycocoevalcap``'s ``Cider`` is CIDEr-D (Gaussian length penalty, clipped
n-gram counts), the variant every COCO leaderboard reports as "CIDEr".

Scores are returned as ``pycocoevalcap`` gives them: fractions (CIDEr 0.19), not the x100 that
papers print; ``format_scores`` does the x100 for logs.

Java 8+ must be on ``PATH``: the PTB tokenizer (used for every metric) and METEOR are Java
programs run as subprocesses. ``pycocoevalcap`` is imported only when scoring, so the rest of
vlframe works without it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CAPTION_METRICS", "METRICS", "UNAVAILABLE", "format_scores", "score_captions"]

METRICS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
"""Keys ``score_captions`` can return, in the order ``format_scores`` prints them."""
CAPTION_METRICS = METRICS

UNAVAILABLE: dict[str, str] = {
    "spice": "needs Stanford CoreNLP models, a download (vlframe runs offline)",
}
"""Metrics of the COCO toolkit that are deliberately not computed, with the reason."""

_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
           "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
_MAX_IDS_SHOWN = 5


def _show_ids(ids: Sequence[Any]) -> str:
    """A short, readable list of offending ids so a message stays one line on big datasets."""
    shown = ", ".join(repr(i) for i in list(ids)[:_MAX_IDS_SHOWN])
    more = len(ids) - _MAX_IDS_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def _check_metrics(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):  # "cider" would otherwise be read as c, i, d, e, r
        metrics = [metrics]
    for name in metrics:
        if name in UNAVAILABLE:
            raise ValueError(f"metric {name!r} is not available: {UNAVAILABLE[name]}")
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


def _check_inputs(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Fail before any Java starts, naming the ids, rather than on a bare assert inside pycocoevalcap."""
    if not candidates:
        raise ValueError("no candidate captions to score")
    no_refs = [i for i in candidates if i not in references]
    if no_refs:
        raise ValueError(f"{len(no_refs)} candidate id(s) have no references: {_show_ids(no_refs)}")
    no_cand = [i for i in references if i not in candidates]
    if no_cand:
        raise ValueError(f"{len(no_cand)} reference id(s) have no candidate: {_show_ids(no_cand)}")
    bad_cand = [i for i, c in candidates.items() if not isinstance(c, str)]
    if bad_cand:
        raise TypeError(f"candidates must be strings; not for id(s) {_show_ids(bad_cand)}")
    # A bare string would be iterated as one-character references and score nonsense quietly.
    bad_refs = [i for i, r in references.items()
                if isinstance(r, str) or not all(isinstance(s, str) for s in r)]
    if bad_refs:
        raise TypeError(f"references must be sequences of strings; not for id(s) {_show_ids(bad_refs)}")
    empty = [i for i in candidates if len(references[i]) == 0]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have zero references: {_show_ids(empty)}")


def _import_error(exc: ImportError) -> ImportError:
    return ModuleNotFoundError(
        f"caption metrics need the 'pycocoevalcap' package (pip install pycocoevalcap): {exc}")


def _tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize ``{id: [caption, ...]}`` and check nothing was lost on the way.

    The tokenizer pairs its output lines with ids by position and silently truncates, so a line
    break inside a caption would shift every later caption onto the wrong image. Newlines are
    replaced by pycocoevalcap, but Java also breaks lines at \\r, \\v, \\f, U+2028 and U+2029;
    collapsing all whitespace to single spaces first changes no tokens and closes that hole.
    """
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as exc:
        raise _import_error(exc) from exc
    data = {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    try:
        out = PTBTokenizer().tokenize(data)
    except OSError as exc:  # it writes its input file next to its jar, inside site-packages
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer failed (it needs Java and a writable "
                           f"pycocoevalcap/tokenizer directory): {exc}") from exc
    lost = [i for i, caps in captions.items() if len(out.get(i, ())) != len(caps)]
    if lost:
        raise RuntimeError(f"PTBTokenizer returned the wrong number of captions for id(s) "
                           f"{_show_ids(lost)} (did the java process fail?)")
    return out


def _close_meteor(meteor: Any) -> None:
    """Stop METEOR's JVM now instead of whenever the object is garbage collected.

    Some pycocoevalcap versions have ``close()``; 1.2 only has ``__del__``, which takes the
    instance lock first. ``compute_score`` leaves that lock held if it raises, so ``__del__``
    would then hang at collection: release it and stop the process directly.
    """
    close = getattr(meteor, "close", None)
    if callable(close):
        close()
        return
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        lock.release()
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:  # a broken pipe when the JVM already died
            pass
    proc.kill()
    proc.wait()


def score_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   metrics: Sequence[str] | None = None,
                   per_image: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Corpus-level caption scores, keyed ``bleu1``..``bleu4``, ``meteor``, ``rouge_l``, ``cider``.

    ``candidates`` maps an image id to one generated caption (an empty string is scored as an
    empty caption); ``references`` maps the same ids to their ground-truth captions. ``metrics``
    picks a subset (default: all of ``METRICS``); METEOR's JVM is only started when asked for.
    Values are fractions exactly as pycocoevalcap returns them. CIDEr-D's IDF comes from the
    references being scored, so it is only meaningful over many images (a single image gets 0).
    ``per_image``, when given, is filled with each image's score for the metrics whose corpus
    score is the mean of them (``rouge_l``, ``cider``; BLEU and METEOR are computed from counts
    pooled over the corpus, so they have none).

    Raises ValueError for unknown or unavailable metrics (see ``UNAVAILABLE``), an empty
    ``candidates``, ids present on one side only, or an id with no references; RuntimeError when
    Java is missing or a Java subprocess fails.
    """
    wanted = _check_metrics(metrics)
    _check_inputs(candidates, references)
    if shutil.which("java") is None:
        ptb = "pycocoevalcap's PTB tokenizer, used for every metric,"
        raise RuntimeError(f"METEOR needs Java 8+ on PATH (no 'java' found); so does {ptb[:-1]}"
                           if "meteor" in wanted else f"{ptb} needs Java 8+ on PATH (no 'java' found)")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise _import_error(exc) from exc

    # Start METEOR's JVM first: it loads for seconds while the tokenizer and the other metrics run.
    meteor = Meteor() if "meteor" in wanted else None
    try:
        ids = list(candidates)  # one id order for both sides, like COCOEvalCap
        gts = _tokenize({i: list(references[i]) for i in ids})
        res = _tokenize({i: [candidates[i]] for i in ids})
        scores: dict[str, float] = {}
        if any(m.startswith("bleu") for m in wanted):
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints to stdout
            scores.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
        for name, scorer in (("rouge_l", Rouge), ("cider", Cider)):
            if name in wanted:
                corpus, each = scorer().compute_score(gts, res)
                scores[name] = float(corpus)
                if per_image is not None:
                    per_image[name] = {i: float(v) for i, v in zip(gts, each)}  # the scorers walk gts in order
        if meteor is not None:
            try:
                scores["meteor"] = float(meteor.compute_score(gts, res)[0])
            except (OSError, ValueError) as exc:  # broken pipe / empty line from a dead JVM
                raise RuntimeError(f"METEOR's java subprocess failed: {exc}") from exc
    finally:
        if meteor is not None:
            _close_meteor(meteor)
    return {m: scores[m] for m in METRICS if m in wanted}


def format_scores(scores: Mapping[str, float]) -> str:
    """One log line, x100 with two decimals, e.g. ``BLEU-4 7.98  METEOR 14.17  CIDEr 18.97``.

    Known keys appear in ``METRICS`` order whatever the mapping's order, so lines from different
    runs line up; keys that are absent (or not caption metrics) are left out.
    """
    return "  ".join(f"{_LABELS[k]} {100.0 * scores[k]:.2f}" for k in METRICS if k in scores)
