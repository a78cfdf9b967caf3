"""DA-QAKD augmentation ranking (after Kur & Zhao, arXiv 2509.03850; our reading, see docs/daqakd.md).

The paper scores a data augmentation (DA) for quantization-aware KD by how much
*contextual* information (information in the prediction not explained by the
label) it lets through, while the predictions for each class stay close to
that class's label on average; lower scores are better. We only had the
abstract, so the formula is our reading, with the open choices as parameters:

For a model ``f`` and augmented samples ``x_i`` with labels ``y_i``, let
``p_i = softmax(f(aug(x_i)) / T)`` and the class centroid
``Q_c = mean_{i: y_i = c} p_i``. Then

* ``cmi = mean_i KL(p_i || Q_{y_i})`` — the empirical conditional mutual
  information ``I(X; Yhat | Y)``: how much the prediction varies with the image
  beyond its class;
* ``fit = mean_i -log Q_{y_i}[y_i]`` — the cross-entropy of each class's mean
  prediction with its label;
* ``score = fit - beta * cmi`` (lower is better).

With several models (teacher and student), the score is their mean. The
augmentation draws use a private seeded generator, so a ranking is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._validation import check_int, check_real, check_tensor

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ---------------------------------------------------------------- augmentations (images [B, C, H, W] in [0, 1])


def _identity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each image by -1, 0 or +1 pixel in each direction (zero fill)."""
    b = x.shape[0]
    d = torch.randint(-1, 2, (b, 2), generator=g)
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, 1 + d[i, 0] : 1 + d[i, 0] + h, 1 + d[i, 1] : 1 + d[i, 1] + w] for i in range(b)])


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _cutout(x: torch.Tensor, g: torch.Generator, size: int = 3) -> torch.Tensor:
    b, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (b,), generator=g)
    left = torch.randint(0, w - size + 1, (b,), generator=g)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    hole = (
        (rows >= top[:, None, None])
        & (rows < top[:, None, None] + size)
        & (cols >= left[:, None, None])
        & (cols < left[:, None, None] + size)
    )
    return x * (~hole)[:, None].to(x.dtype)


def _rotate(x: torch.Tensor, g: torch.Generator, degrees: float = 15.0) -> torch.Tensor:
    angle = (torch.rand(x.shape[0], generator=g) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.flip(-1)


def _invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - x


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": _identity,
    "shift": _shift,
    "noise": _noise,
    "cutout": _cutout,
    "rotate": _rotate,
    "hflip": _hflip,
    "invert": _invert,
}


def get_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENTATIONS)}, got {name!r}")
    return AUGMENTATIONS[name]


# ---------------------------------------------------------------- the metric


@dataclasses.dataclass(frozen=True)
class AugmentationScore:
    """One candidate's metric: ``score = fit - beta * cmi`` (lower is better), averaged over the models."""

    name: str
    score: float
    cmi: float
    fit: float


def cmi_and_fit(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cmi, fit)`` of predictions ``probs [N, K]`` (rows sum to 1) with labels ``[N]``: 0-D float64 each.

    See the module docstring for the definitions.

    Classes with no sample are skipped."""
    p = probs.double().clamp_min(1e-12)
    onehot = F.one_hot(labels, num_classes).double()
    counts = onehot.sum(0)
    centroids = (onehot.T @ p) / counts.clamp_min(1)[:, None]  # [K, K]: row c = Q_c
    q = centroids[labels]  # [N, K]
    cmi = (p * (p.log() - q.log())).sum(1).mean()
    fit = -q.gather(1, labels[:, None]).log().mean()
    return cmi, fit


@torch.no_grad()
def score_augmentations(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    augmentations: Mapping[str, Augmentation] | Sequence[str],
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    repeats: int = 1,
    seed: int = 0,
    batch_size: int = 512,
) -> list[AugmentationScore]:
    """Score and rank candidate augmentations for the given models (teacher, and optionally student).

    Args:
        models: one or more classifiers ``[B, ...] -> [B, K]`` (run in eval mode; modes restored).
        inputs, labels: a labelled sample (e.g. the training set) ``[N, ...]``, ``[N]`` int64.
        augmentations: names from :data:`AUGMENTATIONS` or a ``{name: fn(x, generator) -> x}`` mapping.
        beta: weight of the contextual mutual information (the paper's trade-off; our default 1).
        temperature: softmax temperature of the predictions (our default 1).
        repeats: augmented draws per sample (more: a less noisy estimate).
        seed: seeds the augmentation draws (each candidate gets the same seed).

    Returns:
        :class:`AugmentationScore` per candidate, best (lowest score) first.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be one nn.Module or a non-empty sequence of them")
    check_tensor(inputs, "inputs")
    check_tensor(labels, "labels", ndim=1)
    if labels.dtype != torch.int64 or labels.shape[0] != inputs.shape[0] or labels.numel() == 0:
        raise ValueError(f"labels must be int64 [N] matching inputs' N >= 1, got {labels.dtype} {tuple(labels.shape)}")
    check_real(beta, "beta")
    if check_real(temperature, "temperature") <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if check_int(repeats, "repeats") < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(augmentations, Mapping):
        augmentations = {name: get_augmentation(name) for name in augmentations}
    if not augmentations:
        raise ValueError("augmentations is empty")
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    results = []
    try:
        for name, aug in augmentations.items():
            g = torch.Generator().manual_seed(check_int(seed, "seed"))
            xs = torch.cat([aug(inputs, g) for _ in range(repeats)])
            ys = labels.repeat(repeats)
            cmis, fits = [], []
            for m in models:
                logits = torch.cat([m(xs[i : i + batch_size]) for i in range(0, len(ys), batch_size)])
                cmi, fit = cmi_and_fit(torch.softmax(logits.double() / temperature, 1), ys, logits.shape[1])
                cmis.append(cmi)
                fits.append(fit)
            cmi, fit = float(torch.stack(cmis).mean()), float(torch.stack(fits).mean())
            results.append(AugmentationScore(name, fit - beta * cmi, cmi, fit))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return sorted(results, key=lambda r: r.score)
