"""torch.compile(fullgraph=True) of every op as the FIRST thing a process does (issue 10, defect 2).

In a fresh process the C++ library is not loaded yet; the backend check that
loads it used to run inside the traced code and stop Dynamo ("Unsupported
context manager (lock)"). Each case runs in its own interpreter, so nothing
this test process loaded can hide the defect. Dynamo is what failed, so the
cheap ``aot_eager`` compiler backend suffices (inductor is covered elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spark_ext import _extension

ROOT = Path(__file__).resolve().parents[1]

CALLS = {
    "difficulty_signals": "spark_ext.difficulty_signals(a, a * 0.5, a * 0.25, (2, 2), backend=BACKEND)",
    "fused_weighted_kd": "spark_ext.fused_weighted_kd(a, a * 0.5, backend=BACKEND)",
    "lsq_fake_quant": "spark_ext.lsq_fake_quant(a, torch.tensor([0.1]), bits=4, signed=True, backend=BACKEND)",
    "fake_quantize_learnable_per_tensor_affine": (
        "spark_ext.fake_quantize_learnable_per_tensor_affine(a, torch.tensor([0.1]), torch.tensor([0.0]), -8, 7,"
        " backend=BACKEND)"
    ),
    "fake_quantize_learnable_per_channel_affine": (
        "spark_ext.fake_quantize_learnable_per_channel_affine(a, torch.full((3,), 0.1), torch.zeros(3), 1, -8, 7,"
        " backend=BACKEND)"
    ),
}


def compile_first(op: str, backends: tuple[str, ...]) -> subprocess.CompletedProcess:
    """A fresh interpreter: compile and run ``op`` on each backend in turn, comparing with eager."""
    code = textwrap.dedent(f"""
        import torch
        import spark_ext
        from spark_ext import _extension
        assert not _extension.is_loaded(), "the library must not be loaded before the first compile"
        torch.manual_seed(0)
        a = torch.rand(2, 3, 4, 4, requires_grad=True)
        for BACKEND in {backends!r}:
            def f(a, BACKEND=BACKEND):
                out = {CALLS[op]}
                return out if isinstance(out, tuple) else (out,)
            got = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
            want = f(a)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), BACKEND
            sum(g.float().sum() for g in got if g.requires_grad).backward()
            print(BACKEND, "ok")
    """)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600
    )


def _library_loads_without_a_build() -> bool:
    return _extension.is_available() and _extension.is_loaded()


@pytest.mark.parametrize("op", sorted(CALLS))
def test_compile_is_the_first_call_in_a_fresh_process(op):
    if not _library_loads_without_a_build():
        pytest.skip(f"C++ library unavailable: {_extension.unavailable_reason()}")
    # reference first: it must not need the library; then cpp, which loads it during tracing
    result = compile_first(op, ("reference", "cpp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpp ok" in result.stdout


def test_compile_with_auto_backend_in_a_fresh_process():
    if not _library_loads_without_a_build():
        pytest.skip(f"C++ library unavailable: {_extension.unavailable_reason()}")
    result = compile_first("lsq_fake_quant", ("auto",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto ok" in result.stdout
