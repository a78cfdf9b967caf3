"""spark_ext: fast, drop-in ops for quantization-aware training with spatially
weighted knowledge distillation (SPARK) of image-restoration networks.

Public API (see README.md and docs/spec.md):

* :func:`difficulty_signals`, :func:`fused_weighted_kd` — SPARK's fused signals and KD loss;
* :func:`lsq_fake_quant` — LSQ / LSQ+ fake quantization;
* :func:`fake_quantize_learnable_per_tensor_affine`,
  :func:`fake_quantize_learnable_per_channel_affine` — drop-ins for torch's learnable fake quant;
* backend selection: :func:`set_default_backend`, :func:`use_backend`;
* the CPU kernels' cache of freed huge-page outputs: :func:`empty_huge_page_cache`,
  :func:`set_huge_page_cache_limit` (as ``torch.cuda.empty_cache`` is for the GPU).
"""

__version__ = "0.1.0"

from ._extension import empty_huge_page_cache, set_huge_page_cache_limit  # noqa: E402
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
    "empty_huge_page_cache",
    "fake_quantize_learnable_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fused_weighted_kd",
    "get_default_backend",
    "lsq_fake_quant",
    "registered_backends",
    "set_default_backend",
    "set_huge_page_cache_limit",
    "use_backend",
]
