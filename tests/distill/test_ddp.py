"""SparkDistiller under DistributedDataParallel: 2 CPU processes, gloo backend.

Each rank trains on different images, so its rewards and policy / balancer
gradients differ; the distiller's all-reduce must keep the policy, the
balancer, the baseline (and, through DDP, the student) identical on both ranks.
"""

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ext.distill import SparkDistiller
from spark_ext.models import EncoderDecoderNet

WORLD = 2
STEPS = 4
POISONED = 1  # rank 0's batch holds inf at this step: every rank must skip it together


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A short timeout: a rank waiting in a collective the other skipped fails instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        teacher = EncoderDecoderNet(width=4, depth=1)
        student = copy.deepcopy(teacher)
        model = torch.nn.parallel.DistributedDataParallel(student)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        # seed=rank: the ranks build *different* policies; the distiller's broadcast must fix that.
        d = SparkDistiller(
            model,
            teacher,
            opt,
            mode="spark",
            balancer="gor",
            grid=(2, 2),
            seed=rank,
            policy_lr=1e-2,
            balancer_lr=0.1,
            policy_signal="paper",
        )
        # The default (credit) policy on a second student: its held-out step is averaged over ranks.
        credit_student = copy.deepcopy(teacher)
        credit_model = torch.nn.parallel.DistributedDataParallel(credit_student)
        credit_opt = torch.optim.Adam(credit_model.parameters(), lr=1e-3)
        dc = SparkDistiller(credit_model, teacher, credit_opt, mode="spark", grid=(2, 2), seed=rank, credit_every=1)
        logs = []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * rank + step)  # different images per rank
            y = torch.rand(2, 3, 8, 8, generator=g)
            x = y + 0.1 * torch.randn(y.shape, generator=g)
            if step == POISONED and rank == 0:
                x[0, 0, 0, 0] = float("inf")
            logs.append(d.step(x, y))
            dc.step(x, y)
        torch.save(
            {
                "credit_policy": dc.policy.state_dict(),
                "credit_student": credit_student.state_dict(),
                "policy": d.policy.state_dict(),
                "balancer": d.balancer.state_dict(),
                "student": student.state_dict(),
                "baseline": d.updater.baseline,
                "logs": logs,
                "steps": (d.steps, dc.steps),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_policy_balancer_and_student_stay_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    # The ranks saw different data: their local rewards / losses differ ...
    assert r0["logs"][0]["loss_task"] != r1["logs"][0]["loss_task"]
    # Only rank 0's batch held inf, yet both ranks skipped that step (no collective waited for the other).
    assert r0["logs"][POISONED]["skipped"] == r1["logs"][POISONED]["skipped"] == 1.0
    assert r0["steps"] == r1["steps"] == (STEPS - 1, STEPS - 1)
    # ... yet everything shared is bitwise identical.
    for part in ("policy", "balancer", "student", "credit_policy", "credit_student"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{part}.{k} differs across ranks"
    assert torch.equal(r0["baseline"], r1["baseline"])
    assert float(r0["baseline"]) != 0.0
    # And the shared parameters did move.
    assert float(r0["balancer"]["s1"]) != 0.0


def test_the_torchrun_example_trains_one_student_on_two_ranks_that_stay_in_step(tmp_path):
    # examples/ddp_spark.py exactly as docs/spark.md's DDP section starts it, on 2 CPU processes (gloo).
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("skimage")
    script = Path(__file__).resolve().parents[2] / "examples" / "ddp_spark.py"
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += ["--task", "denoise", "--steps", "3", "--batch", "2", "--crop", "16", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)  # about 10 s
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "ddp_spark.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["steps"] == 3
    first, second = report["rank_digests"]
    assert first == second  # student and policy parameters bitwise equal on both ranks
    state = torch.load(out / "student.pt", weights_only=True)
    assert any(name.endswith("step") for name in state)  # the W4A4 student, with its LSQ steps
