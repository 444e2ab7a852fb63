"""Commands that live in their own modules; `tune_cells.cli` adds them to the `tune-cells` group.

A new command is a module here with one `click.command()` named `command`, listed below.
"""

from __future__ import annotations

import importlib

import click

COMMAND_MODULES = (
    "tune_cells.commands.evaluate",
    "tune_cells.commands.export",
    "tune_cells.commands.card",
    "tune_cells.commands.ui",
    "tune_cells.commands.dashboard",
)


def register_commands(group: click.Group) -> None:
    for name in COMMAND_MODULES:
        group.add_command(importlib.import_module(name).command)
