"""The conformance kit (vlframe.testing) over every built-in component, and against components that
break the contract on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import Tensor, nn

from registry import BuildError, ComponentConfig, ComponentSpec, Kind, Registry, hookimpl
from registry.protocols import Pooler, conformance_problems, protocol_members
from vlframe import build_model, testing

from conftest import CONFIGS, run_main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict]:
    """Configs for the built-ins that read files: a manifest, COCO captions, an ImageFolder, shards."""
    from vlframe.interchange.shard_writer import write_shards
    from vlframe_builtins.datasets.synthetic import SyntheticConfig, SyntheticScenes

    root = tmp_path_factory.mktemp("data")
    scenes = SyntheticScenes(SyntheticConfig(type="synthetic", val_size=12, max_objects=1, image_size=48), split="val")
    (root / "images").mkdir()
    lines, coco = [], {"images": [], "annotations": []}
    for i in range(len(scenes)):
        sample = scenes[i]
        sample.image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "captions": sample.captions}))
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"] += [{"image_id": i, "caption": c} for c in sample.captions]
        folder = root / "classes" / sample.meta["objects"][0]["color"]
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"{i}.png")
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "captions.json").write_text(json.dumps(coco))
    write_shards(scenes, root / "shards", shard_size=5)
    pairs = "".join(json.dumps({"image": f"images/{i}.png", "text": "a shape.", "label": "yes"}) + "\n" for i in range(4))
    (root / "pairs.jsonl").write_text(pairs)
    return {
        "dataset.manifest": {"type": "manifest", "path": str(root / "train.jsonl")},
        "dataset.coco": {"type": "coco", "annotations": str(root / "captions.json"), "images": str(root / "images")},
        "dataset.imagefolder": {"type": "imagefolder", "root": str(root / "classes")},
        "dataset.shards": {"type": "shards", "urls": sorted(str(p) for p in (root / "shards").glob("*.tar"))},
        "task.understanding": {"type": "understanding", "data": str(root / "pairs.jsonl"),
                               "train_data": str(root / "pairs.jsonl")},
    }


BUILTINS = testing.cases(Registry.discover(), distribution="vlframe")


def test_every_kind_has_built_ins_to_check() -> None:
    assert {case.kind for case in BUILTINS} == set(Kind)


@pytest.mark.parametrize("case", BUILTINS, ids=str)
def test_every_built_in_component_conforms(case: testing.Case, files: dict, registry: Registry) -> None:
    problems = testing.check(registry, case, config=files.get(str(case)))
    assert problems == [], problems


# -- components that break the contract ----------------------------------------------------------


class _Cfg(ComponentConfig):
    width: int = Field(8, gt=0)


class NoOutDim(nn.Module):
    """A pooler that forgets to say how wide its output is."""

    def __init__(self, cfg: _Cfg, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(tokens[:, :1])


class WrongShape(nn.Module):
    """A pooler whose output does not have the width it claims."""

    def __init__(self, cfg: _Cfg, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim + 1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(tokens).mean(dim=1, keepdim=True)


class IdleParameter(nn.Module):
    """A pooler with a parameter nothing uses (it would never learn)."""

    def __init__(self, cfg: _Cfg, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self.forgotten = nn.Parameter(torch.zeros(3))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(tokens[:, :1])


class ForgetsTheCache(nn.Module):
    """A text decoder that takes a KVCache and ignores it: positions restart at every call."""

    def __init__(self, cfg: _Cfg, *, vocab_size: int, context_length: int, with_embedding: bool) -> None:
        super().__init__()
        from vlframe.sdk import Block

        self.width = cfg.width
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(context_length, cfg.width))
        self.block = Block(cfg.width, 2, 2 * cfg.width, causal=True)
        self.out = nn.Linear(cfg.width, cfg.width)

    def forward(self, tokens: Tensor, mask: Tensor | None, *, embed: bool = True, cache=None):
        x = self.block(self.token_embedding(tokens) + self.pos[: tokens.shape[1]], mask)  # cache ignored
        return x, (self.out(x[:, 0]) if embed else None)


def _loss_of(outputs):  # an objective that is a plain function, not a module
    return outputs["text_embeds"].sum()


class _Broken:
    @hookimpl
    def vlframe_poolers(self) -> list[ComponentSpec]:
        return [ComponentSpec("no_out_dim", _Cfg, NoOutDim, "Forgets out_dim."),
                ComponentSpec("wrong_shape", _Cfg, WrongShape, "Says one width, returns another."),
                ComponentSpec("idle_parameter", _Cfg, IdleParameter, "Has a parameter that gets no gradient.")]

    @hookimpl
    def vlframe_text_decoders(self) -> list[ComponentSpec]:
        return [ComponentSpec("forgets_cache", _Cfg, ForgetsTheCache, "Ignores the KVCache it is given.")]

    @hookimpl
    def vlframe_objectives(self) -> list[ComponentSpec]:
        from registry import ObjectiveConfig

        class FnCfg(ObjectiveConfig):
            requires = frozenset({"text_embeds"})

        return [ComponentSpec("plain_function", FnCfg, lambda cfg: _loss_of, "A function, not a module.")]


@pytest.fixture(scope="module")
def broken() -> Registry:
    return Registry.discover(plugins=[_Broken()])


def test_the_protocols_list_their_members() -> None:
    assert protocol_members(Pooler) == ["__call__", "out_dim"]
    assert conformance_problems(Kind.POOLER, object()) == [
        "is a object, not a torch.nn.Module (it becomes part of a model)",
        "lacks __call__, out_dim (registry.protocols.Pooler)"]


def test_a_non_conforming_component_fails_naming_the_member(broken: Registry) -> None:
    case = testing.Case(Kind.POOLER, "no_out_dim", "_Broken")
    (problem,) = testing.check(broken, case)
    assert "the built pooler lacks out_dim (registry.protocols.Pooler)" in problem
    assert "pooler 'no_out_dim' [_Broken]" in problem
    (problem,) = testing.check(broken, testing.Case(Kind.POOLER, "wrong_shape", "_Broken"))
    assert problem == "forward: expected (2, M, out_dim=16), got (2, 1, 17)"
    (problem,) = testing.check(broken, testing.Case(Kind.POOLER, "idle_parameter", "_Broken"))
    assert problem == "backward: parameter forgotten got no gradient"
    with pytest.raises(AssertionError, match="parameter forgotten got no gradient"):
        testing.assert_conforms(testing.Case(Kind.POOLER, "idle_parameter", "_Broken"), broken)
    problems = testing.check(broken, testing.Case(Kind.TEXT_DECODER, "forgets_cache", "_Broken"))
    assert [p.split(" (max")[0] for p in problems] == ["text decoder: states with a KVCache differ from without"]
    (problem,) = testing.check(broken, testing.Case(Kind.OBJECTIVE, "plain_function", "_Broken"))
    assert "the built objective is a function, not a torch.nn.Module" in problem


def test_contested_names_are_cases_that_say_how_to_choose(broken: Registry) -> None:
    from test_registry import _DuplicatePooler

    reg = Registry.discover(plugins=[_DuplicatePooler()])
    cases = [c for c in testing.select(reg, ["attentional"])]
    assert {c.plugin for c in cases} == {"poolers", "_DuplicatePooler"}
    for case in cases:
        (problem,) = testing.check(reg, case)
        assert "is registered twice" in problem and "plugins.override: {pooler.attentional: PLUGIN}" in problem


def test_building_a_model_with_a_non_conforming_part_is_a_one_line_error(broken: Registry) -> None:
    with pytest.raises(BuildError) as err:
        build_model(CONFIGS / "coca_tiny.yaml", ["model.caption_pooler={type: no_out_dim}"], registry=broken)
    assert str(err.value) == ("model.caption_pooler (pooler 'no_out_dim' [_Broken]): the built pooler lacks out_dim "
                              "(registry.protocols.Pooler)")


def test_plugins_check_from_the_command_line(tmp_path: Path) -> None:
    result = run_main("plugins", "check", "poolers", "model.coca")
    assert result.code == 0, result.out + result.err
    assert "ok   pooler attentional [poolers]" in result.out and "ok   model coca [models.coca]" in result.out
    assert "5 of 5 component(s) conform, 0 do not, 0 skipped" in result.out
    result = run_main("plugins", "check", "manifest")
    assert result.code == 0 and "skip dataset manifest [datasets.manifest]: its config needs path" in result.out
    block = tmp_path / "vit.yaml"
    block.write_text("type: vit\nimage_size: 32\npatch_size: 8\nwidth: 24\nlayers: 1\nheads: 5\n")
    result = run_main("plugins", "check", "vit", "--config", str(block))
    assert result.code == 2 and "FAIL image_encoder vit [encoders.vit]: config" in result.out
    assert "5 heads do not divide width 24" in result.out and "Traceback" not in result.err
    debug = run_main("--debug", "plugins", "check", "vit", "--config", str(block))  # the traceback behind the line
    assert debug.code == 2 and "Traceback (most recent call last)" in debug.err and "ValidationError" in debug.err
    result = run_main("plugins", "check", "vitt")
    assert result.code == 2 and "no component or plugin named 'vitt' (did you mean 'vit'?)" in result.err
