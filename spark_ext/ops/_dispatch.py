"""Backend registry and selection shared by every public op.

Each op family module (``difficulty``, ``weighted_kd``, ``fake_quant``, ``lsq``)
registers one implementation per backend with :func:`register`. A public op
then calls :func:`resolve` with the backend the user asked for (or the
process-wide default) and the input tensor, and gets back the implementation
to run.

Backends (docs/spec.md §7):

============  ==================================================  ==========
name          what it is                                           devices
============  ==================================================  ==========
``triton``    fused Triton kernels (``spark_ext.kernels``)          CUDA; CPU
                                                                    only when
                                                                    forced
                                                                    (interpreter)
``cuda``      compiled CUDA kernels (``csrc/``)                     CUDA
``cpp``       compiled C++ kernels (``csrc/``)                      CPU
``reference`` pure PyTorch (:mod:`spark_ext.reference`)             any
============  ==================================================  ==========

``"auto"`` walks the op's registered backends in priority order and takes the
first that is available and supports the input's device and dtype. If a fast
backend that would have been chosen fails to load, ``auto`` warns once and
falls back; an explicitly requested backend never falls back, it raises
:class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

# Lower number = tried earlier by "auto". Triton and CUDA are only ever
# auto-selected for CUDA tensors (their `supports` says so), C++ for CPU tensors.
_PRIORITY = {"triton": 0, "cuda": 1, "cpp": 2, "reference": 3}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run this call."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    fn: the callable, taking the op's already-validated arguments.
    unavailable: returns ``None`` when the backend can be loaded here, else a
        sentence saying what is missing (checked lazily: loading may compile).
    unsupported: ``(device, dtype, forced) -> None | reason``; ``forced`` is
        True when the user named this backend (e.g. Triton on CPU runs only
        when forced, under the interpreter).
    """

    fn: Callable
    unavailable: Callable[[], Optional[str]]
    unsupported: Callable[[torch.device, torch.dtype, bool], Optional[str]]


_registry: dict[str, dict[str, Implementation]] = {}
_state = threading.local()
_global_default = "auto"
_warned: set[tuple[str, str]] = set()


def _always_available() -> Optional[str]:
    return None


def _supports_anything(device: torch.device, dtype: torch.dtype, forced: bool) -> Optional[str]:
    return None


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    unavailable: Callable[[], Optional[str]] = _always_available,
    unsupported: Callable[[torch.device, torch.dtype, bool], Optional[str]] = _supports_anything,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in _PRIORITY:
        raise ValueError(f"backend must be one of {tuple(_PRIORITY)}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = Implementation(fn, unavailable, unsupported)


def library_unavailable(which: str = "cpp_unavailable") -> Callable[[], Optional[str]]:
    """``unavailable`` of a compiled-library backend: ``spark_ext._extension.<which>()``.

    Looked up at call time, so tests can patch it. The library's ops get
    their fakes and autograd from the op modules' ``_extension.on_load`` hooks.

    Under ``torch.compile`` Dynamo must not trace this check: the first one in
    a process loads (maybe builds) the library behind a lock, which stops a
    ``fullgraph=True`` trace ("Unsupported context manager"). Marked as a
    constant result, Dynamo runs it as plain Python while tracing and bakes
    the answer in: the library, its fakes and autograd are in place before
    the op itself is traced.
    """
    from .. import _extension

    def unavailable() -> Optional[str]:
        return getattr(_extension, which)()

    return torch.compiler.assume_constant_result(unavailable)


def register_compiled(op: str, fn: Callable) -> None:
    """Register ``fn`` as ``op``'s ``cpp`` (CPU) and ``cuda`` backends: ops of the compiled library."""
    from .. import _extension

    register(op, "cpp", fn, unavailable=library_unavailable("cpp_unavailable"), unsupported=_extension.cpu_unsupported)
    register(op, "cuda", fn, unavailable=library_unavailable("cuda_unavailable"), unsupported=_extension.cuda_unsupported)


def check_backend_name(backend: object, argument: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


def set_default_backend(backend: str) -> None:
    """Set the process-wide backend used when an op is called with ``backend=None``."""
    global _global_default
    _global_default = check_backend_name(backend)


def get_default_backend() -> str:
    """The backend used for ``backend=None`` in this thread (see :func:`use_backend`)."""
    return getattr(_state, "override", None) or _global_default


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Context manager: ops called with ``backend=None`` in this thread use ``backend``."""
    check_backend_name(backend)
    previous = getattr(_state, "override", None)
    _state.override = backend
    try:
        yield
    finally:
        _state.override = previous


def registered_backends(op: str) -> list[str]:
    return sorted(_registry.get(op, {}), key=_PRIORITY.__getitem__)


# Under torch.compile this runs while Dynamo traces, as plain Python (a warning
# inside the traced code would break a fullgraph=True graph): once, like eagerly.
@torch.compiler.assume_constant_result
def _warn_once(op: str, backend: str, reason: str) -> None:
    if (op, backend) in _warned:
        return
    _warned.add((op, backend))
    warnings.warn(
        f"spark_ext: backend {backend!r} for {op} is unavailable ({reason}); "
        "falling back to the next backend. This warning is shown once.",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(op: str, backend: Optional[str], like: torch.Tensor) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``backend`` and a tensor like ``like``.

    Returns ``(backend_name, fn)``. Raises ``ValueError`` for an unknown name
    and :class:`BackendUnavailableError` for a named backend that cannot run.
    """
    name = check_backend_name(get_default_backend() if backend is None else backend)
    impls = _registry.get(op, {})
    device, dtype = like.device, like.dtype
    if name != "auto":
        impl = impls.get(name)
        if impl is None:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} is not implemented for this op; "
                f"available: {registered_backends(op)}"
            )
        reason = impl.unavailable() or impl.unsupported(device, dtype, True)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run here: {reason}")
        return name, impl.fn
    for candidate in registered_backends(op):
        impl = impls[candidate]
        if impl.unsupported(device, dtype, False):
            continue
        reason = impl.unavailable()
        if reason:
            _warn_once(op, candidate, reason)
            continue
        return candidate, impl.fn
    raise BackendUnavailableError(f"{op}: no backend supports {device} tensors of dtype {dtype}")
