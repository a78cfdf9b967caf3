"""Packaging: the package with its C++/CUDA sources (``spark_ext/csrc``) and the shipped teacher weights.

The C++/CUDA library (``torch.ops.spark_ext.*``, see spark_ext/_extension.py):

* ``pip install --no-build-isolation .`` (torch importable here): built ahead
  of time as ``spark_ext/_C*.so`` plus ``spark_ext/_C_build.json`` recording the
  torch version and source hash it was built from. CUDA kernels are included
  when this torch has CUDA and an nvcc of its major version is found, for
  ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs, else the default list
  of ``spark_ext/_build.py`` (no GPU visible). A skipped CUDA build or a
  failed build says why in one line.
* ``pip install .`` with build isolation (no torch in the build environment),
  or ``SPARK_EXT_NO_AOT=1``: nothing is compiled now; the library is built
  just in time on first use from the shipped sources and cached.

Nothing here imports torch unless it is importable, so both paths work.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    """spark_ext/_build.py (standard library only at import): source lists and flags."""
    spec = importlib.util.spec_from_file_location("_spark_ext_build_config", ROOT / "spark_ext" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aot_extension():
    """([extension], cmdclass) when the library can be built now, else ([], {})."""
    if os.environ.get("SPARK_EXT_NO_AOT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # build isolation: no torch, JIT build on first use instead
        return [], {}
    cfg = _build_config()
    no_cuda = cfg.cuda_build_possible()
    with_cuda = no_cuda is None
    if with_cuda:
        arch_value, archs = cfg.current_arch_plan()
        if arch_value is not None:  # torch.utils.cpp_extension reads it when it compiles
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_value
        print(f"spark_ext: building the C++ library with CUDA kernels for {archs}", file=sys.stderr)
    else:
        print(f"spark_ext: building the C++ library without CUDA kernels: {no_cuda}", file=sys.stderr)
    cflags, nvcc_flags = cfg.compile_flags(torch.__version__, with_cuda)
    sources = [f"spark_ext/csrc/{s}" for s in cfg.CPU_SOURCES + (cfg.CUDA_SOURCES if with_cuda else ())]
    factory = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = factory(
        name=f"spark_ext.{cfg.AOT_NAME}",
        sources=sources,
        extra_compile_args={"cxx": cflags, "nvcc": nvcc_flags},
        extra_link_args=cfg.openmp_flags(),
    )
    info = {
        "torch": torch.__version__,
        "cuda": with_cuda,
        "cuda_archs": archs if with_cuda else f"none: {no_cuda}",
        "sources": cfg.sources_hash(ROOT / "spark_ext" / "csrc"),
    }

    class BuildWithInfo(cpp_extension.BuildExtension):
        """Builds the library, then records what it was built against beside it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # the compiler output is above; end with what it means
                print(f"spark_ext: ahead-of-time {cfg.build_failure(exc, None, with_cuda)}", file=sys.stderr)
                raise
            for ext in self.extensions:
                target = Path(self.get_ext_fullpath(ext.name))
                (target.parent / cfg.AOT_INFO).write_text(json.dumps(info, indent=1) + "\n")

    return [extension], {"build_ext": BuildWithInfo.with_options(use_ninja=True)}


ext_modules, cmdclass = _aot_extension()

setup(
    # namespace packages: the source and weight folders (no __init__.py) ship as package data
    packages=find_namespace_packages(include=["spark_ext", "spark_ext.*"], exclude=["*.__pycache__"]),
    package_data={"": ["*.cpp", "*.h", "*.cu", "*.cuh", "*.pt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
