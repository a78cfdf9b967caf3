"""Decoder-free distillation (DFD, docs/spec.md §6): feature KD at a named bottleneck.

Forward hooks capture the output of the module called ``layer`` in the
student and in every teacher; the DFD loss is ``L1(F_s, sg(F_t))`` (mean
absolute difference, teacher features detached; for an ensemble ``F_t`` is
the teacher features' mean). There is no KD on the network output in DFD.
"FP32 self-distillation" is the case where the teacher is the FP32 model the
quantized student was made from, so the features match in shape by
construction; features of different shapes are an error (no adapter is added).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn

from ...ops import fused_weighted_kd


def find_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """``model``'s submodule called ``name``; a ``DistributedDataParallel`` /
    ``torch.compile`` wrapper's ``module.`` / ``_orig_mod.`` prefix is tried too.
    Raises ValueError naming the missing module and a few that exist."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dfd layer must be a non-empty module name, got {name!r}")
    modules = dict(model.named_modules())
    for candidate in (name, f"module.{name}", f"_orig_mod.{name}", f"module._orig_mod.{name}"):
        if candidate in modules:
            return modules[candidate]
    names = [n for n in modules if n][:12]
    raise ValueError(f"dfd layer {name!r} is not a submodule of the {role} {type(model).__name__}; it has {names}...")


class FeatureTap:
    """Records the latest output of one module (a forward hook). ``close()`` removes the hook."""

    def __init__(self, module: nn.Module):
        self.output: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"dfd layer {type(module).__name__} must output a tensor, got {type(output).__name__}")
        self.output = output

    def take(self) -> torch.Tensor:
        """The recorded output (cleared, so a stale feature is never reused)."""
        out, self.output = self.output, None
        if out is None:
            raise RuntimeError("the DFD layer did not run in the last forward pass")
        return out

    def close(self) -> None:
        self._handle.remove()


class DecoderFreeDistillation:
    """Hooks ``layer`` in the student and the teachers and computes the DFD loss.

    Args:
        student: the (possibly DDP-wrapped) student.
        teachers: one or more frozen teachers with a module of the same name.
        layer: module name, e.g. ``"bottleneck"``.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], layer: str):
        self.layer = layer
        self.student_tap = FeatureTap(find_module(student, layer, "student"))
        self.teacher_taps = [FeatureTap(find_module(t, layer, f"teacher {i}")) for i, t in enumerate(teachers)]

    def teacher_features(self) -> torch.Tensor:
        """Mean of the teachers' captured features, detached."""
        feats = [tap.take() for tap in self.teacher_taps]
        for i, f in enumerate(feats[1:], 1):
            if f.shape != feats[0].shape:
                raise ValueError(
                    f"dfd layer {self.layer!r}: teacher {i} features {tuple(f.shape)} "
                    f"differ from teacher 0's {tuple(feats[0].shape)}"
                )
        mean = feats[0] if len(feats) == 1 else torch.stack(feats).mean(0)
        return mean.detach()

    def loss(
        self, teacher_features: torch.Tensor, weight: Optional[torch.Tensor] = None, backend: Optional[str] = None
    ) -> torch.Tensor:
        """``mean |F_s - sg(F_t)|`` (optionally cell-weighted), 0-D float32, differentiable w.r.t. F_s.

        ``weight``: ``None`` or a ``[B, 1, Gh, Gw]`` grid weight, applied on the
        feature map's own cell grid (docs/spec.md §1 with the feature H', W').
        """
        f_s = self.student_tap.take()
        if f_s.shape != teacher_features.shape:
            raise ValueError(
                f"dfd layer {self.layer!r}: student features {tuple(f_s.shape)} and teacher features "
                f"{tuple(teacher_features.shape)} differ; DFD needs the same architecture at that layer"
            )
        if f_s.dim() != 4:
            raise ValueError(
                f"dfd layer {self.layer!r} must output [B, C, H, W] features, got shape {tuple(f_s.shape)}"
            )
        if weight is not None:
            gh, gw = weight.shape[-2:]
            fh, fw = f_s.shape[-2:]
            if gh > fh or gw > fw:
                raise ValueError(
                    f"dfd layer {self.layer!r}: the SPARK grid {(gh, gw)} is larger than the layer's feature map "
                    f"{(fh, fw)}; use a grid of at most {(fh, fw)} cells (DistillConfig.grid) or a larger layer"
                )
        t = teacher_features.to(f_s.dtype)
        return fused_weighted_kd(f_s, t, weight, kd_loss="l1", reduction="mean", backend=backend)

    def discard(self) -> None:
        """Forget captured features (e.g. after a no-grad forward that is not distilled)."""
        self.student_tap.output = None
        for tap in self.teacher_taps:
            tap.output = None

    def close(self) -> None:
        self.student_tap.close()
        for tap in self.teacher_taps:
            tap.close()
