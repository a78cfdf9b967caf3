"""``spark-ext <command>``: routes to ``spark_ext.commands.<command>`` (also ``python -m spark_ext.cli``).

Each command parses its own arguments; this module only knows their names and one-line descriptions.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

COMMANDS = {
    "demo": "train and compare QAT/KD/SPARK students on real photos",
    "bench": "run the benchmarks on this device, or summarise saved runs; ratios, plots",
    "study": "paired-seed method matrix (QAT, KD, maps, balancers, DFD, SPARK variants)",
    "diagnose-credit": "does a policy signal predict the cells' held-out effect?",
    "export": "write a QAT model as ONNX (QuantizeLinear/DequantizeLinear), check it in onnxruntime",
    "classify": "W4A4 digit classifiers: QAT vs logit KD, GoR, LMR, ensemble over paired seeds",
    "diffkd": "W4A4 denoisers: output KD vs DFD vs DiffKD feature denoising over paired seeds",
    "daqakd": "rank augmentations by the DA-QAKD metric and test the ranking over paired seeds",
    "doctor": "print devices, backends, library build status, versions",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module("spark_ext.commands." + argv[0].replace("-", "_"))
        return int(module.main(argv[1:]) or 0)
    from spark_ext.commands._args import CommandParser

    parser = CommandParser(prog="spark-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text + f" (see `spark-ext {name} --help`)")
    parser.parse_args(argv)  # no command given, or an unknown one: usage and exit 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
