"""The arguments every ``spark-ext`` command shares: one meaning of ``--seeds`` everywhere."""

import argparse
from pathlib import Path

import pytest

import spark_ext
from spark_ext.cli import COMMANDS, main
from spark_ext.commands._args import MAX_SEED, MAX_SEEDS, seeds


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", (0,)),
        ("3", (0, 1, 2)),
        ("0,3,7", (0, 3, 7)),
        ("7,", (7,)),
        (" 2, 5 ", (2, 5)),
        (f"{MAX_SEED},", (MAX_SEED,)),
    ],
)
def test_seeds_is_a_count_or_a_list(text, expected):
    assert seeds(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "an integer in [1,"),
        (str(MAX_SEEDS + 1), "an integer in [1,"),
        ("x", "an integer in [1,"),
        ("0,1,0", "more than once"),
        ("0,x", "a seed expected"),
        (f"0,{MAX_SEED + 1}", "a seed expected"),
        (",", "expected a count N or seeds"),
    ],
)
def test_bad_seeds_say_what_is_expected(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[")):
        seeds(text)


@pytest.mark.parametrize("command", ["demo", "study", "classify", "daqakd", "diffkd"])
def test_every_command_reads_seeds_the_same_way(command, capsys):
    # a duplicated seed is refused in the same words by every command that takes --seeds
    with pytest.raises(SystemExit) as stopped:
        main([command, "--seeds", "1,1"])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--seeds" in line and "more than once" in line


def test_router_knows_every_command_module():
    import importlib

    for name in COMMANDS:
        module = importlib.import_module("spark_ext.commands." + name.replace("-", "_"))
        assert callable(module.main), name


def _imported_modules(path):
    """Every module ``path`` imports (absolute names; relative imports resolved against its package)."""
    import ast

    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


PACKAGE = Path(spark_ext.__file__).resolve().parent
COMMAND_MODULES = {f"spark_ext.commands.{name.replace('-', '_')}" for name in COMMANDS}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_router_imports_a_command(path):
    # the library never reaches up into a program, and no command imports another one
    this = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if this == "spark_ext.cli":
        return
    commands = (_imported_modules(path) & COMMAND_MODULES) - {this}
    assert not commands, f"{this} imports the command module(s) {sorted(commands)}"
