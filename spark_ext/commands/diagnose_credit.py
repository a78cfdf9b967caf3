"""``spark-ext diagnose-credit``: does a policy's training signal predict what a cell's KD weight does?

From one training state (student, its optimiser state, a training batch, a
held-out batch), :func:`credit_correlation` measures the effect of the cells'
weights directly and correlates it with a signal map ``s [B, 1, Gh, Gw]``:

* ``draws`` random perturbations ``w_k = 1 + delta * eps_k`` (``eps_k`` a
  Rademacher map over all cells of the batch); for each, the state is restored,
  the real optimiser step is taken with ``L = L_rec + lambda * sum(w_k * cell_kd) / N``
  and the held-out loss ``L_k`` is measured (the forward that matters: the
  fake-quantized student, rounding included).
* The effect of draw ``k`` is ``e_k = -(L_k - mean_k L_k)``; a signal that is
  proportional to ``-dL/dw_c`` predicts it as ``p_k = sum_c s_c eps_k,c``.
* Result: Pearson ``r = corr_k(p_k, e_k)`` with standard error
  ``sqrt((1 - r^2) / (draws - 2))``. ``r`` near 0: the signal carries no
  information about the cells' effect on held-out loss.

Signals (:func:`signal_map`): ``credit`` (SPARK's default, :func:`cell_credit`);
``reinforce`` (one REINFORCE draw with per-cell rewards: ``A_c * eps'_c``, ``A_c``
the cell's one-step error decrease on the training batch minus the uniform-weight
one, i.e. an ideal baseline); ``paper`` (the same with one reward per image, docs/spec.md §4).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from spark_ext.commands._args import CommandParser, parse_names, positive_int, seed_int
from spark_ext.distill.credit import cell_credit
from spark_ext.distill.losses import per_image_loss
from spark_ext.ops import difficulty_signals
from spark_ext.reference import cell_sum, kd_elementwise

SIGNALS = ("credit", "reinforce", "paper")


class _State:
    """Saves and restores a student and its optimiser bit-exactly."""

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer):
        self.student, self.optimizer = student, optimizer
        self.params = copy.deepcopy(student.state_dict())
        self.opt = copy.deepcopy(optimizer.state_dict())

    def restore(self) -> None:
        self.student.load_state_dict(self.params)
        self.optimizer.load_state_dict(copy.deepcopy(self.opt))


def _step_with(student, optimizer, teacher_out, x, y, weight, lambda_kd, grid, kd_loss, rec_loss):
    """One real training step with cell weights ``weight``; returns the student output before it."""
    s = student(x)
    _, cell_kd = difficulty_signals(s, teacher_out, y, grid, kd_loss)
    loss = per_image_loss(s, y, rec_loss).mean() + lambda_kd * (weight * cell_kd).sum() / s.numel()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return s.detach()


def _cell_error(out, y, grid, rec_loss):
    return cell_sum(kd_elementwise(out.float() - y.float(), rec_loss).sum(1), grid)[:, None]


def signal_map(
    signal: str,
    student,
    teacher,
    optimizer,
    batch,
    held,
    grid,
    *,
    lambda_kd=1.0,
    delta=0.5,
    kd_loss="l1",
    rec_loss="l1",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The per-cell training signal ``[B, 1, Gh, Gw]`` of ``signal`` at the current state (restored after)."""
    x, y = batch
    with torch.no_grad():
        t = teacher(x)
    if signal == "credit":
        s = student(x)
        out = cell_credit(student, optimizer, x, s, t, held[0], held[1], grid, kd_loss=kd_loss, rec_loss=rec_loss)
        return out
    if signal not in ("reinforce", "paper"):
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    state = _State(student, optimizer)
    rewards = []
    eps = None
    for weighted in (False, True):
        state.restore()
        ones = torch.ones(x.shape[0], 1, *grid)
        if weighted:
            eps = torch.randint(0, 2, ones.shape, generator=generator).float() * 2 - 1
            w = ones + delta * eps
        else:
            w = ones
        before = _step_with(student, optimizer, t, x, y, w, lambda_kd, grid, kd_loss, rec_loss)
        with torch.no_grad():
            after = student(x)
        if signal == "reinforce":
            rewards.append(_cell_error(before, y, grid, rec_loss) - _cell_error(after, y, grid, rec_loss))
        else:
            r = per_image_loss(before, y, rec_loss) - per_image_loss(after, y, rec_loss)
            rewards.append(r.view(-1, 1, 1, 1).expand_as(ones))
    state.restore()
    return (rewards[1] - rewards[0]) * eps


def credit_correlation(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    grid: tuple[int, int],
    *,
    signal: str = "credit",
    draws: int = 48,
    delta: float = 0.5,
    lambda_kd: float = 1.0,
    kd_loss: str = "l1",
    rec_loss: str = "l1",
    seed: int = 0,
) -> dict[str, float]:
    """Correlation of ``signal``'s per-cell map with the measured held-out effect (module docstring).

    Returns ``{"r", "se", "z" (= r / se), "draws"}``. The student and optimiser are
    left as they were. CPU/GPU; float32 students.
    """
    if draws < 4:
        raise ValueError(f"draws must be >= 4, got {draws}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (weights stay positive), got {delta}")
    gen = torch.Generator().manual_seed(seed)
    state = _State(student, optimizer)
    s_map = signal_map(
        signal,
        student,
        teacher,
        optimizer,
        batch,
        held,
        grid,
        lambda_kd=lambda_kd,
        delta=delta,
        kd_loss=kd_loss,
        rec_loss=rec_loss,
        generator=gen,
    ).float()
    state.restore()
    x, y = batch
    with torch.no_grad():
        t = teacher(x)
    preds, losses = [], []
    for _ in range(draws):
        state.restore()
        eps = torch.randint(0, 2, s_map.shape, generator=gen).float() * 2 - 1
        _step_with(student, optimizer, t, x, y, (1 + delta * eps).to(x.device), lambda_kd, grid, kd_loss, rec_loss)
        with torch.no_grad():
            losses.append(float(per_image_loss(student(held[0]), held[1], rec_loss).mean()))
        preds.append(float((s_map.cpu() * eps).sum()))
    state.restore()
    p = torch.tensor(preds, dtype=torch.float64)
    e = -torch.tensor(losses, dtype=torch.float64)
    p, e = p - p.mean(), e - e.mean()
    denom = math.sqrt(float((p * p).sum() * (e * e).sum()))
    r = float((p * e).sum()) / denom if denom > 0 else 0.0
    se = math.sqrt(max(1.0 - r * r, 0.0) / (draws - 2))
    return {"r": r, "se": se, "z": r / se if se > 0 else float("inf"), "draws": draws}


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.teacher import get_teacher, teacher_problem
    from spark_ext.demo.training import make_ptq, student_optimizer

    p = CommandParser(
        prog="spark-ext diagnose-credit",
        description="From a training state of the demo's W4A4 student (after --warm uniform-KD steps), correlate each "
        "policy training signal with the measured effect of the cells' KD weights on a held-out loss.",
    )
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise")
    p.add_argument(
        "--preset", choices=tuple(PRESETS), default="default", help="network/data budget (default: %(default)s)"
    )
    p.add_argument("--teacher-steps", type=positive_int, default=None, help="teacher steps (default: the preset's)")
    p.add_argument("--warm", type=positive_int, default=100, help="uniform-KD steps before the state is taken")
    p.add_argument("--draws", type=positive_int, default=48, help="weight perturbations measured (>= 4)")
    p.add_argument("--signals", default=",".join(SIGNALS), help=f"comma-separated from {','.join(SIGNALS)}")
    p.add_argument("--seed", type=seed_int, default=0, help="the student's and the batches' seed")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spark_ext" / "teachers"
    p.add_argument("--cache-dir", type=Path, default=default_cache, help="teacher cache (default %(default)s)")
    args = p.parse_args(argv)
    try:
        signals = parse_names(args.signals, "--signals", SIGNALS)
    except ValueError as exc:
        p.error(str(exc))
    if args.draws < 4:
        p.error(f"--draws must be >= 4, got {args.draws}")
    import dataclasses

    from spark_ext.data import RandomCropBatches, RestorationTask

    preset = PRESETS[args.preset]
    if args.teacher_steps:
        preset = dataclasses.replace(preset, teacher_steps=args.teacher_steps)
    task = RestorationTask(args.task)
    why = teacher_problem(task, preset, args.cache_dir)
    if why:
        p.error(why)
    torch.set_num_threads(1)
    teacher, _ = get_teacher(task, preset, torch.device("cpu"), args.cache_dir, True)
    teacher.requires_grad_(False)
    student = make_ptq(teacher, task, preset, args.seed, torch.device("cpu")).train()
    opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=30_000 + args.seed)
    held_data = RandomCropBatches(task, preset.crop, preset.batch, seed=40_000 + args.seed)
    ones = None
    for _ in range(args.warm):
        x, y = next(data)
        with torch.no_grad():
            t = teacher(x)
        ones = torch.ones(x.shape[0], 1, *preset.grid) if ones is None else ones
        _step_with(student, opt, t, x, y, ones, 1.0, preset.grid, "l1", "l1")
    batch, held = next(data), next(held_data)
    print(
        f"state: {args.task}, preset {args.preset}, {args.warm} uniform-KD steps, seed {args.seed}, {args.draws} draws"
    )
    for signal in signals:
        res = credit_correlation(
            student, teacher, opt, batch, held, preset.grid, signal=signal, draws=args.draws, seed=args.seed
        )
        print(f"  {signal:<10} r = {res['r']:+.3f} ± {res['se']:.3f}  (z = {res['z']:+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
