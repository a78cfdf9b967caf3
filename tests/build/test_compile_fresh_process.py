"""torch.compile(fullgraph=True) of every op as the FIRST thing a process does.

In a fresh process the C++ library is not loaded yet; the backend check that
loads it used to run inside the traced code and stop Dynamo ("Unsupported
context manager (lock)"). Each case runs in its own interpreter, so nothing
this test process loaded can hide the defect; which op comes first does not
matter (they share the check, which the first test asserts per op). Dynamo is what failed, so the
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
from spark_ext.ops import _dispatch

ROOT = Path(__file__).resolve().parents[2]

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


def compile_first(ops: list[str], backend: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter: compile and run each op in turn on ``backend``, comparing with eager."""
    calls = {op: CALLS[op].replace("BACKEND", repr(backend)) for op in ops}
    code = textwrap.dedent(f"""
        import torch
        import spark_ext
        from spark_ext import _extension
        assert not _extension.is_loaded(), "the library must not be loaded before the first compile"
        torch.manual_seed(0)
        a = torch.rand(2, 3, 4, 4, requires_grad=True)
        for op, call in {calls!r}.items():
            f = eval("lambda a: " + call)
            got = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
            want = f(a)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            assert all(torch.equal(g, w) for g, w in zip(got, want)), op
            sum(g.float().sum() for g in got if g.requires_grad).backward()
            print(op, "ok")
    """)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("op", sorted(CALLS))
def test_compiled_library_checks_run_outside_the_trace(op):
    """Every op's compiled backends check the library in a way Dynamo runs as plain Python, not traces."""
    backends = _dispatch.registered_backends(op)
    assert "cpp" in backends
    for backend in ("cpp", "cuda"):
        if backend in backends:
            assert getattr(_dispatch._UNAVAILABLE[backend], "_dynamo_marked_constant", False), (op, backend)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_compile_is_the_first_call_in_a_fresh_process(backend):
    if not _extension.is_available():
        pytest.skip(f"C++ library unavailable: {_extension.unavailable_reason()}")
    # the first op's check loads the library while Dynamo traces; each op then needs its fakes
    result = compile_first(sorted(CALLS), backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"{op} ok" in result.stdout for op in CALLS), result.stdout


def test_compile_with_auto_backend_when_the_library_cannot_load():
    """auto falls back (warning once, at trace time) instead of breaking the fullgraph trace."""
    result = compile_first(["fused_weighted_kd"], "auto", env={"SPARK_EXT_FORCE_JIT": "1", "SPARK_EXT_NO_JIT": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused_weighted_kd ok" in result.stdout
    assert result.stderr.count("backend 'cpp' for fused_weighted_kd is unavailable") == 1, result.stderr[-3000:]
