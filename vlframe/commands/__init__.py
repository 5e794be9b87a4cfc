"""The ``vlframe`` commands, one object each (:class:`vlframe.commands.base.Command`), in the order
``vlframe --help`` lists them; ``GROUPS`` says what each group of subcommands is for."""

from __future__ import annotations

from vlframe.commands import configs, data, downstream, interchange, plugins, sweeps, training
from vlframe.commands.base import Command

COMMANDS: list[Command] = [*configs.COMMANDS[:3], *plugins.COMMANDS, configs.COMMANDS[3], *training.COMMANDS,
                           *data.COMMANDS, *downstream.COMMANDS, *sweeps.COMMANDS, *interchange.COMMANDS]

GROUPS = {
    "config": "validate, show and describe config files",
    "plugins": "inspect and check plugins",
    "model": "inspect models",
    "tokenizer": "tokenizers",
    "data": "datasets",
    "tracking": "tracking: deliver what a store missed",
}

__all__ = ["COMMANDS", "Command", "GROUPS"]
