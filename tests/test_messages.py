"""Every "how to fix" in a message is a command that works: each `probe <command>` and
each `--option` that probe's messages, help texts and docstrings suggest exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from probe.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "probe"
COMMAND = re.compile(r"\bprobe ((?:[a-z][a-z0-9-]*)(?: [a-z][a-z0-9-]*)?)([^`\"';()]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def texts() -> list[tuple[str, str]]:
    """(where, text) of every string literal in the package; an f-string's values become X."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            found.append((f"{path.name}:{node.lineno}", text))
    return found


def commands() -> dict[str, click.Command]:
    """'extract', 'cache ls', ... -> the click command."""
    table = {}
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            for sub, subcommand in command.commands.items():
                table[f"{name} {sub}"] = subcommand
        table[name] = command
    return table


def options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}


def suggestions() -> list[tuple[str, str, list[str]]]:
    """(where, command words, options) of every `probe <command> [--option ...]` whose
    first word names a command (or that stands in backquotes, so it must)."""
    table, found = commands(), []
    for where, text in texts():
        for match in COMMAND.finditer(text):
            words = match.group(1)
            quoted = text[max(0, match.start() - 1):match.start()] == "`"
            name = words if words in table else words.split()[0]
            if name in table or quoted:
                found.append((where, name, OPTION.findall(match.group(2))))
    return found


def test_the_collector_finds_suggestions():
    found = {(name, tuple(opts)) for _, name, opts in suggestions()}
    assert ("extract", ()) in found and ("cache info", ()) in found
    assert ("extract", ("--backbone",)) in found  # from the extract command's example


def test_every_suggested_command_and_option_exists():
    table = commands()
    wrong = []
    for where, name, opts in suggestions():
        if name not in table:
            wrong.append(f"{where}: probe {name}")
            continue
        wrong += [f"{where}: probe {name} {opt}" for opt in opts if opt not in options(table[name])]
    assert not wrong, wrong


def test_every_option_named_in_a_message_exists_somewhere():
    known = set().union(options(main), *(options(c) for c in commands().values()))
    wrong = [f"{where}: {opt}" for where, text in texts() for opt in OPTION.findall(text)
             if opt not in known]
    assert not wrong, wrong
