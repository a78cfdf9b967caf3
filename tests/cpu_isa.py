"""Run the same CPU-op calls once per instruction set (``SPARK_EXT_CPU_ISA``) and check the bits agree."""

import os
import subprocess
import sys

import torch

_HEADER = """
import torch
from spark_ext import _extension
_extension.load()
isa = dict(kv.split("=", 1) for kv in torch.ops.spark_ext.build_info().split(";"))["cpu_isa"]
gen = torch.Generator().manual_seed(0)
out = {}
"""


def assert_same_bits_on_every_cpu_isa(body: str, tmp_path) -> None:
    """``body`` fills ``out[key] = (output, gradients)`` using ``gen``; it runs in a fresh process per ISA.

    The library picks the best ISA the CPU has at or below the request, so every result is keyed by the
    ISA that really ran; the default (scalar) build is always among them and is the reference.
    """
    script = _HEADER + body + f"\ntorch.save(out, {str(tmp_path)!r} + '/' + isa + '.pt')\nprint(isa)\n"
    seen = {}
    for isa in ("default", "avx2", "avx512"):
        env = {**os.environ, "SPARK_EXT_CPU_ISA": isa}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        got = result.stdout.strip().splitlines()[-1]
        seen[got] = torch.load(tmp_path / f"{got}.pt")
    assert "default" in seen
    base = seen["default"]
    for isa, res in seen.items():
        for key in base:
            (y, grads), (y2, grads2) = base[key], res[key]
            assert torch.equal(y, y2), (isa, key)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads2)), (isa, key)
