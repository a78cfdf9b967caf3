"""Build configuration of the C++/CUDA library: sources, compiler flags, CUDA toolkit and architectures.

Read by setup.py (ahead-of-time build) and by :mod:`spark_ext._extension` (just-in-time build). Imports
only the standard library at import time, so setup.py can read it without torch; the functions that need
torch import it when called.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
AOT_NAME = "_C"
AOT_INFO = "_C_build.json"

CPU_SOURCES = (
    "library.cpp",
    "autograd.cpp",
    "cpu/fake_quant_cpu.cpp",
    "cpu/span_kernels.cpp",
    "cpu/difficulty_cpu.cpp",
    "cpu/weighted_kd_cpu.cpp",
    "cpu/huge_page_allocator.cpp",
)
CUDA_SOURCES = ("cuda/fake_quant_cuda.cu",)
HEADERS = (
    "fake_quant.h",
    "kernel_dtypes.h",
    "cpu/span_kernels.h",
    "cpu/span_impl.h",
    "cpu/kd_row_impl.h",
    "cpu/parallel.h",
    "cpu/image_rows.h",
    "cpu/huge_page_allocator.h",
)

# -ffp-contract=off: no fused multiply-add, the kernels reproduce the
# reference bit for bit. -fno-trapping-math lets GCC if-convert selects.
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-Wno-psabi")
NVCC_FLAGS = ("-O3", "--fmad=false", "--expt-relaxed-constexpr")
# Where torch runs at::parallel_for on OpenMP (ATen/Config.h sets
# AT_PARALLEL_OPENMP to match torch's build), the parallel region is an inline
# `#pragma omp parallel` compiled into this library: without -fopenmp, in the
# compile and the link flags, it runs its body serially on one thread. At run
# time the library shares torch's OpenMP runtime (libgomp.so.1, already loaded
# by libtorch_cpu), so torch.set_num_threads governs it.
OPENMP_FLAGS = ("-fopenmp",)

# CUDA architectures compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is
# unset. Machine code for Turing (T4), Ampere (A100; sm_80 code also runs on
# 8.6/8.9 GPUs) and Hopper (H100/H200), plus Hopper PTX that the driver compiles
# once for newer GPUs (Blackwell). Every nvcc that can build for torch >= 2.11
# (CUDA >= 12.6, including 13.x, which dropped sm_50..sm_72) supports these.
# More architectures cost compile time (about one extra pass of nvcc each).
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


# --------------------------------------------------------------------------
# Sources, versions, flags (no torch needed)
# --------------------------------------------------------------------------


def source_dir() -> Optional[Path]:
    """``spark_ext/csrc``, the C++/CUDA sources (None if missing from this installation)."""
    return SOURCE_DIR if (SOURCE_DIR / CPU_SOURCES[0]).is_file() else None


def sources_hash(src: Optional[Path] = None) -> str:
    """Hash of every source and header plus the compiler flags (16 hex digits)."""
    src = src or source_dir()
    h = hashlib.sha256()
    for rel in CPU_SOURCES + CUDA_SOURCES + HEADERS:
        path = src / rel if src else None
        h.update(rel.encode())
        h.update(path.read_bytes() if path and path.is_file() else b"<missing>")
    h.update(repr((CXX_FLAGS, NVCC_FLAGS, OPENMP_FLAGS)).encode())
    return h.hexdigest()[:16]


def version_define(torch_version: str) -> str:
    """``-DSPARK_EXT_TORCH_VERSION=...``: the version as bare tokens (the C++ side stringifies them)."""
    return "-DSPARK_EXT_TORCH_VERSION=" + re.sub(r"[^0-9A-Za-z.+]", "_", torch_version)


def compile_flags(torch_version: str, with_cuda: bool) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) for the build, shared by setup.py and the JIT build (imports torch)."""
    defines = [version_define(torch_version), f"-DSPARK_EXT_WITH_CUDA={int(with_cuda)}"]
    return list(CXX_FLAGS) + openmp_flags() + defines, list(NVCC_FLAGS) + defines


def openmp_flags() -> list[str]:
    """``OPENMP_FLAGS`` when this torch was built with OpenMP, else none: for the C++ compile and the link."""
    import torch

    return list(OPENMP_FLAGS) if torch.backends.openmp.is_available() else []


def _nvcc() -> Optional[Path]:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    return nvcc if nvcc is not None and nvcc.exists() else None


@functools.cache
def _nvcc_output(*args: str) -> str:
    """stdout of ``nvcc ARGS`` ("" when it cannot run)."""
    nvcc = _nvcc()
    try:
        return subprocess.run([str(nvcc), *args], capture_output=True, text=True, timeout=60).stdout if nvcc else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _has_cudart(home) -> bool:
    return bool(home) and any(
        (Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib")
    )


def use_cuda_toolkit(cuda_version: str) -> Optional[Path]:
    """The CUDA toolkit to build with (``CUDA_HOME``), correcting torch's guess where it is wrong.

    Without ``CUDA_HOME`` torch takes the folder above the ``nvcc`` on PATH;
    when that ``nvcc`` is a wrapper outside the toolkit (``/usr/local/bin/nvcc``
    calling ``/usr/local/cuda-13.0/bin/nvcc``) the link then fails on
    ``-lcudart``. Then the toolkit of the resolved nvcc, ``/usr/local/cuda`` or
    ``/usr/local/cuda-<version>`` is used instead, if one holds libcudart
    (set in ``torch.utils.cpp_extension.CUDA_HOME`` and ``$CUDA_HOME``).
    """
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _has_cudart(home):
        return Path(home) if home else None
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates += [Path("/usr/local/cuda"), Path(f"/usr/local/cuda-{cuda_version}")]
    for candidate in candidates:
        if _has_cudart(candidate) and (candidate / "bin" / "nvcc").exists():
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = str(candidate)
            return candidate
    return Path(home) if home else None


def cuda_build_possible() -> Optional[str]:
    """None when CUDA kernels can be compiled here, else why not, in words (imports torch)."""
    if os.environ.get("SPARK_EXT_NO_CUDA"):
        return "SPARK_EXT_NO_CUDA is set"
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA"
    home = use_cuda_toolkit(torch.version.cuda)
    if _nvcc() is None:
        return f"nvcc not found (install the CUDA {torch.version.cuda} toolkit or set CUDA_HOME)"
    if not _has_cudart(home):
        return f"no libcudart.so in the CUDA toolkit at {home} (set CUDA_HOME to the toolkit's folder)"
    found = re.search(r"release (\d+)\.(\d+)", _nvcc_output("--version"))
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        # torch.utils.cpp_extension refuses a different major version
        return (
            f"nvcc is CUDA {found.group(1)}.{found.group(2)} but this torch was built with CUDA "
            f"{torch.version.cuda} (point CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit)"
        )
    return None


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = arch.split("+")[0].split(".")
    return int(major), int(minor[:1] or 0)


def cuda_arch_plan(
    env_value: Optional[str], visible: Sequence[tuple[int, int]], nvcc_archs: Optional[set[str]] = None
) -> tuple[Optional[str], str]:
    """(value to put in ``TORCH_CUDA_ARCH_LIST`` for the build, or None to leave it; description).

    ``env_value``: the user's ``TORCH_CUDA_ARCH_LIST`` (wins when set).
    ``visible``: compute capabilities of the visible GPUs; torch then builds
    for exactly those (None is returned: nothing to set).
    Otherwise :data:`DEFAULT_CUDA_ARCH_LIST`, less any architecture missing
    from ``nvcc_archs`` (``{"7.5", "8.0", ...}`` from ``nvcc --list-gpu-arch``;
    None: unknown, keep all); torch itself would fail on an empty list.
    """
    if env_value and env_value.strip():
        return None, f"TORCH_CUDA_ARCH_LIST={env_value.strip()}"
    if visible:
        archs = sorted({f"{major}.{minor}" for major, minor in visible}, key=_arch_key)
        return None, f"the visible GPU{'s' if len(visible) > 1 else ''}' architecture {';'.join(archs)}"
    archs = DEFAULT_CUDA_ARCH_LIST.split(";")
    kept = [a for a in archs if nvcc_archs is None or a.split("+")[0] in nvcc_archs]
    if not kept and nvcc_archs:
        kept = [max(nvcc_archs, key=_arch_key)]
    if kept and not kept[-1].endswith("+PTX"):
        kept[-1] += "+PTX"  # forward compatible with GPUs newer than the list
    value = ";".join(kept)
    note = "" if kept == archs else f", less what this nvcc lacks (from {DEFAULT_CUDA_ARCH_LIST})"
    return value, f"the default list {value} (no GPU visible, TORCH_CUDA_ARCH_LIST unset{note})"


def nvcc_archs() -> Optional[set[str]]:
    """Architectures this nvcc compiles for, as ``{"7.5", ...}``; None when it cannot tell."""
    found = re.findall(r"compute_(\d+)(\d)\b", _nvcc_output("--list-gpu-arch"))
    return {f"{major}.{minor}" for major, minor in found} or None


def current_arch_plan() -> tuple[Optional[str], str]:
    """:func:`cuda_arch_plan` for this machine (imports torch; asks nvcc only when needed)."""
    import torch

    env_value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    needs_nvcc = not (env_value and env_value.strip()) and not visible
    return cuda_arch_plan(env_value, visible, nvcc_archs() if needs_nvcc else None)


@contextlib.contextmanager
def arch_list_env(value: Optional[str]) -> Iterator[None]:
    """Sets ``TORCH_CUDA_ARCH_LIST`` to ``value`` (unless None) for the duration of a build."""
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = value
    try:
        yield
    finally:
        if value is not None:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def build_failure(exc: BaseException, log: Optional[Path], with_cuda: bool) -> str:
    """One line: why the build failed (the compiler's first error) and what to do."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building" not in line]
    cause = errors[0] if errors else (lines[0] if lines else type(exc).__name__)
    if len(cause) > 200:
        cause = cause[:197] + "..."
    if not errors and not isinstance(exc, (RuntimeError, OSError, subprocess.SubprocessError)):
        cause = f"{type(exc).__name__}: {cause}"  # an unexpected failure inside the build tooling
    todo = [f"full output in {log}" if log else "set SPARK_EXT_VERBOSE_BUILD=1 to see the compiler output"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        todo.append("install a C++ compiler (g++) or set CXX")
    if with_cuda:
        todo.append("SPARK_EXT_NO_CUDA=1 builds the CPU kernels only")
    todo.append("backend='reference' works without the library")
    return f"build failed: {cause} ({'; '.join(todo)})"
