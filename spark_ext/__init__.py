"""spark_ext: fast, drop-in ops for quantization-aware training with spatially
weighted knowledge distillation (SPARK) of image-restoration networks.

Public API (see README.md and docs/spec.md):

* :func:`difficulty_signals`, :func:`fused_weighted_kd` — SPARK's fused signals and KD loss;
* :func:`lsq_fake_quant` — LSQ / LSQ+ fake quantization;
* :func:`fake_quantize_learnable_per_tensor_affine`,
  :func:`fake_quantize_learnable_per_channel_affine` — drop-ins for torch's learnable fake quant;
* backend selection: :func:`set_default_backend`, :func:`use_backend`.
"""

__version__ = "0.1.0"

from .ops import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_for,
    difficulty_signals,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
    fused_weighted_kd,
    get_default_backend,
    lsq_fake_quant,
    registered_backends,
    set_default_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
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
