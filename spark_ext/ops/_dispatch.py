"""Backend registry and selection shared by every public op.

Each op family module (``difficulty``, ``weighted_kd``, ``fake_quant``, ``lsq``)
registers one implementation per backend with :func:`register`. A public op
then calls :func:`resolve` with the backend the user asked for (or the
process-wide default) and the input tensor, and gets back the implementation
to run. :func:`backend_for` and :func:`available_backends` answer, publicly,
which backend a call runs and which backends load here.

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

Each backend has one availability rule (:func:`unavailable`, :func:`unsupported`),
whatever the op. ``"auto"`` walks the op's registered backends in the order
above and takes the first that is available and supports the input's device
and dtype. If a fast backend that would have been chosen fails to load,
``auto`` warns once and falls back; an explicitly requested backend never falls back, it raises
:class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from .. import _extension
from .._validation import check_choice

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

# The order "auto" tries them in. Triton and CUDA only ever run CUDA tensors
# under "auto" (their rules below say so), C++ only CPU tensors.
_AUTO_ORDER = ("triton", "cuda", "cpp", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run this call."""


# --------------------------------------------------------------------------
# One availability rule per backend
# --------------------------------------------------------------------------
# unavailable(backend) -> None when the backend loads here, else why not
# (checked lazily: loading may compile). unsupported(backend, device, dtype,
# forced) -> None when it runs such tensors, else why not; ``forced`` is True
# when the user named the backend (Triton runs CPU tensors only then, under
# the interpreter). The compiled library's rules live in _extension.py and are
# looked up at call time, so tests can patch them.

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Whether a triton package is installed at all: a cheap path search now (no
# import: importing triton costs about a second), the real import on first use.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_triton_import_error: Optional[str] = None if _TRITON_FOUND else "triton is not installed"
_triton_checked = not _TRITON_FOUND


def _triton_unavailable() -> Optional[str]:
    """``None`` if Triton imports here, else why not (checked once, then cached).

    Under ``torch.compile`` it only reads the cached answer (tracing an import
    would break the graph); an unchecked install counts as available there and
    a broken one then fails loudly when the kernel module is imported.
    """
    global _triton_import_error, _triton_checked
    if not _triton_checked and not torch.compiler.is_compiling():
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything
            _triton_import_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
        _triton_checked = True
    return _triton_import_error


def _interpreter_active() -> bool:
    """Whether our kernels run under Triton's CPU interpreter.

    ``@triton.jit`` reads TRITON_INTERPRET when the kernel module is imported,
    so once ``spark_ext.kernels`` is loaded its own record decides.
    """
    utils = sys.modules.get("spark_ext.kernels._utils")
    if utils is not None:
        return bool(utils.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unsupported(device: torch.device, dtype: torch.dtype, forced: bool) -> Optional[str]:
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16 inputs, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not forced:
            return (
                "the Triton kernels run on CUDA tensors "
                "(CPU only when backend='triton' is forced, under the interpreter)"
            )
        if not _interpreter_active():
            return (
                "CPU tensors run the Triton kernels only under Triton's interpreter (tests only): "
                "set TRITON_INTERPRET=1 before spark_ext.kernels is first imported"
            )
        return None
    return f"the Triton kernels need CUDA tensors, got a {device.type} tensor"


# Under torch.compile Dynamo must not trace the compiled library's checks: the
# first one in a process loads (maybe builds) the library behind a lock, which
# stops a fullgraph=True trace ("Unsupported context manager"). Marked as
# constant results, Dynamo runs them as plain Python while tracing and bakes
# the answer in: the library, its fakes and autograd are in place before the
# op itself is traced.
@torch.compiler.assume_constant_result
def _cuda_library_unavailable() -> Optional[str]:
    return _extension.cuda_unavailable()


@torch.compiler.assume_constant_result
def _cpp_library_unavailable() -> Optional[str]:
    return _extension.cpp_unavailable()


# Each backend's "can it load here" check (the compiled ones are looked up at
# call time, so tests can patch spark_ext._extension).
_UNAVAILABLE: dict[str, Callable[[], Optional[str]]] = {
    "triton": _triton_unavailable,
    "cuda": _cuda_library_unavailable,
    "cpp": _cpp_library_unavailable,
}


def unavailable(backend: str) -> Optional[str]:
    """``None`` when ``backend`` can be loaded here, else a sentence saying what is missing."""
    check = _UNAVAILABLE.get(backend)
    return None if check is None else check()


def unsupported(backend: str, device: torch.device, dtype: torch.dtype, forced: bool) -> Optional[str]:
    """``None`` when ``backend`` runs tensors of ``device``/``dtype``, else why not."""
    if backend == "triton":
        return _triton_unsupported(device, dtype, forced)
    if backend == "cuda":
        return _extension.cuda_unsupported(device, dtype, forced)
    if backend == "cpp":
        return _extension.cpu_unsupported(device, dtype, forced)
    return None


# --------------------------------------------------------------------------
# Registry: op -> backend -> implementation
# --------------------------------------------------------------------------

_registry: dict[str, dict[str, Callable]] = {}
_state = threading.local()
_global_default = "auto"
_warned: set[tuple[str, str]] = set()


def register(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` (taking the op's validated arguments) as ``backend``'s implementation of ``op``."""
    if backend not in _AUTO_ORDER:
        raise ValueError(f"backend must be one of {_AUTO_ORDER}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = fn


def define_ops(schemas: dict[str, str]) -> None:
    """Define ``torch.ops.spark_ext.<op>`` for each ``op: schema`` of an op module's ``SCHEMAS``.

    The schemas are written once, in Python, because the Triton ops reuse them
    and must exist without the compiled library; that library only registers
    CPU/CUDA kernels for these names (``TORCH_LIBRARY_IMPL``) when it loads.
    """
    for op, schema in schemas.items():
        torch.library.define(f"spark_ext::{op}", schema)


def register_compiled(op: str, fn: Callable) -> None:
    """Register ``fn`` as ``op``'s ``cpp`` (CPU) and ``cuda`` backends: ops of the compiled library."""
    register(op, "cpp", fn)
    register(op, "cuda", fn)


def set_default_backend(backend: str) -> None:
    """Set the process-wide backend used when an op is called with ``backend=None``."""
    global _global_default
    _global_default = check_choice(backend, "backend", BACKENDS)


def get_default_backend() -> str:
    """The backend used for ``backend=None`` in this thread (see :func:`use_backend`)."""
    return getattr(_state, "override", None) or _global_default


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Context manager: ops called with ``backend=None`` in this thread use ``backend``."""
    check_choice(backend, "backend", BACKENDS)
    previous = getattr(_state, "override", None)
    _state.override = backend
    try:
        yield
    finally:
        _state.override = previous


def registered_backends(op: str) -> list[str]:
    """The backends that implement ``op``, in the order ``auto`` tries them."""
    return [name for name in _AUTO_ORDER if name in _registry.get(op, {})]


def available_backends() -> dict[str, dict[str, Optional[str]]]:
    """Every public op's backends, each mapped to ``None`` (loads here) or why it cannot load.

    Whether a backend also runs a given tensor's device and dtype is
    :func:`backend_for`'s question. Checking may load (and build) the library.
    """
    return {op: {name: unavailable(name) for name in registered_backends(op)} for op in sorted(_registry)}


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
    name = check_choice(get_default_backend() if backend is None else backend, "backend", BACKENDS)
    impls = _registry.get(op, {})
    device, dtype = like.device, like.dtype
    if name != "auto":
        fn = impls.get(name)
        if fn is None:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} is not implemented for this op; available: {registered_backends(op)}"
            )
        reason = unavailable(name) or unsupported(name, device, dtype, True)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run here: {reason}")
        return name, fn
    for candidate in registered_backends(op):
        if unsupported(candidate, device, dtype, False):
            continue
        reason = unavailable(candidate)
        if reason:
            _warn_once(op, candidate, reason)
            continue
        return candidate, impls[candidate]
    raise BackendUnavailableError(f"{op}: no backend supports {device} tensors of dtype {dtype}")


# (op, backend as named, device type, dtype) -> whether the call runs a compiled op. Which backend
# serves a device and dtype does not change once the library has loaded (or failed to), so the
# public ops resolve once per key rather than per call. clear_cache() forgets it (tests that
# patch the availability rules).
_compiled_calls: dict[tuple, bool] = {}


def runs_compiled(op: str, backend: Optional[str], like: object) -> bool:
    """Whether a call of ``op`` on tensors like ``like`` runs the compiled library's op.

    The public ops' fast path: ``True`` lets them call ``torch.ops.spark_ext.<op>``
    directly (whose C++ checks guard it); ``False`` (the reference or Triton
    backends, a bad argument, tracing under ``torch.compile``) sends them through
    their checked path, which raises the documented error for a bad call.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if backend is None:
        backend = getattr(_state, "override", None) or _global_default
    try:
        key = (op, backend, like.device.type, like.dtype)
        return _compiled_calls[key]
    except (AttributeError, KeyError):
        pass
    try:
        compiled = resolve(op, backend, like)[0] in ("cpp", "cuda")
    except (AttributeError, ValueError, BackendUnavailableError):
        return False  # not a tensor, or no such backend: the checked path says so
    _compiled_calls[key] = compiled
    return compiled


def clear_cache() -> None:
    """Forget the cached backend choices of :func:`runs_compiled`."""
    _compiled_calls.clear()


def backend_for(op: str, like: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend a call of public op ``op`` (e.g. ``"lsq_fake_quant"``) on tensors like ``like`` runs.

    ``backend`` as the op takes it (``None``: the default of this thread).
    Raises what the call would raise when no backend can run it; ``auto``
    warns once, as the call would, when it skips a backend that cannot load.
    """
    if op not in _registry:
        raise ValueError(f"op must be one of {sorted(_registry)}, got {op!r}")
    return resolve(op, backend, like)[0]
