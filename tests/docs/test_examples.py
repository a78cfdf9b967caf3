"""Every example in README.md and docs/**/*.md runs, as written.

What is executed:

* every ```` ```python ```` block, on CPU, with the working directory a fresh temporary folder (files an
  example writes, such as ``student.onnx``, land there). Each block runs in a fresh namespace, except a
  block marked ``<!-- example: continue -->`` on the line before it, which runs in the namespace of
  the block before it on the same page (the chain is one test). A fragment that uses the reader's own
  objects (``model``, ``loader``) is preceded by an HTML comment holding small stand-ins for them,
  ``<!-- example: setup`` ... ``-->`` (invisible on the page), run first in the block's namespace;
* every ``spark-ext <verb> ...`` line of a ```` ```bash ```` / ``sh`` / ``console`` block is handed to
  ``spark_ext.cli.main`` and stopped right after the verb's own argument parser returns: the verb
  exists and every flag and value parses (types, choices, required flags). The command's checks after
  parsing (outputs writable, teacher present) and its work (training, benchmarks, export) do not run;
* the README's table of measured results matches the results file it cites.

Not executed: other shell lines (``make``, ``pip``, ``python tools/...``, ``python -m spark_ext.benchmarks...``) and
blocks in other languages. A block marked ``<!-- example: skip (reason) -->`` on the line before it
(one that needs a CUDA GPU) is reported as skipped with that reason; on a machine with CUDA it runs.
"""

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import torch


def _repository_root() -> Path:
    for folder in Path(__file__).resolve().parents:
        if (folder / "README.md").is_file() and (folder / "docs").is_dir():
            return folder
    raise RuntimeError("README.md and docs/ not found above " + __file__)


ROOT = _repository_root()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*example:\s*(skip|continue)\b\s*(?:\((.*)\))?\s*-->$")
SETUP = re.compile(r"^<!--\s*example:\s*setup\s*$")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str = ""  # "", "skip" or "continue"
    reason: str = ""
    setup: str = ""  # the stand-ins of an ``example: setup`` comment right before the block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Chain:
    """Python blocks run one after the other in one namespace (one block unless marked ``continue``)."""

    blocks: list = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.blocks[0].where


def _blocks(page: Path) -> list:
    """The fenced code blocks of a Markdown page, with the example marker on the line before each."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    previous, setup, i = "", "", 0
    while i < len(lines):
        if SETUP.match(lines[i].strip()):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed 'example: setup' comment")
            previous, setup, i = "<setup>", "\n".join(lines[i + 1 : end]) + "\n", end + 1
            continue
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous, setup = lines[i].strip(), ""
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == opening.group(1)), None)
        if end is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block")
        marker = MARKER.match(previous)
        blocks.append(
            Block(
                page,
                i + 1,
                opening.group(2).lower(),
                "\n".join(lines[i + 1 : end]) + "\n",
                marker.group(1) if marker else "",
                (marker.group(2) or "") if marker else "",
                setup if previous == "<setup>" else "",
            )
        )
        previous, setup, i = "", "", end + 1
    return blocks


def _python_chains() -> list:
    chains = []
    for page in PAGES:
        page_chains: list = []
        for block in _blocks(page):
            if block.language != "python":
                continue
            if block.marker == "continue":
                if not page_chains:
                    raise AssertionError(f"{block.where}: 'example: continue' with no python block before it")
                page_chains[-1].blocks.append(block)
            else:
                page_chains.append(Chain([block]))
        chains.extend(page_chains)
    return chains


def _command_lines() -> list:
    """``(block, argv)`` for each ``spark-ext`` command line of the shell blocks."""
    commands = []
    for page in PAGES:
        for block in _blocks(page):
            if block.language not in SHELL_LANGUAGES:
                continue
            for line in block.code.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words and words[0] == "spark-ext":
                    commands.append((block, words[1:]))
    return commands


CHAINS = _python_chains()
COMMANDS = _command_lines()


def _skip_reason(block: Block):
    if block.marker != "skip":
        return None
    needs_cuda = "cuda" in block.reason.lower() or "gpu" in block.reason.lower()
    if needs_cuda and torch.cuda.is_available():
        return None
    return block.reason or "marked 'example: skip'"


def test_the_pages_have_examples():
    assert len(CHAINS) >= 10, [c.where for c in CHAINS]
    assert len(COMMANDS) >= 10, [b.where for b, _ in COMMANDS]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: c.where)
def test_python_example_runs(chain, tmp_path, monkeypatch):
    reason = _skip_reason(chain.blocks[0])
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in chain.blocks:
        if block.setup:
            exec(compile(block.setup, block.where + " (example: setup)", "exec"), namespace)
        exec(compile(block.code, block.where, "exec"), namespace)


class _Parsed(Exception):
    """Raised right after a command's argument parser returned: the command line parsed."""


@pytest.mark.parametrize("block, argv", COMMANDS, ids=lambda v: v.where if isinstance(v, Block) else " ".join(v))
def test_spark_ext_command_line_parses(block, argv, capsys):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    from spark_ext import cli

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            cli.main(argv)
        except _Parsed:
            return
        except SystemExit as exc:
            error = capsys.readouterr().err.strip()
            pytest.fail(f"{block.where}: spark-ext {shlex.join(argv)} does not parse (exit {exc.code}): {error}")
    pytest.fail(f"{block.where}: spark-ext {shlex.join(argv)} ran without calling an argument parser")


def test_the_readme_results_table_matches_its_results_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Measured results", 1)[1].split("\n## ", 1)[0]
    cited = re.search(r"\]\((docs/img/[^)]+\.json)\)", section)
    assert cited, "the README's measured results cite no JSON file"
    results = json.loads((ROOT / cited.group(1)).read_text(encoding="utf-8"))["results"]
    by_label = {entry["label"]: entry for entry in results.values()}
    rows = [
        [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ][1:]
    assert {row[0] for row in rows} == set(by_label), "the table's methods differ from the results file's"
    for label, psnr, ssim, seconds in rows:
        entry = by_label[label]
        assert psnr == f"{entry['psnr_mean']:.3f}", label
        assert ssim == f"{entry['ssim_mean']:.4f}", label
        train = entry["train_seconds"]
        assert seconds == ("–" if train is None else f"{sum(train) / len(train):.1f}"), label
