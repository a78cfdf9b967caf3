"""Small image-restoration networks for the demo and the tests.

* :class:`EncoderDecoderNet` — an encoder / bottleneck / decoder denoiser
  (its ``bottleneck`` submodule is the DFD hook point);
* :class:`ResidualSRNet` — a residual x2/x3/x4 super-resolution network
  (its ``body`` submodule is the DFD hook point);
* :func:`build_model` — the network for a demo task at a given width;
* :func:`load_pretrained_teacher` — the shipped, hash-checked FP32 teacher of a demo task.

Every network maps float32 ``[B, 3, h, w]`` to ``[B, 3, H, W]`` and is built
only from ``nn.Conv2d``, ``nn.ReLU`` and ``nn.PixelShuffle`` so that
``spark_ext.quant.quantize_model`` can quantize every layer.
"""

from .classify import DigitsCNN
from .pretrained import PRETRAINED_TEACHERS, PretrainedTeacher, load_pretrained_teacher
from .restoration import EncoderDecoderNet, ResidualSRNet, build_model, feature_layer

__all__ = [
    "DigitsCNN",
    "EncoderDecoderNet",
    "PRETRAINED_TEACHERS",
    "PretrainedTeacher",
    "ResidualSRNet",
    "build_model",
    "feature_layer",
    "load_pretrained_teacher",
]
