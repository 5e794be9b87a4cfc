"""The plugin conformance kit: contract checks any plugin package can run on its own components.

Each registered component is a :class:`Case` (kind, name, plugin). :func:`check` builds it from
its spec's ``example`` (or ``{"type": name}``, or a config you pass), then checks what the
engine relies on: the config validates, round-trips through ``model_dump`` and has a JSON-schema
entry; the built object follows its kind's protocol (:mod:`registry.protocols`); it runs on small
inputs with the shapes its protocol promises, honours padding masks, and every parameter gets a
gradient; a model's capabilities work (normalised embeddings, cached decoding equal to
uncached, ...). It returns the problems, one line each, naming the member or the shape.

In a plugin's own test suite::

    import pytest
    from vlframe import testing

    @pytest.mark.parametrize("case", testing.cases(distribution="my-plugins"), ids=str)
    def test_conforms(case):
        testing.assert_conforms(case)

From the command line: ``vlframe plugins check NAME`` (a component, ``KIND.NAME`` or a plugin).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from registry import BuildError, Catalog, ComponentConfig, Kind, Registry, VlframeError, one_line
from registry.protocols import Capability, Output, conformance_problems


@dataclass(frozen=True)
class Case:
    """One component to check."""

    kind: Kind
    name: str
    plugin: str
    distribution: str | None = None

    def __str__(self) -> str:
        return f"{self.kind.value}.{self.name}"


class Skipped(Exception):
    """The component cannot be checked without more input (say, a dataset's files)."""


def cases(registry: Registry | None = None, *, plugins: Iterable[str] | None = None,
          distribution: str | None = None, kinds: Iterable[Kind] | None = None) -> list[Case]:
    """The registered components, optionally only those of some plugins, a distribution (its name,
    as in ``pip show``) or some kinds."""
    registry = registry or Registry.discover()
    wanted_plugins = set(plugins) if plugins is not None else None
    wanted_kinds = set(kinds) if kinds is not None else None
    catalog = registry.catalog
    offered = [Case(e.kind, e.spec.name, e.plugin, e.distribution) for e in catalog.entries()]
    # Contested names and unusable specs are cases too: checking them reports why they cannot be used.
    offered += [Case(e.kind, e.spec.name, e.plugin, e.distribution) for es in catalog.contested().values() for e in es]
    dists = {info.name: info.distribution for info in registry.plugins()}
    offered += [Case(b.kind, b.name, b.plugin, dists.get(b.plugin)) for b in catalog.broken if b.name is not None]
    found = []
    for case in offered:
        if wanted_plugins is not None and case.plugin not in wanted_plugins:
            continue
        if distribution is not None and (case.distribution or "").split(" ")[0] != distribution:
            continue
        if wanted_kinds is not None and case.kind not in wanted_kinds:
            continue
        found.append(case)
    return found


def select(registry: Registry, names: Sequence[str]) -> list[Case]:
    """Cases by component name, ``KIND.NAME``, plugin or distribution name (all when ``names`` is empty)."""
    every = cases(registry)
    if not names:
        return every
    chosen: list[Case] = []
    for name in names:
        matches = [c for c in every if name in (c.name, str(c), c.plugin, (c.distribution or " ").split(" ")[0])]
        if not matches:
            known = sorted({c.name for c in every} | {c.plugin for c in every})
            from registry.errors import did_you_mean

            raise VlframeError(f"no component or plugin named '{name}'{did_you_mean(name, known)}")
        chosen += [c for c in matches if c not in chosen]
    return chosen


class CheckResult(list):
    """The problems of one component, one line each (empty: it conforms), with ``skipped`` (why
    it could not be checked, e.g. a dataset needing files; None when it was) and ``errors`` (the
    exceptions behind problems, for their tracebacks: ``vlframe --debug plugins check``)."""

    def __init__(self, problems: Iterable[str] = (), *, skipped: str | None = None,
                 errors: Iterable[BaseException] = ()) -> None:
        super().__init__(problems)
        self.skipped = skipped
        self.errors = list(errors)


def check(registry: Registry | None, case: Case, *, config: Mapping[str, Any] | None = None) -> CheckResult:
    """The problems of one component (empty: it conforms). ``config`` replaces the spec's example.

    A component that cannot be built from what is known (a dataset needing files, with no
    example) is ``skipped``, saying why.
    """
    registry = registry or Registry.discover()
    catalog = registry.catalog
    try:
        entry = catalog.get(case.kind, case.name)
    except VlframeError as exc:  # contested, or its spec unusable
        return CheckResult([str(exc)], errors=[exc])
    block = dict(config if config is not None else (entry.spec.example or {"type": case.name}))
    block.setdefault("type", case.name)
    result = CheckResult()
    try:
        cfg = catalog.validate(entry.spec.config, block)
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
        if missing and config is None and entry.spec.example is None:
            return CheckResult(skipped=f"its config needs {', '.join(missing)}; give the spec an example or pass --config")
        from vlframe.config.files import problems_from

        return CheckResult([f"config {block}: " + "; ".join(map(str, problems_from(exc, entry.spec.config, block,
                                                                                   catalog, None)))], errors=[exc])
    result += _config_round_trip(catalog, entry.spec.config, cfg, case)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result += CHECKS[case.kind](catalog, cfg, case)
    except Skipped as exc:
        result.skipped = str(exc)
    except VlframeError as exc:
        result.append(str(exc))
        result.errors.append(exc)
    except Exception as exc:  # noqa: BLE001 - a plugin's failure is the finding
        result.append(one_line(exc, hint=False))
        result.errors.append(exc)
    return result


def assert_conforms(case: Case, registry: Registry | None = None, *, config: Mapping[str, Any] | None = None) -> None:
    """``check`` for pytest: fails listing the problems (and skips, saying why, when it must)."""
    result = check(registry, case, config=config)
    if result.skipped and not result:
        import pytest

        pytest.skip(f"{case}: {result.skipped}")
    assert not result, f"{case} does not conform:\n" + "\n".join(result)


# -- shared checks ------------------------------------------------------------------------------


def _config_round_trip(catalog: Catalog, config_class: type, cfg: ComponentConfig, case: Case) -> list[str]:
    from vlframe.config.schema import config_schema

    problems = []
    dumped = cfg.model_dump(mode="json")
    try:
        again = catalog.validate(config_class, dumped)
        if again != cfg:
            problems.append("config: model_dump() does not validate back to the same config")
    except ValidationError as exc:
        problems.append(f"config: its own model_dump() does not validate ({exc.errors()[0]['msg']})")
    schema = config_schema(catalog)
    if f"{case.kind.value}.{case.name}" not in schema.get("$defs", {}):
        problems.append("config: no entry in the JSON schema (vlframe config schema)")
    return problems


def _gradients(module: nn.Module, what: str) -> list[str]:
    """Parameters that got no gradient (or a non-finite one) after a backward."""
    problems = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            problems.append(f"{what}: parameter {name} got no gradient")
        elif not torch.isfinite(param.grad).all():
            problems.append(f"{what}: parameter {name} has a non-finite gradient")
    return problems


def _shape(t: Any, expected: tuple[int, ...], what: str) -> list[str]:
    if not isinstance(t, Tensor):
        return [f"{what}: returned {type(t).__name__}, not a tensor"]
    if tuple(t.shape) != expected:
        return [f"{what}: shape {tuple(t.shape)}, expected {expected}"]
    if t.is_floating_point() and not torch.isfinite(t).all():
        return [f"{what}: non-finite values"]
    return []


def _close(a: Tensor, b: Tensor, what: str, tol: float = 1e-4) -> list[str]:
    diff = (a.float() - b.float()).abs().max().item()
    return [] if diff <= tol * max(1.0, b.float().abs().max().item()) else [f"{what} (max difference {diff:.2e})"]


def _build(cat: Catalog, kind: Kind, cfg: ComponentConfig, **kwargs: Any) -> Any:
    return cat.build(kind, cfg, path=f"check {kind.value}.{cfg.type}", **kwargs)


def _text(n: int, length: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Token ids BOS(1) ... EOS(2) with ragged lengths and the mask (row 1 has padding)."""
    text = torch.randint(3, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.bool)
    for i in range(n):
        stop = length if i % 2 == 0 else max(3, length - 3)
        text[i, 0], text[i, stop - 1] = 1, 2
        text[i, stop:] = 0
        mask[i, stop:] = False
    return text, mask


# -- per kind -----------------------------------------------------------------------------------


def _image_encoder(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    encoder = _build(catalog, Kind.IMAGE_ENCODER, cfg)
    size = int(encoder.image_size)
    tokens = encoder(torch.randn(2, 3, size, size))
    problems = []
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[0] != 2 or tokens.shape[2] != encoder.width:
        return [f"forward: expected tokens (2, N, width={encoder.width}), got "
                f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"]
    if not 0 <= int(encoder.num_prefix_tokens) < tokens.shape[1]:
        problems.append(f"num_prefix_tokens {encoder.num_prefix_tokens} is not below the {tokens.shape[1]} tokens")
    tokens.float().square().mean().backward()
    return problems + _gradients(encoder, "backward")


def _text_decoder(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    vocab, context = 64, 12
    decoder = _build(catalog, Kind.TEXT_DECODER, cfg, vocab_size=vocab, context_length=context, with_embedding=True)
    text, mask = _text(2, 8, vocab)
    states, embedding = decoder(text, mask)
    problems = _shape(states, (2, 8, decoder.width), "forward states") + _shape(embedding, (2, decoder.width),
                                                                                "forward embedding")
    if problems:
        return problems
    other = text.clone()
    other[~mask] = 7  # other tokens where the mask says padding
    states2, embedding2 = decoder(other, mask)
    problems += _close(states2[mask], states[mask], "padding tokens change the real tokens' states")
    problems += _close(embedding2, embedding, "padding tokens change the text embedding")
    (states.float().square().mean() + embedding.float().square().mean()).backward()
    problems += _gradients(decoder, "backward")
    with torch.no_grad():
        plain, none = decoder(text, mask, embed=False)
        if none is not None:
            problems.append("forward(embed=False): returned an embedding")
        problems += _incremental(lambda part, cache: decoder(part, None, embed=False, cache=cache)[0],
                                 lambda: decoder(text[:1], None, embed=False)[0], text[:1], "text decoder")
    return problems


def _incremental(step: Callable[[Tensor, Any], Tensor], whole: Callable[[], Tensor], inputs: Tensor,
                 what: str) -> list[str]:
    """Feeding ``inputs`` one position at a time through a KVCache gives the states of the whole
    sequence at once (the caller advances ``cache.offset``, as a model does). A component that
    cannot decode incrementally raises NotImplementedError and is not held to it."""
    from vlframe.nn.cache import KVCache

    cache = KVCache()
    try:
        parts = []
        for i in range(inputs.shape[1]):
            parts.append(step(inputs[:, i : i + 1], cache))
            cache.offset += 1
    except NotImplementedError:
        return []
    return _close(torch.cat(parts, dim=1), whole(), f"{what}: states with a KVCache differ from without", tol=1e-4)


def _pooler(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    pooler = _build(catalog, Kind.POOLER, cfg, in_dim=16, out_dim=16, num_prefix_tokens=1)
    tokens = torch.randn(2, 7, 16, requires_grad=True)
    out = pooler(tokens)
    if not isinstance(out, Tensor) or out.ndim != 3 or out.shape[0] != 2 or out.shape[2] != pooler.out_dim:
        return [f"forward: expected (2, M, out_dim={pooler.out_dim}), got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"]
    problems = []
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    masked = pooler(tokens, mask)
    changed = tokens.detach().clone()
    changed[1, 5:] += 3.0
    again = pooler(changed, mask)
    if masked.shape[1] == tokens.shape[1]:  # tokens passed through: only the real ones must stay
        problems += _close(again[1, :5], masked[1, :5].detach(), "masked tokens change the real tokens' outputs")
    else:
        problems += _close(again[1], masked[1].detach(), "masked tokens change the pooled output")
    out.float().square().mean().backward()
    return problems + _gradients(pooler, "backward")


def _multimodal_decoder(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    decoder = _build(catalog, Kind.MULTIMODAL_DECODER, cfg, in_dim=16, context_dim=12)
    states, context = torch.randn(2, 6, 16), torch.randn(2, 5, 12)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = decoder(states, mask, context)
    problems = _shape(out, (2, 6, decoder.width), "forward")
    if problems:
        return problems
    changed = states.clone()
    changed[1, 4:] += 3.0  # other values where the mask says padding
    problems += _close(decoder(changed, mask, context)[1, :4], out[1, :4].detach(),
                       "padding positions change the real positions' states")
    out.float().square().mean().backward()
    problems += _gradients(decoder, "backward")
    with torch.no_grad():
        first = [True]

        def step(part: Tensor, cache: Any) -> Tensor:
            given = context[:1] if first[0] else None  # the context is projected once, at the first call
            first[0] = False
            return decoder(part, None, given, cache=cache)

        problems += _incremental(step, lambda: decoder(states[:1], None, context[:1]), states[:1],
                                 "multimodal decoder")
    return problems


def _objective(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    objective = _build(catalog, Kind.OBJECTIVE, cfg)
    requires = set(getattr(type(cfg), "requires", ()))
    vocab = 32
    text, mask = _text(4, 6, vocab)
    leaves = {
        Output.IMAGE_EMBEDS: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True),
        Output.TEXT_EMBEDS: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True),
        Output.CAPTION_STATES: torch.randn(4, 6, 16, requires_grad=True),
    }
    head = nn.Linear(16, vocab)
    outputs: dict[str, Any] = {Output.TEXT: text, Output.TEXT_MASK: mask, Output.LM_HEAD: head, **leaves}
    outputs[Output.LOGITS] = head(leaves[Output.CAPTION_STATES])
    unknown = sorted(requires - set(outputs))
    if unknown:
        raise Skipped(f"it requires {', '.join(unknown)}, outputs the kit does not know how to make")
    loss = objective(outputs)
    problems = _shape(loss, (), "forward (a scalar loss)")
    if problems:
        return problems
    loss.backward()
    fed = [name for name in leaves if name in requires]
    if fed and all(leaves[n].grad is None for n in fed) and head.weight.grad is None:
        problems.append(f"backward: no gradient reaches the outputs it reads ({', '.join(fed)})")
    report = getattr(objective, "metrics", None)
    if report is not None:
        try:
            values = {k: float(v) for k, v in report().items()}
        except Exception as exc:  # noqa: BLE001
            problems.append(f"metrics(): {one_line(exc, hint=False)}")
        else:
            problems += [f"metrics(): {k} is not finite" for k, v in values.items() if v != v or abs(v) == float("inf")]
    return problems + _gradients(objective, "backward")


def _head(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    embedding = nn.Embedding(8, 16)
    head = _build(catalog, Kind.HEAD, cfg, in_dim=16, out_dim=8, tie_to=embedding)
    out = head(torch.randn(2, 3, 16))
    problems = _shape(out, (2, 3, 8), "forward")
    if problems:
        return problems
    out.float().square().mean().backward()
    return problems + _gradients(head, "backward")


def _model(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    model = _build(catalog, Kind.MODEL, cfg, catalog=catalog)
    problems: list[str] = []
    size, context = int(model.image_size), int(model.context_length)
    images = torch.randn(2, 3, size, size)
    text, mask = _text(2, min(context, 8), int(getattr(cfg, "vocab_size", 64)))
    out = model(images, text, mask)
    problems += _shape(getattr(out, "loss", None), (), "forward loss")
    losses = getattr(out, "losses", {})
    if set(losses) != set(model.objectives.keys()):
        problems.append(f"forward losses {sorted(losses)} differ from its objectives {sorted(model.objectives.keys())}")
    if problems:
        return problems
    out.loss.backward()
    problems += _gradients(model, "backward (a part no objective trains?)")
    names = {name for name, _ in model.named_parameters()}
    spared = set(model.no_weight_decay())
    problems += [f"no_weight_decay(): {name} is not a parameter" for name in sorted(spared - names)]
    with torch.device("meta"):  # train.parallel: fsdp builds it so, then resets every part
        meta = _build(catalog, Kind.MODEL, cfg, catalog=catalog)
    missing = uninitialised(meta)
    if missing:
        problems.append(f"built on the meta device (train.parallel: fsdp), no reset_parameters() initialises "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    modules = {id(m) for m in model.modules()}
    blocks = model.blocks()
    if any(id(b) not in modules for b in blocks):
        problems.append("blocks(): returns modules that are not part of the model")
    model.eval()
    with torch.no_grad():
        if Capability.CONTRASTIVE in model.capabilities:
            image, txt = model.encode_image(images), model.encode_text(text, mask)
            dim = int(model.embed_dim)
            problems += _shape(image, (2, dim), "encode_image") + _shape(txt, (2, dim), "encode_text")
            if not problems:
                problems += _close(image.norm(dim=-1), torch.ones(2), "encode_image is not L2-normalised")
                problems += _close(txt.norm(dim=-1), torch.ones(2), "encode_text is not L2-normalised")
        if Capability.CAPTIONING in model.capabilities:
            problems += _cached_decoding(model, images, text)
        if Capability.IMAGE_TOKENS in model.capabilities:
            tokens = model.image_tokens(images)
            if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[2] != model.image_token_dim:
                problems.append(f"image_tokens: expected (2, N, image_token_dim={model.image_token_dim})")
            if not isinstance(model.image_tower(), nn.Module):
                problems.append("image_tower(): not an nn.Module")
        if Capability.MULTIMODAL_STATES in model.capabilities:
            states, smask = model.multimodal_states(images, text, mask)
            if not isinstance(states, Tensor) or tuple(states.shape[:2]) != tuple(text.shape):
                problems.append(f"multimodal_states: expected (2, {text.shape[1]}, D) states")
            if not isinstance(smask, Tensor) or tuple(smask.shape) != tuple(text.shape):
                problems.append("multimodal_states: the mask is not (B, L)")
    return problems


def _cached_decoding(model: nn.Module, images: Tensor, text: Tensor) -> list[str]:
    """Logits with a key/value cache, fed one token at a time, equal those of the whole prefix."""
    from vlframe.nn.cache import KVCache

    context = model.caption_context(images)
    tokens = text[:, :5].clone()
    tokens[:, 1:] = tokens[:, 1:].clamp_min(3)  # no padding inside the prefix
    whole = model.caption_logits(tokens, context)
    if not isinstance(whole, Tensor) or whole.ndim != 3 or tuple(whole.shape[:2]) != tuple(tokens.shape):
        return [f"caption_logits: expected (2, {tokens.shape[1]}, vocabulary)"]
    cache = KVCache()
    steps = [model.caption_logits(tokens[:, :1], context, cache)]
    for i in range(1, tokens.shape[1]):
        steps.append(model.caption_logits(tokens[:, i : i + 1], context, cache))
    cached = torch.cat(steps, dim=1)
    problems = _close(cached, whole, "caption_logits with a KVCache differ from without", tol=1e-3)
    if cache.offset != tokens.shape[1]:
        problems.append(f"caption_logits: the cache offset is {cache.offset} after {tokens.shape[1]} tokens")
    return problems


def _tokenizer(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    captions = ["a small red circle at the top left.", "two shapes: a large blue square and a green cross.",
                "a yellow triangle in the center.", "there is a black diamond on the right."] * 20
    vocab = 49408  # the model's vocabulary, an upper bound: room for CLIP's fixed 49,408 tokens
    tokenizer = _build(catalog, Kind.TOKENIZER, cfg, vocab_size=vocab)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        if not tokenizer.trained:
            tokenizer.train(captions, Path(tmp))
            if not tokenizer.trained:
                return ["train(): the tokenizer is still not trained afterwards"]
        ids, mask = tokenizer.encode(captions[:2], 16)
        if not (isinstance(ids, Tensor) and isinstance(mask, Tensor) and ids.dtype == torch.long
                and mask.dtype == torch.bool and ids.shape == mask.shape and ids.shape[0] == 2):
            return ["encode(): expected (ids (2, L) long, mask (2, L) bool)"]
        if ids.shape[1] > 16:
            problems.append(f"encode(): {ids.shape[1]} tokens exceed the context length 16")
        if not (ids[:, 0] == tokenizer.bos_id).all():
            problems.append("encode(): texts do not start with bos_id")
        for row, row_mask in zip(ids, mask):
            real = row[row_mask]
            if len(real) == 0 or real[-1].item() != tokenizer.eos_id:
                problems.append("encode(): a text does not end with eos_id")
            if not (row[~row_mask] == tokenizer.pad_id).all():
                problems.append("encode(): positions the mask marks as padding do not hold pad_id")
        if int(ids.max()) >= tokenizer.vocab_size:
            problems.append(f"encode(): id {int(ids.max())} is not below vocab_size {tokenizer.vocab_size}")
        text = tokenizer.decode(ids[0])
        if not isinstance(text, str) or "red" not in text.lower():
            problems.append(f"decode(): {text!r} does not give back the text")
        saved = tokenizer.save(Path(tmp) / "saved")
        if not Path(saved).is_file():
            problems.append("save(): returned no file")
        elif hasattr(cfg, "path"):
            again = _build(catalog, Kind.TOKENIZER, cfg.model_copy(update={"path": Path(saved)}), vocab_size=vocab)
            if not torch.equal(again.encode(captions[:2], 16)[0], ids):
                problems.append("save() and loading the saved file give other ids")
    return problems


def _dataset(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    from vlframe.data.samples import Sample, SampleError

    problems = []
    for split in ("train", "val"):
        try:
            dataset = _build(catalog, Kind.DATASET, cfg, split=split)
        except BuildError as exc:
            if split == "train":
                return [str(exc)]
            continue  # a dataset may offer one split only
        if not isinstance(dataset.describe(), str):
            problems.append("describe(): not a string")
        first = next(iter(dataset.captions()), None)
        if first is not None and not isinstance(first, str):
            problems.append("captions(): yields something other than strings")
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            items = []
            for i in range(min(len(dataset), 8)):
                try:
                    items.append(dataset[i])
                except SampleError:
                    continue
        elif getattr(dataset, "streaming", False) is True:
            items = [item for _, item in zip(range(8), dataset.stream(0, 1, 0, 0)) if not isinstance(item, SampleError)]
        else:
            items = [item for _, item in zip(range(8), iter(dataset)) if not isinstance(item, SampleError)]
        if not items:
            problems.append(f"{split}: no usable sample among the first 8")
        for item in items[:2]:
            if not isinstance(item, Sample):
                problems.append(f"{split}: a sample is a {type(item).__name__}, not vlframe.sdk.Sample")
            elif not item.captions or not all(isinstance(c, str) and c for c in item.captions):
                problems.append(f"{split}: a sample has no non-empty captions")
            elif not hasattr(item.image, "size"):
                problems.append(f"{split}: a sample's image is not a PIL image")
    return problems


def _importer(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    from vlframe.config import files as configfile

    importer = _build(catalog, Kind.IMPORTER, cfg)
    architectures = list(importer.architectures)
    if not architectures:
        return ["architectures: empty"]
    from vlframe.config.root import VlframeConfig

    try:
        data = importer.config(architectures[0])
        catalog.validate(VlframeConfig, data)
    except (VlframeError, ValueError) as exc:
        lines = [str(p) for p in configfile.problems_from(exc, VlframeConfig, data, catalog, None)] \
            if isinstance(exc, ValidationError) else [str(exc)]
        return [f"config({architectures[0]!r}) is not a valid vlframe config: {'; '.join(lines)}"]
    return []


def _task(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    requires = getattr(type(cfg), "requires", None)
    problems = []
    if not isinstance(requires, frozenset) or not all(isinstance(c, str) for c in requires):
        problems.append("config: requires is not a frozenset of capability names")
    _build(catalog, Kind.TASK, cfg)  # conforms (has run) or raises
    return problems


class _Toy(nn.Module):
    """The smallest model the contract allows (two blocks and a head), for checking strategies."""

    image_size, context_length, pad_id = 4, 4, 0
    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 1)
        self.objectives = nn.ModuleDict()

    def forward(self, images: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Any:
        from types import SimpleNamespace

        x = images.flatten(1)[:, :8]
        for layer in self.layers:
            x = torch.tanh(layer(x))
        loss = self.head(x).square().mean()
        return SimpleNamespace(loss=loss, losses={"toy": loss})

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def no_weight_decay(self) -> set[str]:
        return set()


def _parallel(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    """In this process (world size 1): spread a toy model, take an optimiser step, evaluate, save,
    and load into a fresh copy; a process group the strategy made is left again."""
    import torch.distributed as dist

    from vlframe.runtime import distributed

    problems = []
    if not isinstance(getattr(type(cfg), "default", False), bool):
        problems.append("config: default is not a boolean")
    had_group = dist.is_available() and dist.is_initialized()
    try:
        strategy = _build(catalog, Kind.PARALLEL, cfg)
        device = strategy.setup()
        prepared: list[nn.Module] = []

        def build(where: Any) -> nn.Module:
            with torch.device(where) if where is not None else contextlib.nullcontext():
                return _Toy()

        torch.manual_seed(0)
        model = strategy.parallelize(build, prepared.append, device=device, seed=0, precision="fp32")
        if len(prepared) != 1:
            problems.append(f"parallelize: called prepare {len(prepared)} times, not once (per-block compile and "
                            "checkpointing never happen)")
        if strategy.module is None:
            return [*problems, "parallelize: module (what the forward calls) is still None"]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        images, text = torch.randn(4, 3, 4, 4, device=device), torch.zeros(4, 4, dtype=torch.long, device=device)
        with strategy.accumulating(True):
            strategy.module(images, text).loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(strategy.clip_grad_norm(params, 1e-3))
        if not norm > 0:
            problems.append(f"clip_grad_norm: returned {norm}, not the gradients' norm")
        optimizer.step()
        if strategy.nonfinite(model) != []:
            problems.append(f"nonfinite: names {strategy.nonfinite(model)} of a finite model")
        if strategy.evaluate(lambda: 42) != 42:
            problems.append("evaluate: does not return the evaluation's result (on rank 0)")
        with tempfile.TemporaryDirectory() as folder:
            entries = strategy.save(Path(folder), model, optimizer)
            if not isinstance(entries, dict):
                problems.append(f"save: returned a {type(entries).__name__}, not the state entries (a dict)")
            from vlframe.runs import checkpoint

            checkpoint.write_state(Path(folder), {"step": 1, **(entries or {})})
            fresh = strategy.parallelize(build, lambda m: None, device=device, seed=1, precision="fp32")
            strategy.load(Path(folder), fresh, None, checkpoint.read_state(Path(folder)))
            saved = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
            loaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in fresh.state_dict().items()}
            if saved.keys() != loaded.keys() or any(not torch.equal(saved[k], loaded[k]) for k in saved):
                problems.append("save then load: the weights that come back differ from those saved")
    finally:
        if not had_group:
            distributed.teardown()
    return problems


def _tracking_sink(catalog: Catalog, cfg: ComponentConfig, case: Case) -> list[str]:
    """Build the sink; where its config offers a scratch URI (``example_uri``), open a run there,
    deliver one event of each kind (twice: delivery is at least once), and read the run back."""
    schemes = getattr(type(cfg), "schemes", None)
    if not isinstance(schemes, frozenset) or not schemes or not all(isinstance(s, str) for s in schemes):
        return ["config: schemes is not a non-empty frozenset of URI schemes"]
    problems: list[str] = []
    for entry in catalog.entries(Kind.TRACKING_SINK):  # a URI must choose one sink
        shared = sorted(schemes & entry.spec.config.schemes) if entry.spec.name != case.name else []
        if shared:
            problems.append(f"schemes: {', '.join(s or '(a path)' for s in shared)} also served by tracking sink "
                            f"'{entry.spec.name}' [{entry.plugin}]: URIs of that scheme would choose neither")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        uri = type(cfg).example_uri(folder / "store")
        if uri is None:  # only built: the kit cannot know where this sink may write
            return problems
        sink = _build(catalog, Kind.TRACKING_SINK, cfg, uri=uri, timeout_s=30.0)
        if getattr(sink, "uri", None) != uri:
            problems.append(f"uri: {getattr(sink, 'uri', None)!r}, not the {uri!r} it was built for")
        (folder / "note.txt").write_text("an artifact")
        run_id, _ = sink.create_run("kit", "check", "local-1", 1_700_000_000_000)
        if sink.create_run("kit", "check", "local-1", 1_700_000_000_000)[0] != run_id:
            problems.append("create_run: a second call with the same local_id opened another run")
        events = [{"kind": "param", "key": "p", "value": "1"}, {"kind": "tag", "key": "t", "value": "v"},
                  {"kind": "metric", "key": "m", "value": 0.5, "step": 1, "timestamp": 1_700_000_000_001},
                  {"kind": "metric", "key": "m", "value": 0.25, "step": 2, "timestamp": 1_700_000_000_002},
                  {"kind": "artifact", "path": str(folder / "note.txt"), "artifact_path": "notes",
                   "timestamp": 1_700_000_000_003},
                  {"kind": "status", "status": "FINISHED", "timestamp": 1_700_000_000_004}]
        for _ in range(2):
            done = list(sink.deliver(run_id, events))
            if not done or done[-1] != len(events):
                problems.append(f"deliver: yielded {done}, not counts ending at {len(events)}")
        run = sink.get_run(run_id)
        if (run.run_id, dict(run.params), run.tags.get("t"), run.metrics.get("m"), run.status) != (
                run_id, {"p": "1"}, "v", 0.25, "FINISHED"):
            problems.append(f"get_run: {run} is not the run delivered (param p=1, tag t=v, metric m=0.25 at step 2, "
                            "FINISHED)")
        if [r.run_id for r in sink.find_runs("kit", {"t": "v"})] != [run_id]:
            problems.append("find_runs: does not find the run by its experiment and tag")
        if sink.find_runs("kit", {"t": "other"}):
            problems.append("find_runs: finds a run whose tag differs")
        if not sink.run_exists(run_id):
            problems.append("run_exists: says no for the run just made")
        (folder / "back").mkdir()
        got = sink.download(run_id, "notes/note.txt", folder / "back")
        if not Path(got).is_file() or Path(got).read_text() != "an artifact":
            problems.append(f"download: {got} is not the artifact delivered")
        try:
            sink.get_run("0" * 32)
            problems.append("get_run: no LookupError for a run that does not exist")
        except LookupError:
            pass
    return problems


#: The check of each kind: ``_<kind value>`` (a kind without one fails here, at import).
CHECKS: dict[Kind, Callable[[Catalog, ComponentConfig, Case], list[str]]] = {
    kind: globals()[f"_{kind.value}"] for kind in Kind}



def uninitialised(model: nn.Module) -> list[str]:
    """The parameters of a meta-built ``model`` that no ``reset_parameters()`` initialises (the
    model is materialised on the CPU, whole, for the check)."""
    import math

    from vlframe.nn.model import reset_all_parameters

    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    state = torch.random.get_rng_state()
    try:
        reset_all_parameters(model)
    finally:
        torch.random.set_rng_state(state)
    return [name for name, p in model.named_parameters() if bool(torch.isnan(p).any())]


__all__ = ["Case", "CheckResult", "assert_conforms", "cases", "check", "conformance_problems", "select", "uninitialised"]
