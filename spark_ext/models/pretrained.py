"""FP32 teachers shipped with the package, so every user and every seed starts from the same teacher.

One teacher per demo task, the demo's ``default`` network (width 16, depth 2):
denoising 16000 steps (converged: 32000 steps scored lower on the held-out photos), x2 SR 16000 steps
(converged: 40000 steps gained nothing), trained by ``tools/train_teachers.py`` (the demo's teacher
training, seed 0, one CPU thread). The weights are fp32 ``state_dict`` files in
``spark_ext/models/weights/``; each file's sha256 is checked before loading.
How they were trained and how well they do: ``docs/teachers.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .._validation import check_choice
from .restoration import build_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclasses.dataclass(frozen=True)
class PretrainedTeacher:
    """What a shipped teacher is: network, degradation it was trained for, training budget, file and hash.

    ``psnr`` / ``ssim``: held-out scores (chelsea, coffee, camera; whole photos;
    :func:`spark_ext.metrics.restoration_metrics`), measured when it was trained.
    """

    task: str
    width: int
    depth: int
    scale: int
    sigma: float
    steps: int
    filename: str
    sha256: str
    psnr: float
    ssim: float


PRETRAINED_TEACHERS: dict[str, PretrainedTeacher] = {
    "denoise": PretrainedTeacher(
        task="denoise",
        width=16,
        depth=2,
        scale=2,
        sigma=25.0 / 255.0,
        steps=16000,
        filename="teacher_denoise.pt",
        sha256="0ea4510f0208bbfedef32964d88f24d9e87f246aec856ed72e5867217d7ac7b0",
        psnr=30.8450,
        ssim=0.83640,
    ),
    "sr": PretrainedTeacher(
        task="sr",
        width=16,
        depth=2,
        scale=2,
        sigma=25.0 / 255.0,
        steps=16000,
        filename="teacher_sr.pt",
        sha256="e4e94d3dacc50a7a7948a8cab93e8c1e8c8e3a5e4a973c2397b5379753ff8887",
        psnr=33.8027,
        ssim=0.92059,
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_pretrained_teacher(task: str, *, path: Optional[Union[str, Path]] = None) -> Path:
    """The shipped teacher's weights file for ``task`` (or ``path``), checked against its recorded sha256.

    The commands call it while checking their arguments, so a broken install is reported before any work.

    Raises:
        FileNotFoundError: the weights file is missing (a broken install).
        RuntimeError: the file's sha256 differs from the recorded one.
    """
    check_choice(task, "task", tuple(PRETRAINED_TEACHERS))
    spec = PRETRAINED_TEACHERS[task]
    file = Path(path) if path is not None else WEIGHTS_DIR / spec.filename
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained {task} teacher not found at {file}; reinstall spark_ext (the weights ship as package data) "
            f"or retrain it (spark-ext demo --retrain-teacher, or tools/train_teachers.py)"
        )
    actual = _sha256(file)
    if actual != spec.sha256:
        raise RuntimeError(
            f"pretrained {task} teacher {file} has sha256 {actual}, expected {spec.sha256}: the file is corrupt "
            f"or not the shipped one; reinstall spark_ext or retrain (spark-ext demo --retrain-teacher)"
        )
    return file


def load_pretrained_teacher(
    task: str, device: Union[str, torch.device] = "cpu", *, path: Optional[Union[str, Path]] = None
) -> nn.Module:
    """The shipped FP32 teacher for ``task`` (``"denoise"``: AWGN sigma 25/255; ``"sr"``: MATLAB-bicubic x2).

    Args:
        task: ``"denoise"`` or ``"sr"``.
        device: where to put the model.
        path: load this file instead of the shipped one (it must still have the
            recorded sha256: the check is the point).

    Returns:
        the network (:func:`~spark_ext.models.build_model`) in eval mode, float32,
        with ``requires_grad`` off on every parameter (a teacher is frozen).

    Raises:
        FileNotFoundError: the weights file is missing (a broken install).
        RuntimeError: the file's sha256 differs from the recorded one.
    """
    file = verify_pretrained_teacher(task, path=path)
    spec = PRETRAINED_TEACHERS[task]
    model = build_model(task, spec.width, depth=spec.depth, scale=spec.scale)
    model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    model.requires_grad_(False)
    return model.to(device).eval()
