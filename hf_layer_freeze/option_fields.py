"""How an option's one definition becomes a dataclass field, a docstring entry and a command-line flag.

`option(...)` declares a field of an options dataclass (`options.FreezeOptions`) with its documentation and its
check in the field's metadata; `document_options` writes the `Args:` entries of a class's docstring from it, and
`add_option_arguments` derives `argparse` flags. Pure Python; nothing here knows a particular option.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar

from .schedule import validate_choice

__all__ = ["Check", "add_arguments", "document_options", "option", "option_docs", "option_names"]

Check = Callable[[str, Any], Any]  # (name, value) -> the value to store; raises ValueError naming `name`


def option(
    default: Any,
    doc: str,
    check: Check | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    type: str | None = None,
    default_doc: str | None = None,
    cli: dict[str, Any] | None = None,
) -> Any:
    """
    A dataclass field for one option, with everything the package knows about it.

    Args:
        default: the default value (JSON-safe).
        doc (`str`): the `Args:` entry's text, one paragraph (it is re-wrapped); its first sentence is the
            command-line help.
        check (`Callable[[str, Any], Any]`, *optional*): takes the option's name and value, returns the value to store
            (normalized) or raises a one-line `ValueError` naming the option, the allowed values and the value.
            Defaults to `validate_choice` over `choices`.
        choices (`tuple[str, ...]`, *optional*): the allowed strings (also the command line's `choices`).
        type (`str`, *optional*): the type as the docstring writes it; by default the default's type.
        default_doc (`str`, *optional*): the default as the docstring writes it, when its value reads badly.
        cli (`dict`, *optional*): extra `argparse.add_argument` keywords (`type`, `nargs`) for `add_option_arguments`.
    """
    if check is None:
        if choices is None:
            raise TypeError("option() needs a check or choices")
        check = _one_of(choices)
    metadata = {"doc": doc, "check": check, "choices": choices, "type": type, "default_doc": default_doc}
    return field(default=default, metadata={**metadata, "cli": cli or {}})


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda name, value: validate_choice(name, value, choices)


def option_names(options: type) -> tuple[str, ...]:
    """The option names of an options class, in definition order."""
    return tuple(each.name for each in fields(options))


def _option_fields(options: type, names: Iterable[str] | None = None) -> list[Field]:
    by_name = {each.name: each for each in fields(options)}
    if names is None:
        return list(by_name.values())
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"names must be options of {options.__name__} ({', '.join(by_name)}), got {unknown}")
    return [by_name[name] for name in names]


def _doc_type(each: Field) -> str:
    written = each.metadata["type"] or type(each.default).__name__
    return written if "`" in written else f"`{written}`"


def _doc_default(each: Field) -> str:
    if each.metadata["default_doc"] is not None:
        return f", defaults to {each.metadata['default_doc']}"
    if each.default is None or each.default is MISSING:
        return ""
    default = each.default
    if isinstance(default, str):
        return f', defaults to `"{default}"`'
    return f", defaults to `{default}`" if isinstance(default, bool) else f", defaults to {default}"


def option_docs(options: type, indent: str = "        ") -> str:
    """The options' `Args:` entries, Hugging Face style: ``name (`type`, *optional*, defaults to X):`` and its text."""
    entries = []
    for each in _option_fields(options):
        head = f"{indent}{each.name} ({_doc_type(each)}, *optional*{_doc_default(each)}):"
        body = textwrap.fill(
            each.metadata["doc"],
            width=119,
            initial_indent=indent + "    ",
            subsequent_indent=indent + "    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        entries.append(f"{head}\n{body}")
    return "\n".join(entries)


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?P<name>Args|Returns|Raises|Example|Examples):[ \t]*$")


def _with_option_docs(doc: str, options: type) -> str:
    """`doc` with the options' entries at the end of its `Args:` block (which is made, before the next section or
    at the end, where there is none)."""
    lines = doc.split("\n")
    sections = [(i, m) for i, m in ((i, _SECTION.match(line)) for i, line in enumerate(lines)) if m]
    args = next(((i, m) for i, m in sections if m["name"] == "Args"), None)
    if args is not None:
        start, match = args
        indent = match["indent"]
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or len(_indent_of(lines[end])) > len(indent)):
            end += 1
        while end - 1 > start and not lines[end - 1].strip():
            end -= 1  # the entries go after the last entry, before the blank line that ends the block
        lines[end:end] = option_docs(options, indent + "    ").split("\n")
        return "\n".join(lines)
    if sections:
        at, match = sections[0]
        indent = match["indent"]
    else:
        at, indent = len(lines), next((_indent_of(line) for line in lines[1:] if line.strip()), "")
        while at > 0 and not lines[at - 1].strip():
            at -= 1
    block = [f"{indent}Args:", *option_docs(options, indent + "    ").split("\n"), ""]
    lines[at:at] = block if sections else ["", *block]
    return "\n".join(lines)


_Documented = TypeVar("_Documented")


def document_options(options: type) -> Callable[[_Documented], _Documented]:
    """
    A class decorator that writes each option's `Args:` entry (from its `option(...)` definition) into the class
    docstring, so `help(LayerFreezer)` documents every option that its `**options` takes.
    """

    def decorate(cls: _Documented) -> _Documented:
        if cls.__doc__:  # None under python -OO
            cls.__doc__ = _with_option_docs(cls.__doc__, options)
        return cls

    return decorate


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, options: type, names: Iterable[str]
) -> None:
    """A `--flag-name` for each of the named options of `options` (see `options.add_option_arguments`)."""
    for each in _option_fields(options, names):
        first_sentence = re.split(r"(?<=\.)\s", each.metadata["doc"], maxsplit=1)[0]
        help_text = first_sentence.replace("`", "").replace("%", "%%")
        keywords: dict[str, Any] = {"default": each.default, "help": f"{help_text} (default: %(default)s)"}
        if each.metadata["choices"] is not None:
            keywords["choices"] = each.metadata["choices"]
        elif isinstance(each.default, bool):
            keywords["action"] = argparse.BooleanOptionalAction
        elif each.default is not None:
            keywords["type"] = type(each.default)
        keywords.update(each.metadata["cli"])
        parser.add_argument("--" + each.name.replace("_", "-"), **keywords)
