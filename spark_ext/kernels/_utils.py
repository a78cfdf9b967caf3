"""Helpers shared by the Triton kernels of ``spark_ext.kernels``.

Host side: launch-shape arithmetic (powers of two, how many programs keep a
GPU busy), whether kernels run under Triton's CPU interpreter, and the
mapping of torch dtypes to the small integer codes the kernels take.

Device side (``@triton.jit``): the KD loss kinds of docs/spec.md §2 and their
derivatives, and a float32 -> output-dtype cast that rounds bfloat16 to
nearest-even by hand. The hand rounding exists because Triton's interpreter
(3.x) converts float32 to bfloat16 by *truncating* the mantissa (its
``_convert_float`` only rounds when given an explicit rounding mode), while
GPUs round to nearest-even; doing the rounding with integer operations gives
the same bits on both, so the interpreter tests check the code the GPU runs.
It costs a handful of integer instructions per stored element, invisible in
these memory-bound kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then
# produced interpreted functions, which run on CPU tensors only.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

KD_KINDS = {"l1": 0, "l2": 1, "charbonnier": 2}

# docs/spec.md §2 charbonnier eps; eps**2 is formed in Python (float64) and rounded
# once to float32 inside the kernel, as the reference's `diff*diff + eps**2` does.
CHARBONNIER_EPS = tl.constexpr(1e-3)
CHARBONNIER_EPS2 = tl.constexpr(1e-3 * 1e-3)

# Output dtype codes for `store_cast`.
OUT_F32, OUT_F16, OUT_BF16, OUT_F64 = 0, 1, 2, 3
_OUT_CODES = {torch.float32: OUT_F32, torch.float16: OUT_F16, torch.bfloat16: OUT_BF16, torch.float64: OUT_F64}


def out_code(dtype: torch.dtype) -> int:
    """Kernel code for an output dtype (see :func:`cast_out`)."""
    return _OUT_CODES[dtype]


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device.

    On a GPU: four per streaming multiprocessor (enough resident warps to hide
    memory latency in these bandwidth-bound kernels). Under the interpreter
    programs run one after another in Python, so fewer, larger programs are
    faster: 1.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def tile_pixels(device: torch.device, gpu: int = 1024) -> int:
    """Pixels per program tile: ``gpu`` on a GPU; 4096 in the interpreter (fewer, larger programs)."""
    return gpu if device.type == "cuda" else 4096


def on_input_device(launcher):
    """Run ``launcher`` with its first tensor argument's CUDA device current.

    Triton launches on the current device; without this a tensor on
    ``cuda:1`` while ``cuda:0`` is current would be addressed on the wrong GPU.
    """

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.device.type == "cuda":
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return wrapper


# Launch options for every kernel. fp fusion off: each multiply and add is
# rounded as written, as numpy does in the interpreter and as torch's eager
# reference does, so interpreter tests check the GPU's arithmetic; these
# kernels are memory-bound, so the lost FMAs cost nothing measurable.
# (Triton 3.9 warns when this is left unset; 3.10 changes the default.)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


# Arguments: d: float32 values S - T (any shape); KIND: constexpr loss kind, 0 l1, 1 l2, 2 charbonnier (KD_KINDS).
@triton.jit
def kd_elem(d, KIND: tl.constexpr):
    """``ell(d)`` of docs/spec.md §2: 0 = l1 ``|d|``, 1 = l2 ``d^2``, 2 = charbonnier."""
    if KIND == 0:
        r = tl.abs(d)
    elif KIND == 1:
        r = d * d
    else:
        # sqrt_rn: IEEE-rounded square root (tl.sqrt may be the approximate one).
        r = tl.sqrt_rn(d * d + CHARBONNIER_EPS2) - CHARBONNIER_EPS
    return r


# Arguments: d: float32 values S - T; KIND: constexpr loss kind as for kd_elem.
@triton.jit
def kd_grad(d, KIND: tl.constexpr):
    """``ell'(d)``: sign(d) (0 at 0 and at NaN), ``2d``, or ``d / sqrt(d^2 + eps^2)``."""
    if KIND == 0:
        # torch's sign (hence autograd's abs backward, the reference) and the C++
        # kernels give 0 for NaN as well as for 0.
        r = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif KIND == 1:
        r = 2.0 * d
    else:
        r = tl.div_rn(d, tl.sqrt_rn(d * d + CHARBONNIER_EPS2))
    return r


# Arguments: x: float32 values to store; OUT: constexpr output dtype code, OUT_F32 (0), OUT_F16 (1),
# OUT_BF16 (2) or OUT_F64 (3) (see out_code).
@triton.jit
def cast_out(x, OUT: tl.constexpr):
    """Cast float32 ``x`` to the output dtype code ``OUT``, rounding to nearest-even."""
    if OUT == 0:
        r = x
    elif OUT == 1:
        r = x.to(tl.float16)
    elif OUT == 2:
        # Round-to-nearest-even on the bit pattern: add 0x7FFF plus the lowest
        # kept bit, then drop the low 16 bits. NaNs are kept NaN explicitly
        # (a NaN whose payload sits in the low bits would otherwise round to inf).
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        bits = tl.where(x != x, 0x7FC00000, bits)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(tl.float64)
    return r
