"""Public ops: one module per op family (validation, torch.library registration, dispatch)."""

from ._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_for,
    get_default_backend,
    registered_backends,
    set_default_backend,
    use_backend,
)
from .difficulty import difficulty_signals
from .fake_quant import fake_quantize_learnable_per_channel_affine, fake_quantize_learnable_per_tensor_affine
from .lsq import lsq_fake_quant
from .weighted_kd import fused_weighted_kd

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_for",
    "difficulty_signals",
    "fake_quantize_learnable_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fused_weighted_kd",
    "get_default_backend",
    "lsq_fake_quant",
    "registered_backends",
    "set_default_backend",
    "use_backend",
]
