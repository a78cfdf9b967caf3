"""Loads the compiled C++/CUDA library that defines ``torch.ops.spark_ext.*``.

Two ways to get it, tried in this order by :func:`load`:

1. **Ahead of time.** ``pip install --no-build-isolation .`` (torch already
   installed) makes setup.py compile ``spark_ext/_C*.so`` and write
   ``spark_ext/_C_build.json`` beside it (the torch version and a hash of the
   sources it was built from). It is used when both match the running torch
   and the shipped sources.
2. **Just in time.** Otherwise (``pip install .`` with build isolation, where
   torch was absent at build time, a torch upgrade, or edited sources) the
   library is compiled on first use with ``torch.utils.cpp_extension.load`` and
   ninja into ``$SPARK_EXT_CACHE`` (default ``~/.cache/spark_ext``), in a folder
   named after the torch version, the source hash and where the sources are, and reused afterwards.
   The first build says so once on stderr (about a minute).

CUDA kernels are compiled only where torch has CUDA and an nvcc of the same
major version is found (``SPARK_EXT_NO_CUDA=1`` skips them), for the
architectures :func:`cuda_arch_plan` picks: ``TORCH_CUDA_ARCH_LIST`` when set,
else the visible GPUs', else :data:`DEFAULT_CUDA_ARCH_LIST` (no GPU visible: a
Docker build, a login node, CI). Only one library may define the ``spark_ext``
namespace in a process, so whichever loads first stays.

A build that fails is reported in one line (why, and what to do; the full
compiler output goes to a log file), which ``spark-ext doctor`` shows.

What is built, with which flags and for which GPUs is :mod:`spark_ext._build`
(read by setup.py too); this module finds, builds and loads the library and says
which backends it makes available.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Optional

from ._build import (
    AOT_INFO,
    AOT_NAME,
    CPU_SOURCES,
    CUDA_SOURCES,
    PACKAGE_DIR,
    arch_list_env,
    build_failure,
    compile_flags,
    cuda_build_possible,
    current_arch_plan,
    openmp_flags,
    source_dir,
    sources_hash,
)

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "how": None, "path": None, "info": None}
_announced = False


def cache_root() -> Path:
    env = os.environ.get("SPARK_EXT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spark_ext"


def _base_version(v: str) -> str:
    return v.split("+")[0]


# --------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------


def aot_library() -> Optional[Path]:
    """The ahead-of-time built library inside the package, if any."""
    for suffix in EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / (AOT_NAME + suffix)
        if path.is_file():
            return path
    return None


def aot_info() -> Optional[dict]:
    try:
        return json.loads((PACKAGE_DIR / AOT_INFO).read_text())
    except (OSError, ValueError):
        return None


def aot_mismatch(info: Optional[dict], torch_version: str, src_hash: Optional[str]) -> Optional[str]:
    """Why the AOT library must not be loaded (None when it may).

    Loading a library built against another torch can fail on missing symbols
    or, worse, load and misbehave, so the recorded version must match exactly.
    """
    if info is None:
        return f"{AOT_INFO} is missing or unreadable"
    built = info.get("torch")
    if built != torch_version:
        return f"it was built against torch {built}, this is torch {torch_version}"
    if src_hash is not None and info.get("sources") not in (None, src_hash):
        return "its sources have changed since it was built"
    return None


def _announce(message: str) -> None:
    global _announced
    if not _announced:
        _announced = True
        print(message, file=sys.stderr, flush=True)


def jit_target(torch_version: str) -> tuple[Path, str, bool]:
    """(build folder, library name, with CUDA) of the JIT build for this torch and these sources.

    A CUDA build's folder also names its architectures: a build for other GPUs is not reused. It also
    names where the sources are: ninja's build file holds their absolute paths, so two installations
    of the same sources (two checkouts, an editable and a regular install) sharing one folder would
    each rebuild the other's library on every first use.
    """
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources are not installed (expected spark_ext/csrc/)")
    with_cuda = cuda_build_possible() is None
    digest = sources_hash(src)
    kind = "cpu"
    if with_cuda:
        kind = "cuda-" + hashlib.sha256(current_arch_plan()[1].encode()).hexdigest()[:6]
    where = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:6]
    build_dir = cache_root() / f"{_base_version(torch_version)}-{kind}-{digest}-{where}"
    return build_dir, f"spark_ext_C_{digest[:8]}", with_cuda


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold an OS lock on ``build_dir`` for a build, and clear a lock file a killed build left there.

    torch's ``cpp_extension.load`` marks a build in progress with a ``lock`` file
    that a process killed mid-build never removes; every later build would then
    wait for it forever. Builds of the same folder take this ``fcntl`` lock
    first, which the OS releases when its holder dies, so a ``lock`` file found
    while holding it is stale and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file alone
        yield
        return
    with open(build_dir / "spark_ext_build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                print(f"spark_ext: removing {stale}, left by a build that was stopped", file=sys.stderr, flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit_build(torch_version: str) -> Path:
    import torch  # noqa: F401  (cpp_extension needs it imported)
    from torch.utils import cpp_extension

    src = source_dir()
    build_dir, name, with_cuda = jit_target(torch_version)
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / f"{name}.so"
    if not target.exists():
        _announce(
            f"spark_ext: building the C++ library (first use, ~1 min{', more with CUDA kernels' if with_cuda else ''}) "
            f"into {build_dir} …"
        )
    sources = [str(src / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    cflags, nvcc_flags = compile_flags(torch_version, with_cuda)
    arch_value = current_arch_plan()[0] if with_cuda else None
    log = build_dir / "build-error.log"
    try:
        with _build_lock(build_dir), arch_list_env(arch_value):
            cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_cuda_cflags=nvcc_flags,
                extra_ldflags=openmp_flags(),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=bool(os.environ.get("SPARK_EXT_VERBOSE_BUILD")),
            )
    except Exception as exc:
        try:
            log.write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:
            log = None
        raise RuntimeError("JIT " + build_failure(exc, log, with_cuda)) from exc
    return target


def _check_loaded(torch_version: str) -> str:
    import torch

    info = torch.ops.spark_ext.build_info()
    fields = dict(item.split("=", 1) for item in info.split(";"))
    built = fields.get("torch", "?")
    if _base_version(built) != _base_version(torch_version):
        raise RuntimeError(f"library reports torch {built} but torch {torch_version} is running")
    return info


def _load_locked() -> None:
    import torch

    version = torch.__version__
    reasons = []
    aot = aot_library()
    if aot is not None and not os.environ.get("SPARK_EXT_FORCE_JIT"):
        src = source_dir()
        why = aot_mismatch(aot_info(), version, sources_hash(src) if src else None)
        if why is None:
            torch.ops.load_library(str(aot))
            _state.update(how="AOT", path=str(aot))
        else:
            reasons.append(f"not using {aot.name}: {why}")
    if _state["how"] is None:
        if os.environ.get("SPARK_EXT_NO_JIT"):
            raise RuntimeError("; ".join(reasons + ["JIT build disabled by SPARK_EXT_NO_JIT"]))
        if reasons:
            _announce(f"spark_ext: {reasons[0]}; rebuilding just in time")
        try:
            path = _jit_build(version)
        except Exception as exc:  # compiler missing, build error, ... (_jit_build words its own)
            why = str(exc) if str(exc).startswith("JIT build failed") else f"JIT {build_failure(exc, None, False)}"
            raise RuntimeError("; ".join(reasons + [why])) from exc
        _state.update(how="JIT", path=str(path))
    _state["info"] = _check_loaded(version)
    _state["loaded"] = True


def load() -> None:
    """Load the library (building it first if needed); raise ``RuntimeError`` saying why it cannot.

    Idempotent and thread-safe; a failure is remembered and re-raised.
    """
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            _load_locked()
        except Exception as exc:
            _state["error"] = f"spark_ext C++ library unavailable: {exc}"
            raise RuntimeError(_state["error"]) from exc


def _ready_without_build() -> bool:
    import torch

    src = source_dir()
    aot = aot_library()
    if aot is not None and not os.environ.get("SPARK_EXT_FORCE_JIT"):
        if aot_mismatch(aot_info(), torch.__version__, sources_hash(src) if src else None) is None:
            return True
    try:
        build_dir, name, _ = jit_target(torch.__version__)
    except RuntimeError:
        return False
    return (build_dir / f"{name}.so").exists()


def is_loaded() -> bool:
    """True once :func:`load` succeeded (never builds; safe inside ``torch.compile``)."""
    return _state["loaded"]


def is_available() -> bool:
    """True when the library is loaded or can be loaded now (may build it)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> Optional[str]:
    """None when loaded (loading it if needed), else the reason it cannot be: for the dispatcher."""
    if _state["loaded"]:
        return None
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def has_cuda_kernels() -> bool:
    """True when the loaded library contains the CUDA kernels."""
    return _state["loaded"] and ";cuda=1" in (_state["info"] or "")


def status() -> str:
    """One line for ``spark-ext doctor``: what is loaded, or what would be and how.

    Loads the library when that needs no compilation (a matching AOT module or
    a cached JIT build); never builds.
    """
    if not _state["loaded"] and _state["error"] is None and _ready_without_build():
        unavailable_reason()  # loads; a failure is reported below
    if _state["loaded"]:
        fields = dict(item.split("=", 1) for item in _state["info"].split(";"))
        cuda = "with CUDA kernels" if fields.get("cuda") == "1" else "CPU only"
        threads = "OpenMP threads" if fields.get("openmp") == "1" else "one thread"
        return (
            f"loaded ({_state['how']}, built for torch {fields.get('torch')}, {cuda}, "
            f"CPU kernels: {fields.get('cpu_isa')}, {threads}) from {_state['path']}"
        )
    if _state["error"]:
        return _state["error"]
    import torch

    aot = aot_library()
    src = source_dir()
    if aot is not None:
        why = aot_mismatch(aot_info(), torch.__version__, sources_hash(src) if src else None)
        if why is None:
            return f"built ahead of time ({aot.name}), loads on first use"
        prefix = f"{aot.name} present but stale ({why}); "
    else:
        prefix = "not built ahead of time; "
    if src is None:
        return prefix + "C++ sources missing, cannot build"
    return prefix + f"builds just in time on first use into {cache_root()}"


def cuda_status() -> str:
    """One line for ``spark-ext doctor``: the GPU architectures of the CUDA kernels, or why there are none.

    About the loaded library when it is loaded, else about the build that would run now.
    """
    if _state["loaded"]:
        recorded = (aot_info() or {}).get("cuda_archs") if _state["how"] == "AOT" else None
        if has_cuda_kernels():
            archs = recorded or (current_arch_plan()[1] if _state["how"] == "JIT" else "architectures not recorded")
            return f"compiled in, for {archs}"
        if recorded and recorded.startswith("none: "):
            return f"not compiled in: {recorded[len('none: ') :]}"
        return f"not compiled in: {cuda_build_possible() or 'it could be now: rebuild to add them'}"
    why = cuda_build_possible()
    if why is not None:
        return f"would not be compiled: {why}"
    return f"would be compiled for {current_arch_plan()[1]}"


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_hugepage_mode(setting: Path = THP_SETTING) -> Optional[str]:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``: the bracketed word), None if unknown."""
    try:
        match = re.search(r"\[(\w+)\]", setting.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def huge_page_status(setting: Path = THP_SETTING) -> str:
    """One line for ``spark-ext doctor``: do the CPU kernels' large outputs get huge pages.

    Large outputs are allocated with ``madvise(MADV_HUGEPAGE)`` (csrc/cpu/huge_page_allocator.h)
    unless ``SPARK_EXT_HUGE_PAGES=0``; the advice takes effect when the kernel's THP mode is
    ``always`` or ``madvise``. Reads the loaded library's threshold, else the environment.
    """
    if not sys.platform.startswith("linux"):
        return "off (Linux only)"
    if _state["loaded"]:
        import torch

        try:
            threshold = int(torch.ops.spark_ext.huge_page_threshold())
        except ValueError as exc:  # a bad SPARK_EXT_HUGE_PAGES
            return f"error: {exc}"
        except (AttributeError, RuntimeError) as exc:  # a library built before the allocator existed
            return f"unknown: the loaded library cannot say ({exc})"
        if threshold == 0:
            return "off (SPARK_EXT_HUGE_PAGES=0)"
        limit = f"outputs >= {threshold / 2**20:g} MiB"
    else:
        if os.environ.get("SPARK_EXT_HUGE_PAGES") == "0":
            return "off (SPARK_EXT_HUGE_PAGES=0)"
        limit = "large outputs"
    mode = transparent_hugepage_mode(setting)
    if mode in ("always", "madvise"):
        return f"active for {limit} (transparent_hugepage: {mode})"
    if mode is None:
        return f"requested for {limit}, but {setting} is unreadable: the kernel may use 4 KiB pages"
    return f"requested for {limit}, but transparent_hugepage is '{mode}': 4 KiB pages (slower, not wrong)"


def huge_page_cache_status() -> str:
    """One line for ``spark-ext doctor``: what the cache of freed huge-page outputs holds, and its limit.

    Reads the loaded library; says so when none is loaded (nothing is cached then).
    """
    if not _state["loaded"]:
        return "empty (library not loaded)"
    import torch

    ops = torch.ops.spark_ext
    try:
        threshold, held, limit = ops.huge_page_threshold(), ops.huge_page_cache_bytes(), ops.huge_page_cache_limit()
    except ValueError as exc:  # a bad SPARK_EXT_HUGE_PAGES or SPARK_EXT_HUGE_PAGE_CACHE_MIB
        return f"error: {exc}"
    except (AttributeError, RuntimeError) as exc:  # a library built before the cache existed
        return f"unknown: the loaded library cannot say ({exc})"
    if threshold == 0:
        return f"unused (huge-page outputs off), limit {limit / 2**20:g} MiB"
    if limit == 0:
        return "off (limit 0: every large output is a new mapping)"
    return f"holds {held / 2**20:g} MiB of freed outputs for reuse, limit {limit / 2**20:g} MiB"


def empty_huge_page_cache() -> int:
    """Unmap the freed huge-page outputs kept for reuse (as ``torch.cuda.empty_cache()`` on the GPU).

    Outputs still in use are untouched; later large outputs map new memory (and
    refill the cache). Returns the bytes released: 0 when the library is not
    loaded, which then holds none.
    """
    if not _state["loaded"]:
        return 0
    import torch

    return int(torch.ops.spark_ext.empty_huge_page_cache())


def set_huge_page_cache_limit(nbytes: int) -> int:
    """Set the most bytes of freed huge-page outputs kept for reuse; returns the previous limit.

    0 turns the cache off. Lowering the limit unmaps the least recently freed
    outputs beyond it at once. The initial limit is ``SPARK_EXT_HUGE_PAGE_CACHE_MIB``
    MiB (default 1024). Loads the library (``RuntimeError`` if it cannot be).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    load()
    import torch

    return int(torch.ops.spark_ext.set_huge_page_cache_limit(nbytes))


# --------------------------------------------------------------------------
# Helpers for the op modules' dispatch registrations
# --------------------------------------------------------------------------

KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def cpp_unavailable() -> Optional[str]:
    """``unavailable`` for the ``cpp`` backend: None once the library is loaded."""
    return None if _state["loaded"] else unavailable_reason()


def cuda_unavailable() -> Optional[str]:
    """``unavailable`` for the ``cuda`` backend: the library must hold the CUDA kernels."""
    reason = cpp_unavailable()
    if reason is None and not has_cuda_kernels():
        return "the C++ library was built without CUDA kernels (torch without CUDA, or nvcc not found)"
    return reason


def _dtype_reason(dtype) -> Optional[str]:
    name = str(dtype).replace("torch.", "")
    if name not in KERNEL_DTYPES:
        return f"dtype {name} is not supported (float32, float16, bfloat16 only)"
    return None


def cpu_unsupported(device, dtype, forced: bool) -> Optional[str]:
    """``unsupported`` for the ``cpp`` backend: CPU tensors of a kernel dtype."""
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device.type}"
    return _dtype_reason(dtype)


def cuda_unsupported(device, dtype, forced: bool) -> Optional[str]:
    """``unsupported`` for the ``cuda`` backend: CUDA tensors of a kernel dtype."""
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device.type}"
    return _dtype_reason(dtype)
