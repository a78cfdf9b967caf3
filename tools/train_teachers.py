"""Train the FP32 teachers shipped in ``spark_ext/models/weights/`` (reproducibly) and record their curves.

Each run is the demo's own teacher training (:func:`spark_ext.demo.teacher.train_teacher`:
``default`` preset network, L1, Adam lr 2e-3 with cosine decay over ``--steps``,
seed 0, batches of 8 random 48 px crops of the 14 training photos) on one CPU
thread, so the same torch build gives bitwise the same weights. Every
``--eval-every`` steps it scores the held-out photos (:mod:`spark_ext.metrics`:
the demo's 192 px centre crops); at the end also the whole held-out photos.

Writes ``OUT/teacher_<task>_<steps>.pt`` (fp32 ``state_dict``) and
``OUT/teacher_<task>_<steps>.json`` (curve, final scores, sha256, time).

    python tools/train_teachers.py --task denoise --steps 3000 6000 12000 --out teacher_runs

To ship one: copy the ``.pt`` to ``spark_ext/models/weights/teacher_<task>.pt``
and put its sha256, steps and scores in ``spark_ext/models/pretrained.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("denoise", "sr"), required=True)
    p.add_argument(
        "--steps", type=int, nargs="+", required=True, help="total steps of each run (one cosine schedule per run)"
    )
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if any(s < 1 for s in args.steps) or args.eval_every < 1:
        p.error("--steps and --eval-every must be >= 1")

    torch.set_num_threads(1)
    from spark_ext.data import RestorationTask, held_out_pairs
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.scoring import evaluate
    from spark_ext.demo.teacher import train_teacher

    task = RestorationTask(args.task)
    base = PRESETS["default"]
    held_crops = held_out_pairs(task, base.eval_size)
    held_whole = held_out_pairs(task, None)
    args.out.mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        preset = dataclasses.replace(base, teacher_steps=steps)
        curve, t0 = [], time.perf_counter()

        def record(step: int, model: torch.nn.Module, steps=steps, curve=curve, t0=t0) -> None:
            if step % args.eval_every == 0 or step == steps:
                r = evaluate(model, task, held_crops)
                curve.append({"step": step, "psnr": r["psnr"], "ssim": r["ssim"], "seconds": time.perf_counter() - t0})
                print(
                    f"{task.kind} {steps}: step {step} PSNR {r['psnr']:.3f} SSIM {r['ssim']:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )

        model, losses = train_teacher(task, preset, torch.device("cpu"), quiet=True, callback=record)
        seconds = time.perf_counter() - t0
        path = args.out / f"teacher_{task.kind}_{steps}.pt"
        torch.save(model.state_dict(), path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        whole = evaluate(model, task, held_whole)
        report = {
            "task": dataclasses.asdict(task),
            "preset": dataclasses.asdict(preset),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": seconds,
            "sha256": sha,
            "final_train_l1_last100": sum(losses[-100:]) / len(losses[-100:]),
            "curve_heldout_crops": curve,
            "heldout_crops": curve[-1],
            "heldout_whole": {k: whole[k] for k in ("psnr", "ssim", "per_image")},
        }
        (args.out / f"teacher_{task.kind}_{steps}.json").write_text(json.dumps(report, indent=1))
        print(
            f"{task.kind} {steps}: done in {seconds:.0f}s, crops PSNR {curve[-1]['psnr']:.3f}, "
            f"whole PSNR {whole['psnr']:.3f} SSIM {whole['ssim']:.4f}, sha256 {sha}",
            flush=True,
        )
        print(
            f"  to ship: cp {path} spark_ext/models/weights/teacher_{task.kind}.pt "
            "and set in spark_ext/models/pretrained.py: "
            f'steps={steps}, sha256="{sha}", psnr={whole["psnr"]:.3f}, ssim={whole["ssim"]:.4f}',
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
