"""Building and loading the C++/CUDA library (spark_ext/_extension.py, setup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import spark_ext
from spark_ext import _build, _extension
from spark_ext.ops import _dispatch

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A loader that has not loaded anything yet (the real library stays loaded in this process).

    Its JIT cache is an empty folder: a build of the current sources cached by
    an earlier run would otherwise make ``status()`` load it.
    """
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "error": None, "how": None, "path": None, "info": None})
    monkeypatch.setenv("SPARK_EXT_CACHE", str(tmp_path / "jit-cache"))
    monkeypatch.setattr(_extension, "_announced", False)

    def never(path):
        raise AssertionError(f"must not load {path}")

    monkeypatch.setattr(torch.ops, "load_library", never)


def test_library_loads_and_reports_what_it_is():
    _extension.load()
    assert _extension.is_loaded() and _extension.is_available()
    line = _extension.status()
    assert line.startswith("loaded (") and "\n" not in line
    assert f"built for torch {torch.__version__}" in line
    fields = dict(kv.split("=", 1) for kv in torch.ops.spark_ext.build_info().split(";"))
    assert fields["torch"] == torch.__version__
    assert fields["cuda"] in ("0", "1") and fields["cpu_isa"] in ("default", "avx2", "avx512")
    assert _extension.has_cuda_kernels() == (fields["cuda"] == "1")


def test_aot_mismatch_reasons():
    ok = {"torch": "2.13.0+cpu", "cuda": False, "sources": "abc"}
    assert _extension.aot_mismatch(ok, "2.13.0+cpu", "abc") is None
    assert _extension.aot_mismatch(ok, "2.13.0+cpu", None) is None
    assert "missing" in _extension.aot_mismatch(None, "2.13.0+cpu", "abc")
    why = _extension.aot_mismatch(ok, "2.14.1+cu128", "abc")
    assert "built against torch 2.13.0+cpu" in why and "this is torch 2.14.1+cu128" in why
    assert "sources have changed" in _extension.aot_mismatch(ok, "2.13.0+cpu", "def")


def test_stale_aot_library_is_never_loaded_and_a_failed_rebuild_says_why(fresh_state, monkeypatch, tmp_path, capsys):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"")
    monkeypatch.setattr(_extension, "aot_library", lambda: fake)
    monkeypatch.setattr(_extension, "aot_info", lambda: {"torch": "0.0.1", "sources": "x"})

    def no_compiler(version):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(_extension, "_jit_build", no_compiler)
    assert "stale" in _extension.status() and "built against torch 0.0.1" in _extension.status()
    with pytest.raises(RuntimeError) as info:
        _extension.load()
    message = str(info.value)
    assert "built against torch 0.0.1" in message and "JIT build failed: no C++ compiler found" in message
    assert "rebuilding just in time" in capsys.readouterr().err
    # remembered: later calls answer at once with the same reason
    assert _extension.unavailable_reason() == message
    assert not _extension.is_available()
    assert _extension.status() == message


def test_no_jit_env_fails_clearly(fresh_state, monkeypatch):
    monkeypatch.setattr(_extension, "aot_library", lambda: None)
    monkeypatch.setenv("SPARK_EXT_NO_JIT", "1")
    with pytest.raises(RuntimeError, match="JIT build disabled by SPARK_EXT_NO_JIT"):
        _extension.load()


def test_status_before_loading_never_builds(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "aot_library", lambda: None)
    monkeypatch.setenv("SPARK_EXT_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(_extension, "_jit_build", lambda v: pytest.fail("status() must not build"))
    line = _extension.status()
    assert line.startswith("not built ahead of time; builds just in time on first use into")


def test_auto_falls_back_with_one_warning_when_the_library_is_unavailable(monkeypatch):
    _extension.load()
    monkeypatch.setattr(_extension, "cpp_unavailable", lambda: "spark_ext C++ library unavailable: test")
    monkeypatch.setattr(_dispatch, "_warned", set())
    x, step = torch.randn(4, 5), torch.tensor([0.1])
    with pytest.warns(RuntimeWarning, match="backend 'cpp' for lsq_fake_quant is unavailable"):
        y = spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="auto")
    assert torch.equal(y, spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="auto")
    with pytest.raises(spark_ext.BackendUnavailableError, match="unavailable: test"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="cpp")


def test_auto_picks_cpp_for_cpu_kernel_dtypes_and_reference_for_float64():
    _extension.load()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _dispatch.resolve("lsq_fake_quant", "auto", torch.zeros(1, dtype=dtype))[0] == "cpp"
    assert _dispatch.resolve("lsq_fake_quant", "auto", torch.zeros(1, dtype=torch.float64))[0] == "reference"
    with pytest.raises(spark_ext.BackendUnavailableError, match="backend 'cuda' cannot run here"):
        _dispatch.resolve("fake_quantize_learnable_per_tensor_affine", "cuda", torch.zeros(1))


@pytest.mark.parametrize("python_ops_first", [True, False])
def test_coexists_with_python_custom_ops_in_the_same_namespace(python_ops_first):
    """TORCH_LIBRARY(spark_ext) and Python torch.library.custom_op("spark_ext::...") in either order.

    ``import spark_ext`` registers the Triton ops (custom_op, FRAGMENT libraries);
    the library-first case therefore loads the .so before importing spark_ext.
    """
    _extension.load()
    define = """
        @torch.library.custom_op("spark_ext::_probe_double", mutates_args=())
        def probe(x: torch.Tensor) -> torch.Tensor:
            return x * 2
        import spark_ext
    """
    load = """
        torch.ops.load_library(LIB)  # the same file the loader picks, so no second TORCH_LIBRARY
    """
    body = (define + load) if python_ops_first else (load + define)
    result = python(
        f"import torch\nLIB = {_extension._state['path']!r}\n"
        + textwrap.dedent(body)
        + textwrap.dedent("""
        from spark_ext import _extension
        _extension.load()
        x = torch.randn(8)
        assert torch.equal(torch.ops.spark_ext._probe_double(x), x * 2)
        assert torch.ops.spark_ext.fused_weighted_kd_triton is not None
        y = spark_ext.lsq_fake_quant(x, torch.tensor([0.1]), bits=4, signed=True, backend="cpp")
        print("ok", y.shape)
        """),
        env={"SPARK_EXT_NO_JIT": "1"} if _extension._state["how"] == "AOT" else None,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_doctor_prints_the_library_status():
    result = python("from spark_ext.cli import main; main(['doctor'])")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "C++/CUDA library: " in result.stdout
    assert "  CUDA kernels: " in result.stdout  # compiled in (for which GPUs), or why not
    assert "  huge-page outputs: " in result.stdout  # active, off, or why the kernel ignores the advice
    assert "lsq_fake_quant: " in result.stdout and "cpp" in result.stdout


def test_setup_py_needs_no_torch():
    """With build isolation there is no torch: setup.py must still run (and build nothing)."""
    result = python(
        """
        import sys
        sys.modules["torch"] = None  # import torch -> ImportError
        sys.argv = ["setup.py", "--name"]
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__file__": "setup.py", "__name__": "__main__"})
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spark_ext" in result.stdout or "spark-ext" in result.stdout


def test_shipped_sources_cover_the_build():
    src = _build.source_dir()
    assert src is not None
    for rel in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.HEADERS:
        assert (src / rel).is_file(), rel
    assert _build.version_define("2.14.0a0+git1234") == "-DSPARK_EXT_TORCH_VERSION=2.14.0a0+git1234"


@pytest.mark.slow
def test_jit_build_from_scratch(tmp_path):
    """The path `pip install .` (build isolation) takes: compile on first use, cache, reuse."""
    cache = Path(os.environ.get("SPARK_EXT_TEST_JIT_CACHE", Path.home() / ".cache" / "spark_ext_test_jit"))
    code = """
        from spark_ext import _extension
        _extension.load()
        print(_extension.status())
    """
    env = {"SPARK_EXT_FORCE_JIT": "1", "SPARK_EXT_CACHE": str(cache), "SPARK_EXT_NO_CUDA": "1"}
    first = python(code, env=env, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("loaded (JIT") and str(cache) in first.stdout
    second = python(code, env=env)  # cached: no build, no announcement
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building the C++ library" not in second.stderr


# --------------------------------------------------------------------------
# Build configuration: CUDA architectures, skip reasons, one-line failures
# --------------------------------------------------------------------------

NVCC13 = {"7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1"}


def test_arch_plan_prefers_the_users_list_then_the_visible_gpus_then_the_default():
    assert _build.cuda_arch_plan("8.6", [(9, 0)], NVCC13) == (None, "TORCH_CUDA_ARCH_LIST=8.6")
    value, why = _build.cuda_arch_plan(None, [(9, 0)], NVCC13)
    assert value is None and "9.0" in why and "visible GPU" in why  # torch builds for the visible device
    value, why = _build.cuda_arch_plan(None, [(9, 0), (8, 0), (9, 0)], None)
    assert value is None and "8.0;9.0" in why
    for unset in (None, "", "  "):  # no GPU visible: torch alone would index an empty list
        value, why = _build.cuda_arch_plan(unset, [], NVCC13)
        assert value == _build.DEFAULT_CUDA_ARCH_LIST and "no GPU visible" in why
    assert _build.cuda_arch_plan(None, [], None)[0] == _build.DEFAULT_CUDA_ARCH_LIST


def test_default_arch_list_drops_what_nvcc_lacks_and_keeps_ptx():
    value, why = _build.cuda_arch_plan(None, [], {"8.0", "8.6", "9.0", "10.0"})
    assert value == "8.0;9.0+PTX" and "less what this nvcc lacks" in why
    assert _build.cuda_arch_plan(None, [], {"7.5", "8.0"})[0] == "7.5;8.0+PTX"
    assert _build.cuda_arch_plan(None, [], {"10.0", "12.0"})[0] == "12.0+PTX"
    assert {a.split("+")[0] for a in _build.DEFAULT_CUDA_ARCH_LIST.split(";")} <= NVCC13


def test_torch_accepts_the_default_arch_list():
    """The list, put in TORCH_CUDA_ARCH_LIST, is what torch turns into -gencode flags (no GPU queried)."""
    from torch.utils import cpp_extension

    with _build.arch_list_env(_build.DEFAULT_CUDA_ARCH_LIST):
        flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_75,code=sm_75" in flags and "-gencode=arch=compute_90,code=compute_90" in flags


def test_arch_list_env_sets_and_restores(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with _build.arch_list_env("8.0"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    with _build.arch_list_env("8.0"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    with _build.arch_list_env(None):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_current_arch_plan_without_a_gpu_uses_the_default(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(_build, "nvcc_archs", lambda: NVCC13)
    assert _extension.current_arch_plan()[0] == _build.DEFAULT_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert _extension.current_arch_plan() == (None, "TORCH_CUDA_ARCH_LIST=8.9")


def test_cuda_skip_reasons_say_why_and_what_to_do(monkeypatch):
    monkeypatch.delenv("SPARK_EXT_NO_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA" in _extension.cuda_build_possible()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_build, "_nvcc", lambda: None)
    assert "nvcc not found" in _extension.cuda_build_possible() and "CUDA_HOME" in _extension.cuda_build_possible()
    monkeypatch.setattr(_build, "_nvcc", lambda: Path("/usr/local/cuda/bin/nvcc"))
    monkeypatch.setattr(_build, "use_cuda_toolkit", lambda version: Path("/opt/no-toolkit"))
    assert "no libcudart.so in the CUDA toolkit at /opt/no-toolkit" in _extension.cuda_build_possible()
    monkeypatch.setattr(_build, "_has_cudart", lambda home: True)
    monkeypatch.setattr(_build, "_nvcc_output", lambda *a: "Cuda compilation tools, release 13.0, V13.0.88")
    why = _extension.cuda_build_possible()
    assert "nvcc is CUDA 13.0" in why and "CUDA 12.8" in why and "CUDA_HOME" in why
    monkeypatch.setattr(_build, "_nvcc_output", lambda *a: "Cuda compilation tools, release 12.9, V12.9.1")
    assert _extension.cuda_build_possible() is None
    monkeypatch.setenv("SPARK_EXT_NO_CUDA", "1")
    assert _extension.cuda_build_possible() == "SPARK_EXT_NO_CUDA is set"


def test_build_failure_is_one_line_with_the_first_compiler_error(tmp_path):
    output = (
        "Error building extension 'spark_ext_C_1234':\n[1/3] c++ -c library.cpp\nFAILED: library.o\n"
        "csrc/library.cpp:12:5: error: 'foo' was not declared in this scope\n   12 |     foo();\n"
        "csrc/library.cpp:13:5: error: second\nninja: build stopped: subcommand failed.\n"
    )
    line = _build.build_failure(RuntimeError(output), tmp_path / "build-error.log", with_cuda=True)
    assert "\n" not in line
    assert line.startswith("build failed: csrc/library.cpp:12:5: error: 'foo' was not declared")
    assert str(tmp_path / "build-error.log") in line and "SPARK_EXT_NO_CUDA=1" in line and "reference" in line
    # what a user met: an exception from inside torch's build tooling, now named, with advice
    line = _build.build_failure(IndexError("list index out of range"), None, with_cuda=False)
    assert line.startswith("build failed: IndexError: list index out of range (") and "\n" not in line
    assert "SPARK_EXT_VERBOSE_BUILD=1" in line and "SPARK_EXT_NO_CUDA" not in line


def test_failed_jit_build_is_reported_in_one_line_with_its_log(fresh_state, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(_extension, "aot_library", lambda: None)
    monkeypatch.setenv("SPARK_EXT_NO_CUDA", "1")

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x':\nlibrary.cpp:1:1: error: boom\nninja: build stopped")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(RuntimeError) as info:
        _extension.load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("spark_ext C++ library unavailable: JIT build failed: library.cpp:1:1: error: boom")
    log = Path(message.split("full output in ")[1].split(";")[0])
    assert log.is_file() and "error: boom" in log.read_text()
    assert _extension.status() == message  # what `spark-ext doctor` prints


def test_cuda_status_says_what_would_be_built(fresh_state, monkeypatch):
    monkeypatch.setattr(_extension, "cuda_build_possible", lambda: "this torch (2.13.0+cpu) has no CUDA")
    assert _extension.cuda_status() == "would not be compiled: this torch (2.13.0+cpu) has no CUDA"
    monkeypatch.setattr(_extension, "cuda_build_possible", lambda: None)
    monkeypatch.setattr(
        _extension, "current_arch_plan", lambda: ("7.5;8.0;9.0+PTX", "the default list 7.5;8.0;9.0+PTX")
    )
    assert _extension.cuda_status() == "would be compiled for the default list 7.5;8.0;9.0+PTX"


def test_jit_builds_for_other_architectures_are_not_reused(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_build_possible", lambda: None)
    monkeypatch.setattr(_extension, "current_arch_plan", lambda: (None, "TORCH_CUDA_ARCH_LIST=8.0"))
    first = _extension.jit_target("2.14.1+cu130")[0]
    monkeypatch.setattr(_extension, "current_arch_plan", lambda: (None, "TORCH_CUDA_ARCH_LIST=9.0"))
    assert _extension.jit_target("2.14.1+cu130")[0] != first and "-cuda-" in first.name


def test_jit_builds_of_two_installations_do_not_share_a_folder(monkeypatch, tmp_path):
    # ninja's build file names the sources' absolute paths: a shared folder rebuilt on every switch
    monkeypatch.setattr(_extension, "cuda_build_possible", lambda: "no CUDA here")
    monkeypatch.setattr(_extension, "sources_hash", lambda src=None: "0123456789abcdef")
    folders = []
    for name in ("checkout_a", "checkout_b"):
        monkeypatch.setattr(_extension, "source_dir", lambda name=name: tmp_path / name / "csrc")
        folders.append(_extension.jit_target("2.13.0+cpu")[0])
    assert folders[0] != folders[1] and all("-cpu-0123456789abcdef-" in f.name for f in folders)


def test_a_wrapper_nvcc_outside_the_toolkit_finds_the_toolkit(monkeypatch, tmp_path):
    """nvcc on PATH as a wrapper script (/usr/local/bin/nvcc): torch guesses /usr/local, which has no libcudart."""
    from torch.utils import cpp_extension

    wrapper_home, toolkit = tmp_path / "local", tmp_path / "cuda-13.0"
    (wrapper_home / "bin").mkdir(parents=True)
    (wrapper_home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "lib64").mkdir()
    (toolkit / "lib64" / "libcudart.so").write_text("")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper_home))
    monkeypatch.setattr(_build.shutil, "which", lambda name: str(toolkit / "bin" / "nvcc"))
    assert _build.use_cuda_toolkit("13.0") == toolkit
    assert cpp_extension.CUDA_HOME == str(toolkit) and os.environ["CUDA_HOME"] == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(wrapper_home))  # the user's choice is kept
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper_home))
    assert _build.use_cuda_toolkit("13.0") == wrapper_home


def test_a_lock_file_left_by_a_killed_build_is_cleared(tmp_path, capsys):
    # torch's cpp_extension waits forever on the "lock" file of a build that was killed.
    (tmp_path / "lock").write_text("")
    with _extension._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "left by a build that was stopped" in capsys.readouterr().err
    with _extension._build_lock(tmp_path):  # nothing stale: nothing said
        pass
    assert capsys.readouterr().err == ""
