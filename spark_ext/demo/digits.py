"""Training the digit classifiers that ``spark-ext classify`` and ``spark-ext daqakd`` compare.

FP32 :class:`~spark_ext.models.DigitsCNN` teachers and W4A4 students distilled by logits
(:class:`~spark_ext.distill.LogitDistiller`), on scikit-learn's digits (:mod:`spark_ext.data.digits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn

from spark_ext.distill import LogitDistiller, accuracy, get_augmentation
from spark_ext.models import DigitsCNN
from spark_ext.progress import progress


def batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` index batches drawn by epochs of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def train_teacher(
    x: torch.Tensor, y: torch.Tensor, *, width: int, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 64
) -> nn.Module:
    """An FP32 :class:`DigitsCNN` trained with cross-entropy (Adam) from ``seed``."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for idx in progress(batches(len(y), batch_size, steps, seed), f"teacher seed {seed}", total=steps):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_student(
    teachers: Sequence[nn.Module],
    data: tuple,
    *,
    seed: int,
    steps: int,
    width: int,
    bits: Optional[int],
    mode: str = "kd",
    balancer: str = "none",
    temperature: float = 4.0,
    augmentation: str = "none",
    lr: float = 3e-3,
    batch_size: int = 64,
    desc: str = "student",
) -> float:
    """Train a (W``bits``A``bits``, first/last layer 8-bit) :class:`DigitsCNN` student; return its test accuracy.

    ``augmentation`` (a name in :data:`~spark_ext.distill.AUGMENTATIONS`) is applied to each training
    batch; teacher and student see the same augmented batch."""
    from spark_ext.quant import quantize_model

    x_tr, y_tr, x_te, y_te = data
    aug = get_augmentation(augmentation)
    torch.manual_seed(seed)
    student = DigitsCNN(width)
    if bits is not None:
        quantize_model(student, w_bits=bits, a_bits=bits)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    distiller = LogitDistiller(
        student, list(teachers) if mode == "kd" else None, opt, mode=mode, balancer=balancer, temperature=temperature
    )
    g_aug = torch.Generator().manual_seed(seed + 10_000)
    for idx in progress(batches(len(y_tr), batch_size, steps, seed), desc, total=steps):
        distiller.step(aug(x_tr[idx], g_aug), y_tr[idx])
    return accuracy(student, x_te, y_te)
