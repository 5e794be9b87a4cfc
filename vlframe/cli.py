"""The ``vlframe`` command.

User errors (bad config, bad plugin, a model without what a task needs) print one line per
problem on stderr and exit with code 2, without a traceback; ``--debug`` (or ``VLFRAME_DEBUG=1``)
adds the traceback. A traceback without ``--debug`` means a bug in vlframe or in a plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from registry import ENV_DEBUG, ConfigError, Kind, Problem, Registry, VlframeError, debugging

EXIT_USAGE = 2


def _add_set(parser: argparse.ArgumentParser, what: str = "config value", example: str = "train.lr=1e-3") -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a {what}, e.g. --set {example} (repeatable; the value is read as YAML)",
    )


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 where the hardware computes it natively")
    parser.add_argument("--tracking-uri", help="MLflow store of a run id (default: $MLFLOW_TRACKING_URI or "
                                               "./runs/mlflow.db); eval logs there too")


#: Generation settings: command-line flags of `eval` (caption task) and `caption`.
GENERATION_FLAGS = ("strategy", "num_beams", "length_penalty", "max_length", "min_length", "top_k", "top_p",
                    "temperature", "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "seed",
                    "compile")


def _add_generation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--strategy", choices=("greedy", "beam", "sample"))
    group.add_argument("--num-beams", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--max-length", type=int, help="most generated tokens")
    group.add_argument("--min-length", type=int)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--temperature", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--no-repeat-ngram-size", type=int, help="n-gram blocking: never repeat an n-gram (0: off)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="compile the decode step over a static key/value cache (not faster on a CPU; see README)")
    group.add_argument("-n", "--num-return-sequences", type=int, help="captions per image")
    group.add_argument("--seed", type=int, help="sampling seed (probe/understanding: their seed)")


def _generation_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from vlframe.inference.generation import GenerationConfig

    from vlframe.config.files import problems_from

    given = {n: getattr(args, n) for n in GENERATION_FLAGS if getattr(args, n, None) is not None}
    try:
        return GenerationConfig.for_captions(**given)
    except ValidationError as exc:  # each problem under the flag that caused it
        raise ConfigError([Problem("--" + p.path.replace("_", "-") if p.path else "generation", p.message)
                           for p in problems_from(exc, GenerationConfig, given, None, None)]) from None


#: `vlframe eval` flags declared for --help; any other `--name VALUE` (or bare `--name`: true) is
#: passed on the same way, to the task's setting of that name (dashes read as underscores).
TASK_FLAGS = ("data", "train_data", "limit", "batch_size", "steps", "lr", *GENERATION_FLAGS)


def task_settings(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, object]:
    """The task settings given as flags: the declared ones, and every other ``--name [VALUE]``."""
    import yaml

    settings: dict[str, object] = {flag: getattr(args, flag) for flag in TASK_FLAGS
                                   if getattr(args, flag, None) is not None}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError([Problem(token, "unexpected argument (task settings are --name VALUE)")])
        name, _, inline = token[2:].partition("=")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value, i = extra[i + 1], i + 2
        else:
            value, i = "true", i + 1
        try:
            settings[name.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            settings[name.replace("-", "_")] = value
    return settings


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlframe", description="Plugin-based vision-language models (CoCa).")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors (also VLFRAME_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="validate, show and describe config files").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = config.add_parser("validate", help="validate config files")
    p.add_argument("files", nargs="+", type=Path)
    _add_set(p)
    p.set_defaults(func=cmd_config_validate)
    p = config.add_parser("show", help="print a config fully resolved (extends, overrides, defaults)")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    _add_set(p)
    p.set_defaults(func=cmd_config_show)
    p = config.add_parser("schema", help="print the JSON Schema of config files (every registered plugin)")
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_schema)

    plugins = sub.add_parser("plugins", help="inspect and check plugins").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = plugins.add_parser("list", help="every registered component with its kind and source")
    p.add_argument("--kind", choices=[k.value for k in Kind], help="only this kind")
    p.add_argument("--plugins", action="store_true",
                   help="list the loaded plugins instead: distribution, module, what each provides")
    p.set_defaults(func=cmd_plugins_list)
    p = plugins.add_parser("check", help="run the conformance checks on components (vlframe.testing)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="component names, KIND.NAME, or plugin names (default: every component)")
    p.add_argument("--config", type=Path, help="a YAML block to build the (one) named component from")
    p.set_defaults(func=cmd_plugins_check)

    model = sub.add_parser("model", help="inspect models").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = model.add_parser("summary", help="parameter counts by component (built on the meta device)")
    p.add_argument("file", type=Path)
    _add_set(p)
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("train", help="train a model (tracked in MLflow); runs under torchrun too")
    p.add_argument("file", type=Path)
    _add_set(p)
    p.add_argument("--run-dir", type=Path, help="run folder (default: a new <train.output_dir>/<config>-<date>-<time>-<hex>)")
    p.add_argument("--resume", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="continue from a checkpoint folder, or the newest checkpoint of a run folder")
    p.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", help="train the config's tokenizer on its training captions")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, default=Path("."), help="folder for tokenizer.model (default: here)")
    _add_set(p)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = data.add_parser("write-shards", help="write a config's dataset as WebDataset tar shards")
    p.add_argument("file", type=Path)
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    _add_set(p)
    p.set_defaults(func=cmd_data_write_shards)

    p = data.add_parser("match-pairs", help="derive an image-caption matching task (JSONL) from a config's dataset")
    p.add_argument("file", type=Path)
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--out", type=Path, required=True, help="folder for the images and pairs.jsonl")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0)
    _add_set(p)
    p.set_defaults(func=cmd_data_match_pairs)

    p = sub.add_parser("eval", help="evaluate a trained model with a task; metrics go to its MLflow run",
                       allow_abbrev=False)  # an unknown --name is a task setting, never an abbreviation
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or MLflow run id")
    p.add_argument("--task", required=True, metavar="TASK",
                   help="a registered task: caption, retrieval, zeroshot, probe, understanding, or a plugin's")
    p.add_argument("--data", help="dataset: a folder (ImageFolder), .jsonl/.csv, COCO .json, a dataset .yaml, or "
                                  "a dataset's name such as synthetic (default: the run's validation split); "
                                  "understanding: the test JSONL")
    p.add_argument("--train-data", help="probe: a separate training set (default: split --data per class); "
                                        "understanding: the training JSONL (required)")
    p.add_argument("--limit", type=int, help="use only N images: the first N, or for labelled (ImageFolder) data N "
                                            "evenly spaced ones, so that every class is in")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="probe/understanding: training steps (default 300)")
    p.add_argument("--lr", type=float, help="probe/understanding: learning rate of the head")
    _add_set(p, "task setting", "limit=64")
    p.epilog = ("Any other --NAME VALUE (or a bare --NAME, meaning true) sets the task's setting NAME, e.g. "
                "--head attentional --finetune (probe), --templates FILE (zeroshot), --metrics '[cider, bleu4]' "
                "(caption); vlframe config schema lists every task's settings.")
    p.add_argument("--out", type=Path, help="folder for the results (default: RUN/eval/TASK-CHECKPOINT-TIME)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    _add_runtime(p)
    _add_generation(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image files with a trained model")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    _add_runtime(p)
    _add_generation(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("embed", help="write contrastive embeddings of images, texts or a dataset")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", type=Path, help="image files")
    what.add_argument("--texts", type=Path, help="a text file, one text per line")
    what.add_argument("--data", help="a dataset (as for eval): its images and all their captions")
    p.add_argument("--out", type=Path, required=True, help="a .safetensors file (keys and texts go beside it, .json)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    _add_runtime(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("sweep", help="train and evaluate a sweep's variants, each an MLflow child run")
    p.add_argument("file", type=Path, metavar="SWEEP.yaml")
    p.add_argument("--steps", type=_positive, help="train every variant for this many steps (quick trials)")
    p.add_argument("--only", nargs="+", default=[], metavar="VARIANT", help="run only these variants")
    p.add_argument("--seeds", type=_positive, metavar="N",
                   help="train every variant with seeds 0..N-1 (instead of the file's seeds)")
    p.add_argument("--list", action="store_true", help="list the variants and their overrides; train nothing")
    _add_set(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="a sweep's variants side by side, read back from MLflow")
    p.add_argument("source", metavar="SWEEP_OR_PARENT_RUN", help="the sweep file, or its parent run's id")
    p.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--metrics", nargs="+", default=[], metavar="PATTERN",
                   help="only the columns matching these glob patterns, e.g. 'eval/*' 'val/loss*'")
    p.add_argument("--out", type=Path, help="folder for comparison.csv/.md/.png (default <sweep folder>/comparison)")
    p.add_argument("--baseline", metavar="VARIANT", help="test every variant against this one (paired over seeds)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("convert", help="import another framework's checkpoint as a vlframe checkpoint folder")
    p.add_argument("importer", metavar="IMPORTER", help="an importer plugin, e.g. open-clip (see `vlframe plugins list`)")
    p.add_argument("--model", required=True, metavar="ARCH",
                   help="the architecture, e.g. coca_ViT-B-32 or coca_ViT-L-14 (open-clip: or a model config .json)")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="FILE", help="the local weights file")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the vlframe checkpoint folder to write")
    _add_set(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="a checkpoint (e.g. a sharded one of train.parallel: fsdp) as one "
                                      "model.safetensors folder every command loads")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a checkpoint folder, or a run folder (its newest)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the checkpoint folder to write (new)")
    p.set_defaults(func=cmd_export)

    tracking = sub.add_parser("tracking", help="MLflow tracking").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tracking.add_parser("sync", help="deliver a folder's journaled events that never reached MLflow")
    p.add_argument("run_dir", type=Path, metavar="FOLDER", help="a run folder, an evaluation's or a sweep's folder")
    p.add_argument("--uri", help="tracking URI (default: the one the run used)")
    p.set_defaults(func=cmd_tracking_sync)
    return parser


# -- commands ---------------------------------------------------------------------------------


def cmd_config_validate(args: argparse.Namespace) -> int:
    """Validate each file, then build its model on the meta device (no memory) and its
    tokenizer, so that settings which only conflict once parts meet (heads that do not divide a
    width, a tokenizer with more pieces than the model's vocabulary, an absurd size) are caught
    here rather than at training time."""
    from vlframe.api import build_tokenizer, check_size
    from vlframe.config import files as configfile

    failed = False
    for path in args.files:
        try:
            config, registry = configfile.load(path, args.overrides)
            check_size(config, registry)
            if config.tokenizer is not None:
                build_tokenizer(config, registry)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:  # a problem without a file (from --set) belongs to this one
                print(f"error: {replace(problem, file=problem.file or str(path))}", file=sys.stderr)
        except VlframeError as exc:
            failed = True
            for line in exc.lines():
                print(f"error: {path}: {line}", file=sys.stderr)
            if debugging():
                traceback.print_exception(exc, file=sys.stderr)
        else:
            print(f"ok: {path}")
    return EXIT_USAGE if failed else 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from vlframe.config import files as configfile

    config, _ = configfile.load(args.file, args.overrides)
    if args.format == "json":
        print(json.dumps(configfile.dump(config), indent=2))
    else:
        print(configfile.to_yaml(config), end="")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from vlframe.config.schema import config_schema

    text = json.dumps(config_schema(Registry.discover().catalog), indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])


def cmd_plugins_list(args: argparse.Namespace) -> int:
    registry = Registry.discover()
    if args.plugins:
        rows = [("PLUGIN", "DISTRIBUTION", "MODULE", "PROVIDES")]
        for info in registry.plugins():
            if info.provides:
                provides = ", ".join(info.provides)
            elif info.hooks:
                provides = f"nothing: its hooks ({', '.join(info.hooks)}) return no component"
            else:
                provides = "nothing: it implements no vlframe hook (is @hookimpl missing?)"
            if info.problems:
                provides += f"; could not provide: {' | '.join(info.problems)}"
            rows.append((info.name, info.distribution or "-", info.module, provides))
        for name, reason in sorted(registry.blocked().items()):
            rows.append((name, "-", "-", f"blocked by {reason}"))
        _table(rows)
        return 0
    kind = Kind(args.kind) if args.kind else None
    rows = [("KIND", "NAME", "PLUGIN", "DISTRIBUTION", "SUMMARY")]
    for entry in registry.catalog.entries(kind):
        summary = entry.spec.summary + (f" (replaces {entry.replaces}'s)" if entry.replaces else "")
        rows.append((entry.kind.value, entry.spec.name, entry.plugin, entry.distribution or "-", summary))
    for (k, name), entries in sorted(registry.catalog.contested().items()):
        if kind is None or k is kind:
            rows.append((k.value, name, " & ".join(e.plugin for e in entries), "-",
                         f"contested: choose with plugins.override: {{{k.value}.{name}: PLUGIN}}"))
    for broken in registry.catalog.broken:
        if kind is None or broken.kind is kind:
            rows.append((broken.kind.value, broken.name or "-", broken.plugin, "-", f"unusable: {broken.message}"))
    _table(rows)
    return 0


def cmd_plugins_check(args: argparse.Namespace) -> int:
    from vlframe import testing

    registry = Registry.discover()
    cases = testing.select(registry, args.names)
    override = None
    if args.config is not None:
        if len(cases) != 1:
            raise ConfigError([Problem("--config", f"names {len(cases)} components; name exactly one to use it")])
        from vlframe.config.files import read_yaml

        override = read_yaml(args.config)
    failed = skipped = 0
    for case in cases:
        problems = testing.check(registry, case, config=override)
        label = f"{case.kind.value} {case.name} [{case.plugin}]"
        real = [p for p in problems if not p.startswith("skipped:")]
        if real:
            failed += 1
            for problem in real:
                print(f"FAIL {label}: {problem}")
        elif problems:
            skipped += 1
            print(f"skip {label}: {problems[0].removeprefix('skipped: ')}")
        else:
            print(f"ok   {label}")
    print(f"{len(cases) - failed - skipped} of {len(cases)} component(s) conform, {failed} do not, "
          f"{skipped} skipped")
    return EXIT_USAGE if failed else 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    from vlframe.api import build_model, parameter_counts

    model = build_model(args.file, args.overrides, device="meta")
    counts = parameter_counts(model)
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        print(f"{name.ljust(width)}  {count:>15,}  ({count / 1e6:,.1f}M)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlframe.config import files as configfile
    from vlframe.training.trainer import Trainer

    from registry import BuildError

    try:
        config, registry = configfile.load(args.file, args.overrides)
        result = Trainer(config, registry, run_dir=args.run_dir, resume=args.resume, name=args.file.stem).fit()
    except ConfigError as exc:  # the problem is in this file (or its --set)
        raise ConfigError([p if p.file else replace(p, file=str(args.file)) for p in exc.problems]) from exc
    except BuildError as exc:  # a component of this file's config does not build
        raise BuildError(f"{args.file}: {exc}") from exc
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.step} steps; final checkpoint: {result.checkpoint}")
    return 0


def _datasets(config, registry, split: str):
    from vlframe.data.samples import set_max_image_pixels

    if config.data is None:
        raise ConfigError([Problem("data", "this config has no data section")])
    set_max_image_pixels(config.data.max_image_pixels)
    block = config.data.train if split == "train" else config.data.val
    if block is None:
        raise ConfigError([Problem(f"data.{split}", "not set")])
    return registry.catalog.build(Kind.DATASET, block, path=f"data.{split}", split=split)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from vlframe.api import build_tokenizer
    from vlframe.config import files as configfile

    config, registry = configfile.load(args.file, args.overrides)
    dataset = _datasets(config, registry, "train")
    tokenizer = build_tokenizer(config, registry)
    path = tokenizer.train(dataset.captions(), args.out)
    print(f"{path}: {tokenizer.vocab_size} pieces from {dataset.describe()}")
    print(f"use it with: --set tokenizer.path={path}")
    return 0


def cmd_data_write_shards(args: argparse.Namespace) -> int:
    from vlframe.config import files as configfile
    from vlframe.interchange.shard_writer import write_shards

    config, registry = configfile.load(args.file, args.overrides)
    dataset = _datasets(config, registry, args.split)
    paths, written, skipped = write_shards(dataset, args.out, prefix=args.split, shard_size=args.shard_size)
    built = list(getattr(dataset, "skipped", []))  # set aside when the dataset was built
    total = len(skipped) + len(built)
    print(f"wrote {written} samples to {len(paths)} shard(s) in {args.out}; {total} unusable skipped"
          + (f" ({len(built)} when the dataset was built, {len(skipped)} when read)" if total else ""))
    for err in [*built, *skipped][:10]:
        print(f"  skipped {err}")
    if total > 10:
        print(f"  ... and {total - 10} more")
    print(f"use them with: data.{args.split}: {{type: shards, urls: {args.out}/{args.split}-{{000000..{len(paths) - 1:06d}}}.tar}}")
    return 0


def cmd_data_match_pairs(args: argparse.Namespace) -> int:
    from vlframe.config import files as configfile
    from vlframe.interchange.match_pairs import write_match_pairs

    config, registry = configfile.load(args.file, args.overrides)
    dataset = _datasets(config, registry, args.split)
    path = write_match_pairs(dataset, args.out, limit=args.limit, seed=args.seed)
    rows = path.read_text(encoding="utf-8").count("\n")
    print(f"wrote {rows} (image, caption, yes/no) rows to {path}")
    return 0


def _load(args: argparse.Namespace):
    from vlframe.inference.trained import load_trained

    trained = load_trained(args.source, device=args.device, precision=args.precision, tracking_uri=args.tracking_uri)
    for line in trained.passed_over:
        print(f"note: {line}", file=sys.stderr)
    return trained


def cmd_eval(args: argparse.Namespace) -> int:
    from vlframe.evaluation.report import save_result
    from vlframe.evaluation.tasks import default_out_dir, log_results, require, run_task, settings_block

    trained = _load(args)
    catalog = trained.registry.catalog
    try:
        wanted = catalog.get(Kind.TASK, args.task).spec.config
    except VlframeError as exc:
        raise ConfigError([Problem("--task", str(exc))]) from None
    require(trained.model, wanted.requires, f"task '{args.task}'")  # before its settings are checked
    task = settings_block(catalog, args.task, task_settings(args, args.extra), args.overrides)
    out = args.out or default_out_dir(trained, args.task)
    result = run_task(trained, task, out_dir=out)
    save_result(result, out)
    print(result.summary())
    print(f"results: {out}")
    if not args.no_track:
        for line in log_results(trained, [result], out, uri=args.tracking_uri or None):
            print(line)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from registry import Capability
    from vlframe.data.samples import SampleError

    trained = _load(args)
    trained.require(Capability.CAPTIONING, "vlframe caption")
    config = _generation_config(args)
    for path in args.images:
        try:
            images = trained.load_images([path])
        except SampleError as err:
            raise ConfigError([Problem("", str(err))]) from None
        captions = trained.caption(images, config)[0]
        if args.json:
            print(json.dumps({"image": str(path), "captions": captions}))
        else:
            for text in captions:
                print(f"{path}: {text}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vlframe.interchange.convert import convert_checkpoint
    from vlframe.runs import checkpoint

    out = convert_checkpoint(args.importer, args.model, args.checkpoint, args.out, overrides=args.overrides)
    print(f"wrote {out} ({args.importer} {args.model} from {args.checkpoint})")
    print(f"caption: vlframe caption {out} IMAGE ...   evaluate: vlframe eval {out} --task TASK --data DATA")
    print(f"fine-tune: vlframe train CONFIG.yaml --set train.init_from={out}  (start from {out / checkpoint.CONFIG})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlframe.interchange.convert import export_checkpoint

    out, source = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out / 'model.safetensors'} (whole weights of {source}); caption: vlframe caption {out} IMAGE ...")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from registry import Capability
    from vlframe.evaluation.datasets import build_dataset, embed_dataset

    trained = _load(args)
    trained.require(Capability.CONTRASTIVE, "vlframe embed")
    tensors, listing = {}, {}
    if args.images:
        names = [str(p) for p in args.images]
        tensors["image_embeds"] = torch.cat([trained.embed_images(trained.load_images(args.images[i : i + args.batch_size]))
                                             for i in range(0, len(names), args.batch_size)])
        listing["images"] = names
    elif args.texts:
        texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
        tensors["text_embeds"] = trained.embed_texts(texts, batch_size=args.batch_size)
        listing["texts"] = texts
    else:
        dataset = build_dataset(trained, args.data)
        images, texts, owners, keys, captions = embed_dataset(trained, dataset, limit=args.limit,
                                                              batch_size=args.batch_size)
        tensors.update(image_embeds=images, text_embeds=texts, text_image=owners)
        listing.update(images=keys, texts=captions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(args.out),
              metadata={"checkpoint": str(trained.checkpoint), "normalized": "true"})
    sidecar = args.out.with_suffix(".json")
    sidecar.write_text(json.dumps(listing, indent=1), encoding="utf-8")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"wrote {shapes} to {args.out} (order in {sidecar})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vlframe.sweeps import sweep as sweeps

    if args.list:
        config = sweeps.load_sweep(args.file)
        seeds = list(range(args.seeds)) if args.seeds else None
        variants, _ = sweeps.build_variants(config, args.file, cli_sets=args.overrides, steps=args.steps,
                                            only=args.only, seeds=seeds)
        for v in variants:
            state = f"error: {v.error}" if v.error else f"config {v.hash}"
            print(f"{v.label}: {json.dumps(v.overrides)} ({state})")
        return EXIT_USAGE if any(v.error for v in variants) else 0
    parent, outcomes = sweeps.run_sweep(args.file, cli_sets=args.overrides, steps=args.steps, only=args.only,
                                        seeds=list(range(args.seeds)) if args.seeds else None)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed")}
    print(f"sweep done: {counts['finished']} finished, {counts['skipped']} skipped, {counts['failed']} failed "
          f"(parent run {parent}); compare with: vlframe compare {args.file}")
    return 1 if counts["failed"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlframe.sweeps.comparison import compare

    parent, text, files, lines = compare(args.source, tracking_uri=args.tracking_uri, out_dir=args.out,
                                         metrics=args.metrics, baseline=args.baseline)
    print(text)
    print(f"written: {', '.join(map(str, files))} (also artifacts of parent run {parent}, folder comparison/)")
    for line in lines:
        if "not delivered" in line or "deliver them" in line:
            print(line)
    return 0


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    from vlframe.runs.tracking import sync

    delivered, run_id = sync(args.run_dir, args.uri)
    print(f"delivered {delivered} event(s) to MLflow run {run_id}")
    return 0


def _report(exc: BaseException) -> None:
    lines = exc.lines() if isinstance(exc, VlframeError) else [str(exc)]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    if debugging():
        traceback.print_exception(exc, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "eval":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if args.debug:
        os.environ[ENV_DEBUG] = "1"  # also for the processes this one starts (sweep variants)
    try:
        return args.func(args)
    except VlframeError as exc:
        _report(exc)
        return EXIT_USAGE
    except ValueError as exc:
        if args.command not in ("eval", "caption", "embed", "data"):
            raise
        # Downstream commands: a dataset or file that does not suit the task (the message names it).
        _report(exc)
        return EXIT_USAGE
    except Exception as exc:
        problem = _resource_problem(exc)
        if problem is None:
            raise  # a bug: the traceback says where
        _report(VlframeError(problem))
        return EXIT_USAGE


def _resource_problem(exc: BaseException) -> str | None:
    """A full disk, or a file the system refuses, in one line (None for anything else)."""
    from vlframe.runs.checkpoint import free_space, no_space

    where = getattr(exc, "filename", None)
    if no_space(exc):
        place = f" writing {where}" if where else ""
        free = f" ({free_space(Path(where)) / 2**20:.0f} MiB free there)" if where else ""
        return f"no space left on the device{place}{free}: free some space and run the command again"
    if isinstance(exc, PermissionError):
        return f"permission denied: {where or exc}"
    if isinstance(exc, OSError) and where:
        return f"{where}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
