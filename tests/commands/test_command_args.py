"""The arguments every ``spark-ext`` command shares: one meaning of ``--seeds`` everywhere."""

import argparse

import pytest

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
