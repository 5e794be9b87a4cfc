"""``vlframe convert``, ``vlframe export`` and ``vlframe tracking sync``: checkpoints and records moved between places."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlframe.commands.base import Command, add_set


class Convert(Command):
    name, help = "convert", "import another framework's checkpoint as a vlframe checkpoint folder"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("importer", metavar="IMPORTER",
                            help="an importer plugin, e.g. open-clip (see `vlframe plugins list`)")
        parser.add_argument("--model", required=True, metavar="ARCH",
                            help="the architecture, e.g. coca_ViT-B-32 or coca_ViT-L-14 (open-clip: or a model config "
                                 ".json)")
        parser.add_argument("--checkpoint", required=True, type=Path, metavar="FILE", help="the local weights file")
        parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the vlframe checkpoint folder to write")
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.interchange.convert import convert_checkpoint
        from vlframe.runs import checkpoint

        out = convert_checkpoint(args.importer, args.model, args.checkpoint, args.out, overrides=args.overrides)
        print(f"wrote {out} ({args.importer} {args.model} from {args.checkpoint})")
        print(f"caption: vlframe caption {out} IMAGE ...   evaluate: vlframe eval {out} --task TASK --data DATA")
        print(f"fine-tune: vlframe train CONFIG.yaml --set train.init_from={out}  (start from {out / checkpoint.CONFIG})")
        return 0


class Export(Command):
    name, help = "export", "a checkpoint (e.g. a sharded one) as one model.safetensors folder every command loads"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                            help="a checkpoint folder, or a run folder (its newest)")
        parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the checkpoint folder to write (new)")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.interchange.convert import export_checkpoint

        out, source = export_checkpoint(args.checkpoint, args.out)
        print(f"wrote {out / 'model.safetensors'} (whole weights of {source}); caption: vlframe caption {out} IMAGE ...")
        return 0


class Sync(Command):
    group, name, help = "tracking", "sync", "deliver a folder's journaled events that never reached the tracking store"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run_dir", type=Path, metavar="FOLDER", help="a run folder, an evaluation's or a sweep's folder")
        parser.add_argument("--uri", help="tracking URI (default: the one the run used)")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.runs.tracking import sync

        delivered, run_id = sync(args.run_dir, args.uri)
        print(f"delivered {delivered} event(s) to run {run_id}")
        return 0


COMMANDS = [Convert(), Export(), Sync()]
