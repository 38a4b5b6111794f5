"""Command-line checks the examples share: bad input ends in one line naming the argument, never a traceback."""

from __future__ import annotations

import argparse

import timm


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows each default and keeps the docstring's layout."""


def check_model_name(parser: argparse.ArgumentParser, name: str) -> None:
    """A timm architecture, with or without a pretrained tag (`resnet18`, `resnet18.a1_in1k`); no wildcard."""
    if not timm.is_model(name):
        parser.error(f"--model: {name!r} is not a timm model name (see timm.list_models(); tags such as "
                     "resnet18.a1_in1k are accepted)")  # fmt: skip


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Each named option, when given, is > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_freezing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The schedule's two numbers, in their ranges."""
    if not 0 <= args.freeze_start < 1:
        parser.error(f"--freeze-start must be in [0, 1), got {args.freeze_start}")
    if not 0 <= args.freeze_level <= 1:
        parser.error(f"--freeze-level must be in [0, 1], got {args.freeze_level}")
