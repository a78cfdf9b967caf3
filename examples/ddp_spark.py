"""Train one W4A4 student with :class:`~spark_ext.distill.SparkDistiller` on several GPUs or machines (DDP).

Start it with ``torchrun``, which starts one process per GPU and sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; backend NCCL on CUDA, gloo on a CPU::

    # one machine, 4 GPUs (or 4 CPU processes where there is no GPU)
    torchrun --standalone --nproc_per_node 4 examples/ddp_spark.py --task denoise --steps 500 --out run
    # two machines with 8 GPUs each: the same command on both, HOST being one of them
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id spark \\
        examples/ddp_spark.py --task denoise --steps 500 --out run

The student is the shipped FP32 teacher quantized to W4A4 (first and last layers W8A8) and calibrated; it
trains with the demo's optimiser (Adam, one lr group per LSQ quantizer, the ``warmup_then_linear``
schedule) on ``--batch`` crops *per rank* (:class:`~spark_ext.data.RandomCropDataset` split over the ranks
by ``DistributedSampler``). ``DistributedDataParallel`` averages the student's gradients; the distiller
keeps SPARK's policy identical on every rank (docs/spark.md, "DDP"). Rank 0 writes ``student.pt`` (the
student's ``state_dict``) and ``ddp_spark.json`` (settings, last losses, and each rank's SHA-256 of its
student and policy parameters: equal on every rank when the ranks stayed in step).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from spark_ext.atomic import atomic_path, write_json
from spark_ext.data import RandomCropBatches, RandomCropDataset, RestorationTask
from spark_ext.demo.training import student_optimizer, student_schedule
from spark_ext.distill import DistillConfig, SparkDistiller
from spark_ext.models import load_pretrained_teacher
from spark_ext.quant import calibrate, quantize_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="crops per rank and step (default: %(default)s)")
    p.add_argument("--crop", type=int, default=48, help="crop size in target pixels (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="the student's peak Adam lr (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("ddp_spark_out"), help="rank 0's output folder")
    args = p.parse_args()
    for name in ("steps", "batch", "crop"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def digest(tensors) -> str:
    """SHA-256 of the tensors' float32 bytes, in order (equal on two ranks only if every value is)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        task = RestorationTask(args.task)
        teacher = load_pretrained_teacher(args.task, device)
        # Every rank builds the same student (same calibration crops); DDP also broadcasts rank 0's at wrapping.
        student = copy.deepcopy(teacher).requires_grad_(True)
        quantize_model(student, w_bits=4, a_bits=4, first_last_bits=8)  # in place
        calibration = RandomCropBatches(task, args.crop, args.batch, seed=20_000, device=device)
        calibrate(student, [next(calibration)[0] for _ in range(4)], method="mse")
        model = DistributedDataParallel(student, device_ids=[local_rank] if cuda else None)

        data = RandomCropDataset(task, args.crop, length=max(1024, args.batch * world), seed=30_000)
        sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)  # each rank its own crops
        loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
        opt = student_optimizer(model, args.lr, quant_rel_lr=1e-2)
        sched = student_schedule(opt, args.steps, "warmup_then_linear")
        config = DistillConfig(mode="spark", grid=(8, 8), policy_steps=args.steps, seed=0)
        distiller = SparkDistiller(model, teacher, opt, config)

        logs, epoch = [], 0
        while len(logs) < args.steps:
            sampler.set_epoch(epoch)
            for inputs, targets in loader:
                logs.append(distiller.step(inputs.to(device), targets.to(device)))
                sched.step()
                if len(logs) == args.steps:
                    break
            epoch += 1

        digests = [None] * world
        mine = {"student": digest(student.parameters()), "policy": digest(distiller.policy.parameters())}
        dist.all_gather_object(digests, mine)
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out / "student.pt") as tmp:
                torch.save(student.state_dict(), tmp)
            last = logs[-1]
            write_json(
                args.out / "ddp_spark.json",
                {
                    "task": args.task,
                    "world_size": world,
                    "backend": dist.get_backend(),
                    "steps": len(logs),
                    "batch_per_rank": args.batch,
                    "crop": args.crop,
                    "lr": args.lr,
                    "last": {k: last[k] for k in ("loss", "loss_task", "loss_kd", "w_mean")},
                    "rank_digests": digests,
                },
            )
            print(f"{len(logs)} steps on {world} ranks ({dist.get_backend()}), loss {last['loss']:.4f}: {args.out}")
        # leave together: a rank that tears its process group down while another is still writing can hang in gloo
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
