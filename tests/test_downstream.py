"""Downstream tasks on a really trained CoCa: captions, retrieval, zero-shot, probes, matching.

The module trains one small CoCa with ``vlframe train`` in a process of its own (coca_tiny's
structure at 64 px on single-object scenes, 300 steps: ``training_configs.learner``, about 30 s on
2 cores in float32), tracked in an MLflow store of its own, and every test reads that run; the
other commands run in this process (``run_main``), as the same ``vlframe`` entry point. Every
quality threshold below is what a model that learnt nothing exceeds with probability under 0.001
(``numerics.beyond_chance``): the rounding of another CPU moves what training reaches (colours
named in 93% of captions here), never the chance level.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import CONFIGS, new_store, run_cli, run_main
from numerics import assert_close, beyond_chance
from registry import ConfigError
from training_configs import TINY, learner, micro, sets
from vlframe.config import files as configfile
from vlframe.evaluation.datasets import build_dataset
from vlframe.evaluation.metrics import retrieval_recall
from vlframe.evaluation.tasks import run_task, task_config
from vlframe.inference.generation import generate
from vlframe.inference.trained import LoadError, load_trained
from vlframe.training.trainer import Trainer
from vlframe_builtins.datasets.synthetic import COLORS, SIZES, SyntheticConfig, SyntheticScenes

pytestmark = pytest.mark.slow  # trains a model (once, for the whole module)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("downstream")
    uri = new_store(root / "mlflow.db")
    result = run_cli("train", str(TINY), "--run-dir", str(root / "tiny"), *sets(learner(root)),
                     "--set", f"tracking.uri={uri}")
    assert result.code == 0, result.err[-2000:]
    run_id = json.loads((root / "tiny" / "tracking" / "run.json").read_text())["run_id"]
    return {"dir": root / "tiny", "uri": uri, "run_id": run_id, "root": root}


@pytest.fixture(scope="module")
def trained(run):
    return load_trained(run["dir"], precision="auto")


def evaluate(trained, block: dict, **kwargs):
    """One task through the dispatcher, as `vlframe eval` runs it."""
    return run_task(trained, task_config(trained.registry.catalog, block, "test"), **kwargs)


def _single_object_scenes(count: int) -> list:
    scenes = SyntheticScenes(SyntheticConfig(type="synthetic", val_size=count, max_objects=1, seed=7, image_size=64),
                             split="val")
    return [scenes[i] for i in range(count)]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """An ImageFolder of single-shape scenes, one class per colour."""
    root = tmp_path_factory.mktemp("colours")
    for i, sample in enumerate(_single_object_scenes(210)):
        colour = sample.meta["objects"][0]["color"]
        (root / colour).mkdir(exist_ok=True)
        sample.image.save(root / colour / f"{i:04d}.png")
    (root / "classes.json").write_text(json.dumps({c: c for c in COLORS}))
    return root


def test_retrieval_recall_on_constructed_embeddings() -> None:
    # 3 images, 2 captions each; caption j belongs to image j // 2. For image 1 the captions of
    # image 2 score higher (0.3, 0.25) than its own best (0.2): its first hit is at rank 3.
    # Caption 3 scores higher with image 0 (0.3) than with its own image 1 (0.1): rank 2.
    images = torch.eye(4)[:3]
    texts = torch.tensor([[1.0, 0, 0, 0], [0.9, 0, 0, 0.1], [0, 0.2, 0, 0], [0.3, 0.1, 0, 0],
                          [0, 0.3, 1.0, 0], [0, 0.25, 0.8, 0]])
    owners = torch.tensor([0, 0, 1, 1, 2, 2])
    got = retrieval_recall(images, texts, owners, ks=(1, 2, 3))
    assert got["i2t_r1"] == got["i2t_r2"] == pytest.approx(100 * 2 / 3) and got["i2t_r3"] == 100.0
    assert got["t2i_r1"] == pytest.approx(100 * 5 / 6) and got["t2i_r2"] == got["t2i_r3"] == 100.0


def test_trained_model_captions_synthetic_images_with_the_right_attributes(trained) -> None:
    scenes = _single_object_scenes(96)
    captions = trained.caption(trained.load_images([s.image for s in scenes]))
    right = {"color": 0, "size": 0}
    for sample, (text,) in zip(scenes, captions):
        words = re.findall(r"[a-z]+", text)
        truth = sample.meta["objects"][0]
        for attribute, vocabulary in (("color", COLORS), ("size", SIZES)):
            said = [w for w in words if w in vocabulary]
            right[attribute] += bool(said) and said[0] == truth[attribute]
    # Beyond what naming a colour (1 in 7) or a size (1 in 2) at random gives on this many images.
    assert 100 * right["color"] / len(scenes) > beyond_chance(1 / len(COLORS), len(scenes)), captions[:5]
    assert 100 * right["size"] / len(scenes) > beyond_chance(1 / len(SIZES), len(scenes)), captions[:5]


class EndsAt(torch.nn.Module):
    """The trained captioner, made to end image i's caption after exactly ``ends[i]`` tokens: its EOS
    logit is lowered far below the rest before that position and raised far above it from there on.
    The end is carried in the image context
    (one extra context token whose first channel holds it), which generation hands to every step
    of every beam of the image, so cached and uncached decoding see the same rule; everything else
    is the trained model's own decoder, cache and all."""

    def __init__(self, model: torch.nn.Module, ends: list[int], eos: int) -> None:
        super().__init__()
        self.model, self.ends, self.eos = model, torch.tensor(ends, dtype=torch.float32), eos
        self.capabilities, self.context_length = model.capabilities, model.context_length

    def caption_context(self, images: torch.Tensor) -> torch.Tensor:
        context = self.model.caption_context(images)
        marker = torch.zeros(context.shape[0], 1, context.shape[-1], dtype=context.dtype)
        marker[:, 0, 0] = self.ends
        return torch.cat([context, marker], dim=1)

    def caption_logits(self, tokens: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        first = cache.offset if cache is not None else 0  # the position of tokens[:, 0]
        logits = self.model.caption_logits(tokens, context[:, :-1], cache).clone()
        generated = first + torch.arange(tokens.shape[1])  # tokens before each next one, BOS aside
        due = generated[None, :] >= context[:, -1, 0].round().long()[:, None]
        logits[..., self.eos] += torch.where(due, 1e4, -1e4)
        return logits


@pytest.mark.parametrize("settings", [{"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3,
                                      "num_return_sequences": 3, "length_penalty": 0.7},
                                      {"strategy": "sample", "top_p": 0.9, "seed": 0, "num_return_sequences": 2}],
                         ids=lambda s: s["strategy"])
def test_cached_and_uncached_captions_agree_on_the_trained_model(trained, settings) -> None:
    """Captions that end (EOS) at different steps, by construction: padding after them, finished
    beams and the cache reordering around them are all exercised, on the trained decoder."""
    ends = [2, 5, 3, 8, 1, 6, 4, 20]  # 20: past max_length, cut by the limit
    images = trained.load_images([s.image for s in _single_object_scenes(len(ends))])
    ids = {"bos_id": 1, "eos_id": 2, "pad_id": 0, "max_length": 10}
    model = EndsAt(trained.model, ends, eos=2)
    cached = generate(model, images, **ids, **settings)
    plain = generate(model, images, use_cache=False, **ids, **settings)
    assert torch.equal(cached.tokens, plain.tokens)
    assert_close(cached.scores, plain.scores)
    assert cached.tokens.shape[-1] == ids["max_length"]
    for image, end in enumerate(ends):  # each caption as constructed: `end` words, EOS, padding
        for row in cached.tokens[image]:
            words = min(end, ids["max_length"])
            assert not ((row[:words] == 2) | (row[:words] == 0)).any(), (end, row)
            if end < ids["max_length"]:
                assert row[end] == 2 and (row[end + 1:] == 0).all(), (end, row)


def test_eval_caption_logs_metrics_and_a_table_to_the_training_run(run) -> None:
    out = run["root"] / "eval-caption"
    result = run_main("eval", str(run["dir"]), "--task", "caption", "--limit", "24", "--out", str(out),
                     "--strategy", "beam", "--num-beams", "2")
    assert result.code == 0, result.err[-2000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
    assert saved["info"]["images"] == 24 and "spice" in saved["info"]["unavailable"]
    assert saved["info"]["generation"]["strategy"] == "beam" and saved["info"]["generation"]["num_beams"] == 2
    page = (out / "captions.html").read_text()
    assert page.count("<img") == 24
    client = MlflowClient(tracking_uri=run["uri"])
    logged = client.get_run(run["run_id"]).data.metrics
    for name, value in saved["metrics"].items():
        assert logged[f"eval/caption/{name}"] == pytest.approx(value)
    artifacts = {Path(a.path).name for a in client.list_artifacts(run["run_id"], "eval/caption")}
    assert {"captions.html", "captions.jsonl", "metrics.json"} <= artifacts
    assert f"MLflow run {run['run_id']}" in result.out
    # Journaled beside the results first (what `vlframe tracking sync` would deliver).
    assert json.loads((out / "tracking" / "run.json").read_text())["run_id"] == run["run_id"]
    assert client.get_run(run["run_id"]).info.status == "FINISHED"  # evaluating does not reopen the run


def test_eval_retrieval_cli_equals_the_python_call(run, trained) -> None:
    result = run_main("eval", str(run["dir"]), "--task", "retrieval", "--limit", "64", "--no-track",
                     "--out", str(run["root"] / "eval-retrieval"))
    assert result.code == 0, result.err[-2000:]
    cli_metrics = json.loads((run["root"] / "eval-retrieval" / "metrics.json").read_text())["metrics"]
    direct = evaluate(trained, {"type": "retrieval", "limit": 64})
    assert (direct.info["images"], direct.info["captions"], direct.info["skipped"]) == (64, 192, 0)
    assert direct.info["data"].startswith("synthetic scenes: 256 val images")
    for name, value in direct.metrics.items():
        assert cli_metrics[name] == pytest.approx(value, abs=1e-6)
    # Chance: one of an image's 3 captions among 10 drawn from the 192.
    chance = 1 - math.prod((189 - i) / (192 - i) for i in range(10))
    assert direct.metrics["i2t_r10"] > beyond_chance(chance, 64)


def test_zero_shot_names_colours_well_above_chance(trained, colour_folder) -> None:
    result = evaluate(trained, {"type": "zeroshot", "data": str(colour_folder),
                                "templates": ["a {} shape.", "a small {} circle.", "a large {} square in the center."]})
    assert result.info["classes"] == 7 and result.info["images"] == 210
    assert result.metrics["top1"] > beyond_chance(1 / 7, 210)
    assert result.metrics["top5"] >= result.metrics["top1"]


@pytest.mark.parametrize("head", ["linear", "attentional"])
def test_frozen_probes_learn_colours(trained, colour_folder, head, tmp_path) -> None:
    before = {k: v.clone() for k, v in trained.model.image_tower().state_dict().items()}
    result = evaluate(trained, {"type": "probe", "data": str(colour_folder), "head": head, "steps": 150},
                      out_dir=tmp_path)
    assert result.metrics["top1"] > beyond_chance(1 / 7, result.info["test_images"]), result
    assert result.info["train_images"] + result.info["test_images"] == 210
    assert (tmp_path / "probe_head.safetensors").is_file()
    after = trained.model.image_tower().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fine_tuning_probe_trains_a_copy_of_the_encoder(trained, colour_folder) -> None:
    before = {k: v.clone() for k, v in trained.model.image_tower().state_dict().items()}
    result = evaluate(trained, {"type": "probe", "data": str(colour_folder), "finetune": True, "steps": 20,
                                "batch_size": 32, "lr": 3e-3})
    assert result.info["finetune"] and result.info["last_loss"] < result.info["first_loss"]
    assert result.metrics["top1"] > beyond_chance(1 / 7, result.info["test_images"])  # 20 steps
    after = trained.model.image_tower().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the loaded model is untouched


def test_multimodal_understanding_head_tells_matching_captions(run, tmp_path) -> None:
    config = run["dir"] / "config.yaml"  # the run's own resolved config: its data, its shapes
    for split, limit in (("train", "300"), ("val", "120")):
        made = run_main("data", "match-pairs", str(config), "--split", split, "--limit", limit,
                       "--out", str(tmp_path / split))
        assert made.code == 0, made.err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "val" / "pairs.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == {"yes", "no"} and (tmp_path / "val" / rows[0]["image"]).is_file()
    out = tmp_path / "result"
    result = run_main("eval", str(run["dir"]), "--task", "understanding", "--train-data",
                     str(tmp_path / "train" / "pairs.jsonl"), "--data", str(tmp_path / "val" / "pairs.jsonl"),
                     "--steps", "200", "--out", str(out), "--no-track")
    assert result.code == 0, result.err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    # Better than always answering the majority label, beyond what chance gives on this many rows.
    assert metrics["majority_baseline"] < 60, metrics
    assert metrics["accuracy"] > beyond_chance(metrics["majority_baseline"] / 100, len(rows)), metrics


def test_caption_and_embed_commands(run, trained, tmp_path) -> None:
    scenes = _single_object_scenes(3)
    paths = []
    for i, sample in enumerate(scenes):
        paths.append(tmp_path / f"scene{i}.png")
        sample.image.save(paths[-1])
    result = run_main("caption", str(run["dir"]), *map(str, paths), "--json", "-n", "2", "--strategy", "beam")
    assert result.code == 0, result.err[-2000:]
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, paths))
    assert all(len(line["captions"]) == 2 and all(line["captions"]) for line in lines)

    texts = tmp_path / "texts.txt"
    texts.write_text("a small red circle at the top.\na large blue square in the center.\n")
    for flag, values in (("--images", list(map(str, paths))), ("--texts", [str(texts)])):
        out = tmp_path / f"{flag[2:]}.safetensors"
        result = run_main("embed", str(run["dir"]), flag, *values, "--out", str(out))
        assert result.code == 0, result.err[-2000:]
        tensors = load_file(str(out))
        (name, embeds), = tensors.items()
        assert embeds.shape == (len(values) if flag == "--images" else 2, 128)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(embeds)))
    listed = json.loads((tmp_path / "texts.json").read_text())
    direct = trained.embed_texts(listed["texts"])
    assert_close(load_file(str(tmp_path / "texts.safetensors"))["text_embeds"], direct)


def test_load_by_mlflow_run_id_from_the_run_folder_or_the_logged_checkpoint(run, tmp_path, monkeypatch) -> None:
    by_id = load_trained(run["run_id"], tracking_uri=run["uri"])
    assert by_id.checkpoint.resolve() == (run["dir"] / "checkpoints" / "step_000300").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    moved = run["root"] / "moved-away"
    shutil.move(run["dir"], moved)  # the run folder is gone: the logged artifact is downloaded
    try:
        remote = load_trained(run["run_id"], tracking_uri=run["uri"])
        assert tmp_path / "cache" in remote.checkpoint.parents
        for a, b in zip(remote.model.state_dict().values(), by_id.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        shutil.move(moved, run["dir"])
    with pytest.raises(LoadError, match="not found at"):
        load_trained("0" * 32, tracking_uri=run["uri"])


def test_a_run_dir_tag_is_followed_only_to_the_runs_own_folder(run, tmp_path, monkeypatch) -> None:
    # Another run folder (a different run id in its tracking record) named by the tag is not loaded:
    # the logged checkpoint artifact is used instead.
    impostor = tmp_path / "impostor"
    shutil.copytree(run["dir"], impostor)
    record = json.loads((impostor / "tracking" / "run.json").read_text())
    (impostor / "tracking" / "run.json").write_text(json.dumps({**record, "run_id": "f" * 32}))
    MlflowClient(tracking_uri=run["uri"]).set_tag(run["run_id"], "vlframe.run_dir", str(impostor))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        loaded = load_trained(run["run_id"], tracking_uri=run["uri"])
        assert impostor not in loaded.checkpoint.parents and tmp_path / "cache" in loaded.checkpoint.parents
    finally:
        MlflowClient(tracking_uri=run["uri"]).set_tag(run["run_id"], "vlframe.run_dir", str(run["dir"].resolve()))


def test_eval_by_run_id_without_the_run_folder_logs_to_the_same_store(run, tmp_path) -> None:
    moved = run["root"] / "moved-for-eval"
    shutil.move(run["dir"], moved)
    try:
        result = run_main("eval", run["run_id"], "--tracking-uri", run["uri"], "--task", "retrieval", "--limit", "16",
                         "--out", str(tmp_path / "out"), env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    finally:
        shutil.move(moved, run["dir"])
    assert result.code == 0, result.err[-2000:]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    logged = MlflowClient(tracking_uri=run["uri"]).get_metric_history(run["run_id"], "eval/retrieval/i2t_r1")
    assert logged[-1].value == pytest.approx(saved["i2t_r1"]) and logged[-1].step == 300


def test_eval_by_run_id_honours_mlflow_tracking_uri(run, tmp_path) -> None:
    result = run_main("eval", run["run_id"], "--task", "retrieval", "--limit", "8", "--out", str(tmp_path / "out"),
                     env={"MLFLOW_TRACKING_URI": run["uri"]})
    assert result.code == 0, result.err[-2000:]
    assert f"at {run['uri']}" in result.out


def test_a_run_whose_data_is_gone_still_loads_and_asks_for_data(tmp_path) -> None:
    scenes = _single_object_scenes(24)
    (tmp_path / "data").mkdir()
    with (tmp_path / "data" / "train.jsonl").open("w") as handle:
        for i, sample in enumerate(scenes):
            sample.image.save(tmp_path / "data" / f"{i}.png")
            handle.write(json.dumps({"image": f"{i}.png", "captions": sample.captions}) + "\n")
    overrides = micro(tmp_path, **{"data.train": {"type": "manifest", "path": str(tmp_path / "data" / "train.jsonl")},
                                   "train.steps": 3, "train.checkpoint_every": None})
    config, registry = configfile.load(TINY, overrides)
    result = Trainer(config, registry, run_dir=tmp_path / "run").fit()
    shutil.rmtree(tmp_path / "data")
    trained = load_trained(result.checkpoint)
    assert trained.step == 3 and any("train.jsonl" in m for m in trained.missing_files)
    with pytest.raises(ConfigError, match="the run's data is not where its config says .*pass --data"):
        build_dataset(trained, None)
    assert len(build_dataset(trained, "synthetic")) > 0  # a registered dataset by name


def test_downstream_errors_name_what_is_wrong(run, tmp_path) -> None:
    result = run_main("eval", str(tmp_path / "nowhere"), "--task", "caption")
    assert result.code == 2 and "neither a run folder, a checkpoint folder nor a run id of the mlflow tracking sink" in result.err
    result = run_main("eval", str(run["dir"]), "--task", "zeroshot", "--no-track")
    assert result.code == 2 and "zero-shot needs a dataset with class names" in result.err
    result = run_main("eval", str(run["dir"]), "--task", "understanding")
    assert result.code == 2 and "data: required field is missing" in result.err
    result = run_main("eval", str(run["dir"]), "--task", "retrieval", "--head", "linear")
    assert result.code == 2 and "--head: task 'retrieval' has no setting 'head'" in result.err
    result = run_main("eval", str(run["dir"]), "--task", "captioning")
    assert result.code == 2 and "unknown task 'captioning' (did you mean 'caption'?)" in result.err
    result = run_main("caption", str(run["dir"]), str(tmp_path / "missing.png"))
    assert result.code == 2 and "missing.png: file not found" in result.err
    result = run_main("caption", str(run["dir"]), str(CONFIGS / "coca_tiny.yaml"), "--top-p", "2")
    assert result.code == 2 and "--top-p" in result.err
    assert all("Traceback" not in r for r in (result.err,))
