"""``spark-ext doctor``: versions, devices, the C++/CUDA library's build status, each op's backends."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Optional

from spark_ext.commands._args import CommandParser


def main(argv: Optional[Sequence[str]] = None) -> int:
    CommandParser(prog="spark-ext doctor", description=__doc__).parse_args(argv)
    import torch

    import spark_ext

    print(f"spark_ext {spark_ext.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as exc:  # triton is optional off Linux
        print(f"triton: not importable ({exc})")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    try:
        from spark_ext import _extension

        print(f"C++/CUDA library: {_extension.status()}")
        print(f"  CUDA kernels: {_extension.cuda_status()}")
        print(f"  huge-page outputs: {_extension.huge_page_status()}")
        print(f"  huge-page cache: {_extension.huge_page_cache_status()}")
    except ImportError:
        print("C++/CUDA library: not part of this build")
    print(f"default backend: {spark_ext.get_default_backend()}")
    for op, backends in spark_ext.available_backends().items():
        rows = [name + ("" if reason is None else f" (unavailable: {reason})") for name, reason in backends.items()]
        print(f"  {op}: {', '.join(rows)}")
    return 0
