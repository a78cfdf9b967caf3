"""Argument checks shared by every backend of every op.

All raise ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value or shape) with a message naming the argument, what it got and
what was expected. None of them synchronises with the device: they look at
metadata only (shapes, dtypes, devices), except the value checks
(:func:`check_positive_step`, :func:`check_positive_scale`, :func:`check_not_nan`,
:func:`check_finite_values`), which read values on CPU and use a device-side assert on CUDA;
the public ops run them only on the reference backend (the compiled kernels check the values
they read).
:func:`writable_dir_problem` serves the command lines' ``--out``-style checks.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the reference backend so gradcheck can run on it.
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)
KD_LOSSES = ("l1", "l2", "charbonnier")
REDUCTIONS = ("mean", "sum")


def check_tensor(t: object, name: str, *, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16, or float64 for the "
            f"reference backend), got {t.dtype}"
        )


def check_images(student: object, teacher: object, target: Optional[object] = None) -> None:
    """S, T (and Y): 4-D [B, C, H, W], same shape, dtype and device, floating."""
    names = ["student", "teacher"] + (["target"] if target is not None else [])
    tensors = [student, teacher] + ([target] if target is not None else [])
    for t, n in zip(tensors, names):
        check_tensor(t, n, ndim=4)
        check_float_dtype(t, n)
    ref = tensors[0]
    for t, n in zip(tensors[1:], names[1:]):
        if t.shape != ref.shape:
            raise ValueError(f"{n} must have the student's shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{n} must have the student's dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{n} must be on the student's device {ref.device}, got {t.device}")


def check_grid(grid: object, height: int, width: int) -> tuple[int, int]:
    """docs/spec.md §1: (Gh, Gw) with 1 <= Gh <= H and 1 <= Gw <= W."""
    if isinstance(grid, (int, bool)) or not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"grid must be a pair of ints (Gh, Gw), got {grid!r}")
    gh, gw = grid
    for g, axis in ((gh, "Gh"), (gw, "Gw")):
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"grid {axis} must be an int, got {g!r}")
    if not 1 <= gh <= height:
        raise ValueError(f"grid Gh must satisfy 1 <= Gh <= H={height}, got {gh}")
    if not 1 <= gw <= width:
        raise ValueError(f"grid Gw must satisfy 1 <= Gw <= W={width}, got {gw}")
    return int(gh), int(gw)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_real(value: object, name: str, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


MIN_BITS, MAX_BITS = 2, 16  # the bit widths lsq_fake_quant takes (docs/spec.md §5b)


def check_bits(bits: object, name: str = "bits", *, allow_none: bool = False) -> Optional[int]:
    """An int bit width in ``[MIN_BITS, MAX_BITS]`` (or ``None`` when ``allow_none``)."""
    if bits is None and allow_none:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expected}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}] (unsupported bit width), got {bits}")
    return int(bits)


def check_grad_scale(grad_scale: object) -> Union[str, float, None]:
    """LSQ's gradient scale: ``"lsq"``, ``None`` or a finite number > 0 (returned as a float).

    TypeError for a value of the wrong type, ValueError for a wrong value.
    """
    if grad_scale is None or (isinstance(grad_scale, str) and grad_scale == "lsq"):
        return grad_scale
    if isinstance(grad_scale, str):
        raise ValueError(f"grad_scale must be 'lsq', a positive float or None, got {grad_scale!r}")
    value = check_real(grad_scale, "grad_scale", finite=False)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale}")
    return value


def check_axis(axis: object, ndim: int, name: str = "axis") -> int:
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for a {ndim}-D input, got {axis}")
    return axis % ndim


def check_same_device(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} must be on the input's device {like.device}, got {t.device}")


INT_ZERO_POINT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_qparam(t: object, name: str, x: torch.Tensor, numel: int, shape_rule: str, *, int_ok: bool = False) -> None:
    """A quantization parameter of ``x`` (scale, zero point, step, offset): a tensor on x's device, floating
    (or, with ``int_ok``, one of :data:`INT_ZERO_POINT_DTYPES`), with ``numel`` elements in at most one dimension.

    ``shape_rule`` completes the shape error ``"<name> must <shape_rule>, got shape ..."``.
    """
    check_tensor(t, name)
    check_same_device(t, name, x)
    if not t.is_floating_point() and not (int_ok and t.dtype in INT_ZERO_POINT_DTYPES):
        kinds = "a floating dtype" + (" or an integer dtype" if int_ok else "")
        raise TypeError(f"{name} must have {kinds}, got {t.dtype}")
    if t.numel() != numel or t.dim() > 1:
        raise ValueError(f"{name} must {shape_rule}, got shape {tuple(t.shape)}")


def _check_values(t: torch.Tensor, ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (a bool tensor) holds everywhere, without a host sync.

    On CPU the values are read directly (no device to sync with). On other
    devices a device-side assert (``torch._assert_async``) fires when the
    kernel queue reaches it. Under ``torch.compile`` the device-side form is
    used on every device so the check stays in the graph.
    """
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(f"{message}, got {t.detach().flatten()[:8].tolist()}")
    else:
        torch._assert_async(ok.all(), f"spark_ext: {message}")


def check_positive_step(step: torch.Tensor, name: str = "step") -> None:
    """Every step must be finite and > 0 (docs/spec.md §5b), checked without a host sync (see :func:`_check_values`).

    One elementwise test: clamping to [smallest positive subnormal, largest
    finite] leaves exactly the finite positive values unchanged (NaN
    propagates and compares unequal), so a call costs a clamp, a compare and
    the reduction instead of isfinite's, > and &'s kernels each. ``step`` is
    floating (the callers check the dtype first).
    """
    info = torch.finfo(step.dtype)
    ok = step.clamp(info.smallest_normal * info.eps, info.max) == step
    _check_values(step, ok, f"{name} must be finite and > 0 everywhere")


def check_positive_scale(scale: torch.Tensor, name: str = "scale") -> None:
    """Every scale must be finite and > 0 with a finite float32 reciprocal (>= 2.9e-39; docs/spec.md §5a).

    The fake-quant kernels multiply by ``1 / scale`` in float32, as ATen does;
    for a subnormal scale below 1/FLT_MAX that is inf. Checked without a host
    sync (see :func:`_check_values`).
    """
    s = scale.to(torch.float32)
    ok = (s > 0) & torch.isfinite(s) & torch.isfinite(1.0 / s)
    _check_values(scale, ok, f"{name} must be finite and > 0 everywhere, with a finite reciprocal (>= 2.9e-39)")


def check_not_nan(t: torch.Tensor, name: str) -> None:
    """No element of ``t`` may be NaN (inf is allowed), checked without a host sync."""
    if t.is_floating_point():
        _check_values(t, ~torch.isnan(t), f"{name} must not be NaN")


def check_finite_values(t: torch.Tensor, name: str) -> None:
    """Every element of ``t`` must be finite, checked without a host sync."""
    if t.is_floating_point():
        _check_values(t, torch.isfinite(t), f"{name} must be finite everywhere")


def _probe_folder(folder: Path) -> Optional[str]:
    """None if a file can be created in the existing folder ``folder`` (the probe is removed), else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def writable_dir_problem(path: Path, files: Sequence[str] = ()) -> Optional[str]:
    """For command-line checks: None if ``path`` is a writable folder or can be created as one, and none of
    the names in ``files`` (the files the command writes there) is a folder in it; else why not.

    Creates nothing: the nearest existing folder on the way to ``path`` is probed with a temporary file
    (removed), so a command that stops on another bad argument leaves no empty folder behind.
    """
    path = Path(path)
    folders = [name for name in files if (path / name).is_dir()]
    if folders:
        return f"{path / folders[0]} is a folder, but the command writes a file there"
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        blocker = "it is a file" if existing == path else f"{existing} is a file"
        return f"{path} is not a writable folder ({blocker})"
    why = _probe_folder(existing)
    return None if why is None else f"{path} is not a writable folder ({existing}: {why})"


def writable_file_problem(path: Path) -> Optional[str]:
    """For command-line checks: None if the file ``path`` can be written (its folder exists and is writable,
    and ``path`` is not a folder), else why not. Creates nothing (see :func:`writable_dir_problem`)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; name a file (e.g. {path / 'results.json'})"
    if path.parent.exists() and not path.parent.is_dir():
        return f"{path} cannot be written: {path.parent} is a file, not a folder"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    why = _probe_folder(path.parent)
    return None if why is None else f"{path} cannot be written ({path.parent}: {why})"


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one short line for a command's error message: its type and the first line of its text."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
