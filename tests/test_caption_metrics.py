"""Caption metrics against pycocoevalcap itself: real Java tokenizer, real METEOR, no mocks."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from vlframe.evaluation.caption_metrics import METRICS, UNAVAILABLE, format_scores, score_captions

pytest.importorskip("pycocoevalcap")

# Hand-written so that tokenization matters: capitals, commas, full stops, an apostrophe.
REFERENCES = {
    "img1": ["A brown dog runs across the grass.", "A dog is running on a green lawn!",
             "The dog sprints over the field."],
    "img2": ["Two children play soccer in a park.", "Kids kicking a ball, on the grass.",
             "Two young boys are playing football outside.", "Children play with a ball.",
             "A pair of kids play soccer in the park."],
    "img3": ["A man rides a bicycle down the street.", "A cyclist on a city road."],
    "img4": ["A plate of pasta with tomato sauce.", "Spaghetti, covered in red sauce, on a white plate.",
             "A bowl of noodles with sauce."],
    "img5": ["A cat sleeping on a sofa.", "The cat's asleep on the couch.",
             "A grey cat naps on a couch.", "A cat curled up on a sofa."],
    "img6": ["A red bus parked by the road.", "A double-decker bus on a city street.",
             "A bus stopped at the curb."],
}
CANDIDATES = {
    "img1": "A brown dog is running on the grass.",
    "img2": "Two kids play soccer in a park",
    "img3": "A man riding a bike down the street.",
    "img4": "A plate of spaghetti with red sauce",
    "img5": "A cat sleeping on the couch!",
    "img6": "A red bus on the city street.",
}
# Word salad, plus an empty caption and one that PTB reduces to "" (both must be scorable).
NONSENSE = {
    "img1": "Purple equations whistle beneath seventeen volcanoes.",
    "img2": "",
    "img3": "...",
    "img4": "Quantum marmalade negotiates tuesday's umbrella.",
    "img5": "Seven violins forgot the algebra.",
    "img6": "Ozone pyramids hum softly.",
}


def _pycocoevalcap_scores(candidates: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """The official protocol written out by hand: PTB-tokenize both sides, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": b for n, b in enumerate(bleu)}
    out["rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    meteor = Meteor()
    out["meteor"] = meteor.compute_score(gts, res)[0]
    del meteor  # CPython runs Meteor.__del__ at once, which kills its JVM
    return out


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, float]]:
    """Every METEOR-using computation of this file, in parallel: each JVM takes seconds to load.

    Running them side by side also checks that concurrent score_captions calls do not interfere.
    """
    with ThreadPoolExecutor(max_workers=3) as pool:
        ours = pool.submit(score_captions, CANDIDATES, REFERENCES)
        reference = pool.submit(_pycocoevalcap_scores, CANDIDATES, REFERENCES)
        nonsense = pool.submit(score_captions, NONSENSE, REFERENCES)
        return {"ours": ours.result(), "pycocoevalcap": reference.result(),
                "nonsense": nonsense.result()}


def test_matches_pycocoevalcap(scored: dict[str, dict[str, float]]) -> None:
    ours, expected = scored["ours"], scored["pycocoevalcap"]
    assert list(ours) == list(METRICS)
    assert all(type(v) is float for v in ours.values())
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert ours[key] == expected[key], key
    assert ours["meteor"] == pytest.approx(expected["meteor"], abs=1e-6)
    assert 0.0 < ours["bleu4"] < 1.0 and 0.0 < ours["meteor"] < 1.0  # fractions, not x100


def test_per_image_scores_belong_to_their_images_and_average_to_the_corpus_score() -> None:
    per_image: dict[str, dict[str, float]] = {}
    corpus = score_captions(CANDIDATES, REFERENCES, metrics=["cider", "rouge_l", "bleu4"], per_image=per_image)
    assert sorted(per_image) == ["cider", "rouge_l"]  # BLEU pools counts over the corpus: no per-image score
    for name, each in per_image.items():
        assert sorted(each) == sorted(CANDIDATES)
        assert sum(each.values()) / len(each) == pytest.approx(corpus[name])
    # Swapping one good caption for nonsense lowers that image's score and leaves the others' rouge_l.
    swapped = {**CANDIDATES, "img1": NONSENSE["img1"]}
    after: dict[str, dict[str, float]] = {}
    score_captions(swapped, REFERENCES, metrics=["cider", "rouge_l"], per_image=after)
    assert after["cider"]["img1"] < per_image["cider"]["img1"]
    assert {k: v for k, v in after["rouge_l"].items() if k != "img1"} == \
        {k: v for k, v in per_image["rouge_l"].items() if k != "img1"}


def test_nonsense_scores_lower_on_every_metric(scored: dict[str, dict[str, float]]) -> None:
    good, bad = scored["ours"], scored["nonsense"]
    assert list(bad) == list(METRICS)
    for key in METRICS:
        assert bad[key] < good[key], (key, bad[key], good[key])


def test_no_meteor_process_left_behind(scored: dict[str, dict[str, float]]) -> None:
    assert scored  # the fixture started (and should have stopped) three METEOR JVMs
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("meteor" in part for part in child.cmdline()):
                left.append(child.pid)
        except psutil.Error:  # exited meanwhile
            pass
    assert left == []


def test_perfect_candidate_without_meteor() -> None:
    captions = {"a": "A dog runs on the beach.", "b": "Two birds sit on a wire.",
                "c": "A woman reads a book in the garden."}
    refs = {k: [v] * 3 for k, v in captions.items()}
    # Java's tokenizer also splits lines at \r and U+2028, which would shift captions onto the
    # wrong ids without the whitespace clean-up.
    candidates = dict(captions, a="A dog runs\ron the beach.", b="Two birds\u2028sit on a wire.")
    scores = score_captions(candidates, refs, metrics=["bleu4", "rouge_l", "cider"])
    assert list(scores) == ["bleu4", "rouge_l", "cider"]
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] > 1.0


def test_format_scores() -> None:
    scores = {"cider": 0.18971, "rouge_l": 0.35521, "meteor": 0.14168, "bleu4": 0.07982}
    assert format_scores(scores) == "BLEU-4 7.98  METEOR 14.17  ROUGE-L 35.52  CIDEr 18.97"
    assert format_scores({"cider": 1.2345, "other": 3.0}) == "CIDEr 123.45"
    assert format_scores({}) == ""


def test_mismatched_ids_are_named() -> None:
    refs = {f"r{i}": ["a dog"] for i in range(8)}
    with pytest.raises(ValueError, match=r"no references: 'extra'$"):
        score_captions({"r0": "a dog", "extra": "a cat"}, {"r0": ["a dog"]})
    with pytest.raises(ValueError, match=r"7 reference id\(s\) have no candidate: 'r1', 'r2', 'r3', "
                                         r"'r4', 'r5' \(and 2 more\)"):
        score_captions({"r0": "a dog"}, refs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no candidate captions"):
        score_captions({}, {})
    with pytest.raises(ValueError, match="zero references: 'b'"):
        score_captions({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": []})
    with pytest.raises(TypeError, match="sequences of strings; not for id\\(s\\) 'a'"):
        score_captions({"a": "a dog"}, {"a": "a dog"})  # type: ignore[dict-item]


def test_metric_names() -> None:
    with pytest.raises(ValueError, match=re.escape(UNAVAILABLE["spice"])) as err:
        score_captions(CANDIDATES, REFERENCES, metrics=["spice"])
    assert "spice" in str(err.value)
    with pytest.raises(ValueError, match="unknown metric 'bleu5'; available: " + ", ".join(METRICS)):
        score_captions(CANDIDATES, REFERENCES, metrics=["cider", "bleu5"])


def test_missing_java_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH with no java on it
    with pytest.raises(RuntimeError, match="METEOR needs Java 8\\+ on PATH"):
        score_captions(CANDIDATES, REFERENCES)
    with pytest.raises(RuntimeError, match="tokenizer, used for every metric, needs Java 8\\+"):
        score_captions(CANDIDATES, REFERENCES, metrics=["cider"])
