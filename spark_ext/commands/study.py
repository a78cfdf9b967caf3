"""``spark-ext study``: the KD method matrix with paired seeds, on denoising and x2 SR.

Every method trains a copy of the same PTQ W4A4 student (per seed: the same
calibration crops, data order and budget; the demo's :func:`~spark_ext.demo.training.train_student`)
from the same FP32 teacher (:func:`study_teacher`), and is scored on the demo's
held-out photos. Per task and method the study reports mean ± std PSNR/SSIM
over seeds, the paired PSNR difference to QAT and to uniform KD at its best
``lambda_kd`` (best by mean PSNR over the grid ``--lambdas``, on the same
held-out photos, so the KD reference is, if anything, favoured) with a 95 %
t-interval over seeds, and the training cost per step relative to uniform KD
at ``lambda_kd = 1`` (CPU time of each one-thread worker on a CPU, wall time on
a GPU). Writes ``study.json`` and ``study.png``. With ``--eval-images DIR`` every student is also
scored on the photos in DIR (whole photos, degraded like the held-out set), with the same statistics
against the same references.

Workers are processes of one thread each: on a CPU the preset's number; with ``--device cuda``
:data:`WORKERS_PER_GPU` per visible GPU by default, spread round-robin over them (``cuda:0, cuda:1, ...``).

Methods (``--methods``; default all):

* ``qat``: L1 only. ``kd@L``: uniform KD at ``lambda_kd = L`` for each ``L`` in ``--lambdas``.
* ``kd_anneal``: uniform KD, ``lambda_kd`` decaying linearly from 1 to 0 over the run.
* ``kd_l2``, ``kd_charbonnier``: uniform KD at ``lambda_kd = 1`` with another KD loss kind (default L1).
* ``map_random``: a random mean-1 map with the initial policy's per-cell variance.
* ``map_<signal>``: a fixed mean-1 map proportional to one signal (``lap_var``, ``pix_var``,
  ``recon_err``, ``kd_gap``) or to the teacher's advantage (``teacher_adv``).
* ``kd_gate``: uniform KD only where the teacher is closer to the target than the student.
* ``gor``, ``lmr``, ``dfd``: docs/spec.md §6's balancers and decoder-free distillation.
* ``spark_paper``: docs/spec.md §4's REINFORCE as written. ``spark_reinforce``: the repaired REINFORCE.
* ``spark``: SPARK's default (the first-order credit policy, docs/spark.md).
* ``spark_gor``: SPARK's default map with the GoR balancer between the task and KD terms.
* ``spark_placement``: SPARK's default map renormalised to mean 1 per image before it weights KD
  (``policy_map="placement"``): where SPARK puts KD, without changing how much.
* ``kd_growth``: uniform KD with the total loss multiplied by ``s_t = (L_task + w_t L_kd) / (L_task + L_kd)``,
  ``w_t`` the batch mean of a default SPARK policy learning alongside on this student
  (``policy_map="scale"``): the growth of the loss's size that SPARK's map causes, without its extra KD
  or its placement (``tools/probe_spark_ablation.py``'s ``kd_scaled``, with the policy on the same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from spark_ext._validation import writable_dir_problem
from spark_ext.atomic import atomic_path, write_json
from spark_ext.commands._args import (
    CommandParser,
    add_seeds_argument,
    core_count,
    error_summary,
    parse_device,
    parse_names,
    positive_float,
    positive_int,
    repeated,
)
from spark_ext.demo.presets import STUDENT_SCHEDULES
from spark_ext.progress import progress
from spark_ext.stats import mean_std, paired_difference

METHODS: dict[str, dict[str, Any]] = {
    "qat": {"mode": "qat"},
    "kd_anneal": {"mode": "kd", "kd_anneal_steps": None},  # filled with the run's steps
    "kd_l2": {"mode": "kd", "kd_loss": "l2"},
    "kd_charbonnier": {"mode": "kd", "kd_loss": "charbonnier"},
    "map_random": {"mode": "map", "map_signal": "random"},
    "map_lap_var": {"mode": "map", "map_signal": "lap_var"},
    "map_pix_var": {"mode": "map", "map_signal": "pix_var"},
    "map_recon_err": {"mode": "map", "map_signal": "recon_err"},
    "map_kd_gap": {"mode": "map", "map_signal": "kd_gap"},
    "map_teacher_adv": {"mode": "map", "map_signal": "teacher_adv"},
    "kd_gate": {"mode": "kd", "kd_gate": "teacher"},
    "gor": {"mode": "kd", "balancer": "gor"},
    "spark_gor": {"mode": "spark", "balancer": "gor"},
    "lmr": {"mode": "kd", "balancer": "lmr"},
    "dfd": {"mode": "kd", "dfd_layer": "<feature layer>"},
    "spark_paper": {"mode": "spark", "policy_signal": "paper"},
    "spark_reinforce": {"mode": "spark", "policy_signal": "reinforce"},
    "spark": {"mode": "spark"},
    "spark_placement": {"mode": "spark", "policy_map": "placement"},
    "kd_growth": {"mode": "spark", "policy_map": "scale"},
}
TASKS = ("denoise", "sr")


@dataclasses.dataclass(frozen=True)
class StudyPreset:
    """Budget of a study: the demo preset it starts from, and what it changes."""

    name: str
    demo_preset: str
    student_steps: int
    teacher_steps: int
    seeds: int
    lambdas: tuple[float, ...]
    workers: int  # on a CPU; on CUDA the default is default_workers()
    student_lr: Optional[float] = None  # None: the demo preset's
    student_schedule: Optional[str] = None  # spark_ext.demo.presets.STUDENT_SCHEDULES; None: the demo preset's
    methods: Optional[tuple[str, ...]] = None  # --methods' default; None: all


# gpu-lease's sizing (docs/spark.md, "The study on GPUs"): the assumed wall time of one step of a worker sharing
# an H100 with 3 others (about 660 ops a step x 20 us: each tiny kernel's ~5 us of GPU time, serialised over the
# 4 workers; their host-side dispatch overlaps), against 50-70 ms (denoising) and 14-18 ms (SR) on one core of
# the 2-core CPU.
GPU_STEP_MS = 13
GPU_LEASE_STEPS = 3000

PRESETS = {
    # Every preset trains the students with Adam at 3e-3, "warmup_then_linear" (a linear warm-up from 0.15 x lr
    # over the first half, constant, linear to 0 over the last quarter): the best uniform-KD setting measured
    # at 200 steps (denoising) and at 500 steps (denoising and SR); docs/spark.md, "The students' optimiser
    # comes first". The demo's former Adam 1e-3 with cosine decay cost uniform KD 0.4 dB on denoising at 500.
    # 2-core CPU, about 17 minutes once the teachers are cached (230 students over 2 workers).
    "quick": StudyPreset("quick", "default", 200, 6000, 5, (0.5, 1.0, 2.0), 2, 3e-3, "warmup_then_linear"),
    # the demo's default budget on a CPU: about 75 minutes on 2 cores for every method (100 students of 11 methods
    # took 31 minutes on the shared 2-core CPU; docs/spark.md, "The `cpu` study").
    "cpu": StudyPreset("cpu", "default", 500, 6000, 5, (0.25, 0.5, 1.0, 2.0), 2, 3e-3, "warmup_then_linear"),
    # a GPU: the demo's "full" network and crops (not measured by the project yet; the optimiser is not
    # probed at 5000 steps or on this network).
    "gpu": StudyPreset("gpu", "full", 5000, 20000, 5, (0.25, 0.5, 1.0, 2.0), 1, 3e-3, "warmup_then_linear"),
    # One leased H100 for about 7 minutes: 36 students (6 methods x 2 tasks x 3 seeds) of the demo's default
    # network (the shipped teachers: nothing to train first), WORKERS_PER_GPU workers on the GPU, so 9 students
    # per worker. Estimated, not measured (docs/spark.md, "The study on GPUs"): these networks' steps are bound
    # by kernel launches on a GPU (600-715 ops a step, counted on the CPU), about GPU_STEP_MS per step per worker
    # with 4 workers sharing the GPU; 9 x GPU_LEASE_STEPS x GPU_STEP_MS = 351 s, plus about 90 s of start-up,
    # PTQ calibration and scoring, is about 7.3 minutes. The optimiser is not probed at this budget.
    "gpu-lease": StudyPreset(
        "gpu-lease",
        "default",
        GPU_LEASE_STEPS,
        6000,
        3,
        (1.0,),
        2,
        3e-3,
        "warmup_then_linear",
        ("qat", "kd@1", "spark", "spark_placement", "kd_growth", "gor"),
    ),
}


# ----------------------------------------------------------------------------- teacher


def study_teacher(task, preset, device, cache_dir: Optional[Path], quiet: bool):
    """The FP32 teacher every student of the study distils from: ``(model, info)``.

    The teacher shipped with the package where it fits the demo preset (same
    network and degradation: :func:`spark_ext.demo.teacher.get_teacher`), else the demo's
    teacher trained for ``preset.teacher_steps`` (cached in ``cache_dir``).
    """
    from spark_ext.demo.teacher import get_teacher

    teacher, info = get_teacher(task, preset, device, cache_dir, quiet)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, info


# ----------------------------------------------------------------------------- jobs


_CACHE: dict[tuple, Any] = {}
# Several students share a GPU: one step of these small networks is mostly kernel-launch and host work, so
# one process leaves the GPU idle most of the time (docs/spark.md, "The study on GPUs"). A student of the
# demo's networks holds well under 1 GiB of GPU memory.
WORKERS_PER_GPU = 4
_WORKER_DEVICE: Optional[str] = None  # a pool worker's device (worker_devices), set by _take_device


def default_workers(device: str, cpu_workers: int) -> int:
    """``--workers``' default: ``cpu_workers`` (the preset's) on a CPU; on CUDA :data:`WORKERS_PER_GPU` per
    device used (every visible device for ``"cuda"``, one for ``"cuda:N"``), at most one per CPU core."""
    if not device.startswith("cuda"):
        return cpu_workers
    gpus = torch.cuda.device_count() if device == "cuda" else 1
    return max(1, min(WORKERS_PER_GPU * gpus, os.cpu_count() or 1))


def worker_devices(device: str, workers: int) -> list[str]:
    """The device of each of ``workers`` worker processes: ``"cuda"`` spreads them round-robin over every
    visible CUDA device (``cuda:0, cuda:1, ..., cuda:0, ...``); any other device is every worker's."""
    if device != "cuda":
        return [device] * workers
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(workers)]


def _take_device(devices) -> None:
    """Pool initializer: this worker process takes its device from the queue ``devices`` (one per worker)."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = devices.get(timeout=60)


def worker_pool(devices: Sequence[str]):
    """A pool of ``len(devices)`` spawned worker processes, worker ``k`` on ``devices[k]`` (its jobs run there)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for device in devices:
        queue.put(device)
    return concurrent.futures.ProcessPoolExecutor(
        len(devices), mp_context=ctx, initializer=_take_device, initargs=(queue,)
    )


def _setup(task_name: str, preset, device, cache_dir, quiet):
    from spark_ext.data import RestorationTask, held_out_pairs

    key = ("setup", task_name)
    if key not in _CACHE:
        task = RestorationTask(task_name)
        teacher, info = study_teacher(task, preset, device, cache_dir, quiet=True)
        held = held_out_pairs(task, preset.eval_size, device=device)
        _CACHE[key] = (task, teacher, info, held)
    return _CACHE[key]


def _eval_pairs(task_name: str, directory: Path, device) -> list:
    """The ``--eval-images`` pairs of one task (:func:`spark_ext.data.image_folder_pairs`, whole photos), cached."""
    from spark_ext.data import RestorationTask, image_folder_pairs

    key = ("eval", task_name, str(directory), str(device))
    if key not in _CACHE:
        _CACHE[key] = image_folder_pairs(RestorationTask(task_name), directory, device=device)
    return _CACHE[key]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (task, method, seed): the unit of work of a worker process."""
    from spark_ext.demo.scoring import model_outputs, score_outputs
    from spark_ext.demo.training import make_ptq, train_student

    torch.set_num_threads(job["threads"])
    device = torch.device(_WORKER_DEVICE or job["device"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels launched on the current device's stream see this one
    preset = job["preset"]
    task, teacher, _, held = _setup(job["task"], preset, device, job["cache_dir"], True)
    base_key = ("ptq", job["task"], job["seed"])
    if base_key not in _CACHE:
        for key in [k for k in _CACHE if k[0] == "ptq"]:  # jobs come seed-major: keep one seed's students
            if key[2] != job["seed"]:
                del _CACHE[key]
        _CACHE[base_key] = make_ptq(teacher, task, preset, job["seed"], device)
    base = _CACHE[base_key]
    overrides = dict(job["overrides"])
    if "kd_anneal_steps" in overrides:
        overrides["kd_anneal_steps"] = preset.student_steps
    # CPU time of the one-thread worker on a CPU (another worker or process does not inflate it); wall
    # time on a GPU, where every step ends in a host sync (the distiller's logs).
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    student, distiller, logs, seconds = train_student(
        job["method"], base, teacher, task, preset, job["seed"], device, True, overrides=overrides, clock=clock
    )
    result = score_outputs(model_outputs(student, held), held, task)
    extra = {}
    if job.get("eval_images") is not None:
        pairs = _eval_pairs(job["task"], job["eval_images"], device)
        scores = score_outputs(model_outputs(student, pairs), pairs, task)
        extra.update(eval_psnr=scores["psnr"], eval_ssim=scores["ssim"])
    if distiller.policy is not None:
        from spark_ext.ops import difficulty_signals

        x, y = next(iter_batches(task, preset, device))
        with torch.no_grad():
            s, t = student(x), teacher(x)
        signals, _ = difficulty_signals(s, t, y, preset.grid)
        w = distiller.policy_weight_map(signals, mean=True)
        extra["mean_map"] = {
            "min": float(w.min()),
            "max": float(w.max()),
            "mean": float(w.mean()),
            "std": float(w.std()),
        }
    distiller.close()
    return {
        "task": job["task"],
        "method": job["method"],
        "seed": job["seed"],
        "device": str(device),
        "psnr": result["psnr"],
        "ssim": result["ssim"],
        "seconds": seconds,
        "ms_per_step": 1000.0 * seconds / preset.student_steps,
        "final_loss_task": sum(entry["loss_task"] for entry in logs[-20:]) / max(1, len(logs[-20:])),
        **extra,
    }


def iter_batches(task, preset, device):
    from spark_ext.data import RandomCropBatches

    return RandomCropBatches(task, preset.crop, preset.batch, seed=99, device=device)


# ----------------------------------------------------------------------------- summary


def summarise(rows: list[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """Per task: per method mean ± std over its seeds, paired differences (over the seeds both have)
    to QAT and to the best uniform KD (best mean PSNR over the seeds every ``kd@`` run has), cost.

    Runs scored on ``--eval-images`` (``eval_psnr``, ``eval_ssim``) get the same statistics under
    ``eval_``-prefixed keys, against the same references (the best KD chosen on the held-out photos).
    """
    out: dict[str, Any] = {}
    for task in tasks:
        by = {m: {r["seed"]: r for r in rows if r["task"] == task and r["method"] == m} for m in methods}
        by = {m: v for m, v in by.items() if v}
        kd_names = [m for m in by if m.startswith("kd@")]
        kd_seeds = sorted(set.intersection(*(set(by[m]) for m in kd_names))) if kd_names else []
        best_kd = max(kd_names, key=lambda m: mean_std([by[m][s]["psnr"] for s in kd_seeds])[0]) if kd_seeds else None
        cost_ref = by.get("kd@1") or (by[best_kd] if best_kd else None)
        ref_ms = mean_std([r["ms_per_step"] for r in cost_ref.values()])[0] if cost_ref else None
        table = {}
        for m, per_seed in by.items():
            seeds = sorted(per_seed)
            psnr = [per_seed[s]["psnr"] for s in seeds]
            ssim = [per_seed[s]["ssim"] for s in seeds]
            ms = mean_std([per_seed[s]["ms_per_step"] for s in seeds])[0]
            entry = {
                "seeds": seeds,
                "psnr_mean": mean_std(psnr)[0],
                "psnr_std": mean_std(psnr)[1],
                "ssim_mean": mean_std(ssim)[0],
                "ssim_std": mean_std(ssim)[1],
                "ms_per_step": ms,
                "cost_vs_kd": ms / ref_ms if ref_ms else None,
                "per_seed": {str(s): per_seed[s] for s in seeds},
            }
            if all("eval_psnr" in per_seed[s] for s in seeds):
                for key in ("eval_psnr", "eval_ssim"):
                    entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([per_seed[s][key] for s in seeds])
            for prefix in ("", "eval_"):
                for key, ref in (("vs_qat", "qat"), ("vs_best_kd", best_kd)):
                    metric = prefix + "psnr"
                    common = [s for s in seeds if ref in by and s in by[ref] and metric in by[ref][s]]
                    common = [s for s in common if metric in per_seed[s]]
                    if ref is not None and m != ref and common:
                        entry[prefix + key] = paired_difference(
                            [per_seed[s][metric] for s in common], [by[ref][s][metric] for s in common]
                        )
            table[m] = entry
        all_seeds = sorted(set().union(*(set(v) for v in by.values()))) if by else []
        out[task] = {"seeds": all_seeds, "best_kd": best_kd, "methods": table}
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as text: per task, the held-out photos' table, then the ``--eval-images`` one if scored."""
    lines = []
    for task, res in summary.items():
        for prefix, photos in (("", "held-out photos"), ("eval_", "--eval-images")):
            scored = {m: e for m, e in res["methods"].items() if f"{prefix}psnr_mean" in e}
            if not scored:
                continue
            lines.append(
                f"\n{task}, {photos}: seeds {res['seeds']}, best uniform KD = {res['best_kd']} (n = paired seeds)"
            )
            lines.append(
                f"{'method':<17} {'PSNR (dB)':>17} {'vs QAT [95% CI]':>28} {'vs best KD [95% CI]':>28} {'cost':>6}"
            )
            for m, e in sorted(scored.items(), key=lambda kv, k=f"{prefix}psnr_mean": -kv[1][k]):

                def ci(key, e=e, prefix=prefix):
                    d = e.get(prefix + key)
                    return f"{d['mean']:+.3f} [{d['lo']:+.3f},{d['hi']:+.3f}] {d['wins']}/{d['n']}" if d else "-"

                cost = f"{e['cost_vs_kd']:.2f}x" if e["cost_vs_kd"] else "-"
                lines.append(
                    f"{m:<17} {e[prefix + 'psnr_mean']:>9.3f} ± {e[prefix + 'psnr_std']:.3f} "
                    f"{ci('vs_qat'):>28} {ci('vs_best_kd'):>28} {cost:>6}"
                )
    return "\n".join(lines)


def save_plot(path: Path, summary: dict[str, Any]) -> None:
    """Per task: paired PSNR difference to the best uniform KD with its 95 % interval, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        res = summary[task]
        items = [(m, e["vs_best_kd"]) for m, e in res["methods"].items() if "vs_best_kd" in e]
        items.sort(key=lambda kv: kv[1]["mean"])
        ys = range(len(items))
        means = [d["mean"] for _, d in items]
        errs = [[d["mean"] - d["lo"] for _, d in items], [d["hi"] - d["mean"] for _, d in items]]
        colors = ["tab:green" if d["lo"] > 0 else ("tab:red" if d["hi"] < 0 else "tab:gray") for _, d in items]
        ax.barh(list(ys), means, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([m for m, _ in items], fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"PSNR - {res['best_kd']} (dB), paired, 95% t-interval")
        ax.set_title(f"{task} ({len(res['seeds'])} seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _lambdas(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` -> ``(0.5, 1.0, 2.0)``: one or more finite numbers > 0 (see ``positive_float``)."""
    values = tuple(positive_float(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def all_method_names(lambdas: Sequence[float]) -> list[str]:
    return ["qat"] + [f"kd@{lam:g}" for lam in lambdas] + [m for m in METHODS if m != "qat"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = CommandParser(
        prog="spark-ext study",
        description="Paired-seed study of QAT, uniform KD, heuristic maps, balancers, DFD and SPARK variants "
        "(W4A4 students of the demo's network) on denoising and x2 SR; writes study.json and study.png.",
        epilog="Presets: "
        + "; ".join(
            f"{s.name}: {s.student_steps} student steps, student lr "
            f"{'of the demo preset' if s.student_lr is None else f'{s.student_lr:g} {s.student_schedule}'}, "
            f"{s.seeds} seeds, lambdas {list(s.lambdas)}, "
            f"demo preset {s.demo_preset!r}, {s.workers} worker(s) on a CPU"
            + (f", methods {','.join(s.methods)}" if s.methods else "")
            for s in PRESETS.values()
        )
        + f". On CUDA {WORKERS_PER_GPU} workers per GPU. --quick = --preset quick. Methods: qat, kd@L (one per "
        "--lambdas), " + ", ".join(m for m in METHODS if m != "qat"),
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick", help="budget (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--tasks", default="denoise,sr", help="comma-separated from denoise,sr (default: %(default)s)")
    p.add_argument(
        "--methods", default=None, help="comma-separated method names, or 'all' (default: the preset's, else all)"
    )
    add_seeds_argument(p, None)
    p.add_argument("--steps", type=positive_int, default=None, help="student steps (default: the preset's)")
    p.add_argument("--teacher-steps", type=positive_int, default=None, help="teacher steps (default: the preset's)")
    p.add_argument("--lambdas", type=_lambdas, default=None, help="uniform-KD lambda grid, e.g. 0.5,1,2")
    p.add_argument(
        "--student-lr", type=positive_float, default=None, help="the students' Adam lr (default: the preset's)"
    )
    p.add_argument(
        "--student-schedule",
        choices=STUDENT_SCHEDULES,
        default=None,
        help="the students' lr schedule: cosine decay to 0, constant, constant then a linear decay to 0 over "
        "the last quarter, or warmup_then_linear (a linear warm-up from 0.15 x lr over the first half, then "
        "constant_then_linear's course; default: the preset's)",
    )
    p.add_argument(
        "--workers",
        type=core_count,
        default=None,
        help="parallel worker processes, 1 thread each, at most the cores (default: the preset's on a CPU; on "
        f"--device cuda {WORKERS_PER_GPU} per visible GPU, spread round-robin over them; on cuda:N {WORKERS_PER_GPU})",
    )
    p.add_argument("--out", type=Path, default=Path("study_out"), help="output folder (default: %(default)s)")
    p.add_argument(
        "--eval-images",
        type=Path,
        default=None,
        metavar="DIR",
        help="also score every student on the PNG/JPEG photos in DIR (whole photos, degraded like the held-out "
        "set), with the same paired statistics",
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spark_ext" / "teachers"
    p.add_argument("--cache-dir", type=Path, default=default_cache, help="teacher cache (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the students of OUT/study.json (same budget) and train only the missing ones; "
        "its methods join this run's (without it, an OUT that holds a study.json is refused)",
    )
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs more than argparse's types, before any work (``p.error``: one line, exit 2).

    Normalises ``args`` (tasks and methods as lists, the device resolved) and sets ``args.previous_runs``
    (the runs ``--resume`` keeps).
    """
    if args.quick:
        args.preset = "quick"
    spec = PRESETS[args.preset]
    args.lambdas = args.lambdas or spec.lambdas
    names = all_method_names(args.lambdas)
    try:
        args.tasks = parse_names(args.tasks, "--tasks", TASKS)
        if repeated(names):
            raise ValueError(f"--lambdas: {[n[3:] for n in repeated(names)]} given more than once")
        methods = args.methods or (",".join(spec.methods) if spec.methods else "all")
        args.methods = names if methods == "all" else parse_names(methods, "--methods", names)
    except ValueError as exc:
        p.error(str(exc))
    try:
        device = parse_device(args.device, "the study")
    except ValueError as exc:
        p.error(f"--device: {exc}")
    args.device = str(device)
    args.seeds = args.seeds or tuple(range(spec.seeds))
    args.workers = args.workers or default_workers(args.device, spec.workers)
    why = writable_dir_problem(args.out, files=("study.json", "study.png"))
    if why:
        p.error(f"--out: {why}")
    preset = study_preset(args)
    from spark_ext.data import RestorationTask
    from spark_ext.demo.teacher import teacher_problem
    from spark_ext.metrics import SSIM_WINDOW

    if args.eval_images is not None:  # every photo must decode, for every task, before any work
        for task in args.tasks:
            smallest = SSIM_WINDOW + 2 * RestorationTask(task).scale
            try:
                pairs = _eval_pairs(task, args.eval_images, "cpu")
            except ValueError as exc:
                p.error(f"--eval-images: {exc}")
            small = [name for name, _, y in pairs if min(y.shape[-2:]) < smallest]
            if small:
                p.error(f"--eval-images: images smaller than {smallest}px for {task}: {small}")

    for task in args.tasks:
        why = teacher_problem(RestorationTask(task), preset, args.cache_dir)
        if why:
            p.error(why)
    report = args.out / "study.json"
    if report.exists() and not args.resume:
        p.error(f"--out: {report} exists; pass --resume to continue that study, or choose another --out")
    try:
        args.previous_runs = load_previous_runs(report, preset, eval_photos(args)) if args.resume else []
    except ValueError as exc:
        p.error(f"--resume: {exc}")


def eval_photos(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """What ``study.json`` records of ``--eval-images`` (None without it): the folder and its photos' names."""
    if args.eval_images is None:
        return None
    names = [name for name, _, _ in _eval_pairs(args.tasks[0], args.eval_images, "cpu")]
    return {"dir": str(args.eval_images), "photos": names}


def study_preset(args: argparse.Namespace):
    """The demo preset every student of the study trains with: the study preset's budget and the arguments'."""
    from spark_ext.demo.presets import PRESETS as DEMO_PRESETS

    spec = PRESETS[args.preset]
    demo = DEMO_PRESETS[spec.demo_preset]
    return dataclasses.replace(
        demo,
        student_steps=args.steps or spec.student_steps,
        teacher_steps=args.teacher_steps or spec.teacher_steps,
        student_lr=args.student_lr or spec.student_lr or demo.student_lr,
        student_schedule=args.student_schedule or spec.student_schedule or demo.student_schedule,
        seeds=args.seeds,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from spark_ext.demo.scoring import model_outputs, score_outputs

    spec = PRESETS[args.preset]
    preset = study_preset(args)
    rows = args.previous_runs
    args.out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    teachers = {}
    for task in args.tasks:  # trained (or loaded) once, before the workers start
        from spark_ext.data import RestorationTask, held_out_pairs

        t = RestorationTask(task)
        teacher, info = study_teacher(t, preset, device, args.cache_dir, args.quiet)
        held = held_out_pairs(t, preset.eval_size, device=device)
        score = score_outputs(model_outputs(teacher, held), held, t)
        teachers[task] = {
            "steps": info["steps"],  # the shipped teacher's own budget when it is the one used
            "shipped": info["pretrained"],
            "sha256": info.get("sha256"),
            "psnr": score["psnr"],
            "ssim": score["ssim"],
            "path": info.get("path"),
        }
        kind = "shipped" if info["pretrained"] else "trained"
        print(f"teacher {task}: {kind}, {info['steps']} steps, held-out PSNR {score['psnr']:.3f} dB")
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    if rows:
        print(f"--resume: {len(rows)} students reused from {args.out / 'study.json'}")
    args.methods = list(dict.fromkeys(args.methods + sorted({r["method"] for r in rows} - set(args.methods))))
    jobs = []
    for seed in preset.seeds:  # seed-major: a partial run still has complete pairs
        for task in args.tasks:
            for method in args.methods:
                if (task, method, seed) in done:
                    continue
                overrides = (
                    {"mode": "kd", "lambda_kd": float(method[3:])} if method.startswith("kd@") else METHODS[method]
                )
                jobs.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "overrides": overrides,
                        "preset": preset,
                        "device": args.device,
                        "threads": 1,
                        "cache_dir": args.cache_dir,
                        "eval_images": args.eval_images,
                    }
                )
    bar = progress(desc="study", total=len(jobs), quiet=args.quiet)

    def finished(row: dict[str, Any]) -> None:
        rows.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{row['task']} {row['method']} s{row['seed']}")
        # Rewritten after every student: an interrupted study keeps what it measured.
        write_report(args, argv, spec, preset, device, teachers, rows, time.perf_counter() - wall0, complete=False)

    if args.workers == 1:
        for job in jobs:
            finished(run_job(job))
    else:
        with worker_pool(worker_devices(args.device, args.workers)) as pool:
            for row in pool.map(run_job, jobs):
                finished(row)
    bar.close()
    wall = time.perf_counter() - wall0
    summary = write_report(args, argv, spec, preset, device, teachers, rows, wall, complete=True)
    print(format_table(summary))
    print(
        "\n(PSNR: mean over held-out photos; cost = training ms/step relative to kd@1, CPU time per worker "
        f"on a CPU; wall {wall:.0f}s)"
    )
    save_plot(args.out / "study.png", summary)
    print(f"wrote study.json, study.png in {args.out}")
    return 0


RUN_NUMBERS = ("psnr", "ssim", "ms_per_step")


def _run_problem(run: Any) -> Optional[str]:
    """None if ``run`` is a student's row of ``study.json`` this version can summarise, else what is wrong."""
    if not isinstance(run, dict):
        return f"is a JSON {type(run).__name__}, not an object"
    missing = [k for k in ("task", "method", "seed") + RUN_NUMBERS if k not in run]
    if missing:
        return f"has no {', '.join(missing)}"
    if run["task"] not in TASKS:
        return f"has the unknown task {run['task']!r}"
    method = run["method"]
    if not isinstance(method, str) or not (method in METHODS or _is_kd_name(method)):
        return f"has the unknown method {method!r} (this version knows kd@L, {', '.join(METHODS)})"
    if isinstance(run["seed"], bool) or not isinstance(run["seed"], int):
        return f"has the seed {run['seed']!r}, not an integer"
    bad = [k for k in RUN_NUMBERS if isinstance(run[k], bool) or not isinstance(run[k], (int, float))]
    return f"has a {bad[0]} that is not a number" if bad else None


def _is_kd_name(method: str) -> bool:
    """Whether ``method`` is ``kd@L`` with ``L`` a finite number > 0."""
    if not method.startswith("kd@"):
        return False
    try:
        positive_float(method[3:])
    except argparse.ArgumentTypeError:
        return False
    return True


def load_previous_runs(path: Path, preset, eval_images: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The runs of an earlier ``study.json`` made with the same budget and ``--eval-images`` photos
    (``eval_images``: :func:`eval_photos`) (``--resume``); [] if none.

    Raises ValueError, one line naming the file, what is wrong and what to do, for a file that is not a
    study's report (unreadable, truncated, not a JSON object, a run this version cannot use) or one made
    with other settings.
    """
    if not path.is_file():
        return []
    fix = "fix or remove it, or choose another --out"
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as a study's report ({error_summary(exc)}); {fix}") from None
    if not isinstance(old, dict) or not isinstance(old.get("runs"), list):
        raise ValueError(f"{path} is not a study's report (no 'runs' list in a JSON object); {fix}")
    settings = old.get("preset")
    if not isinstance(settings, dict) or settings.get("demo") != json.loads(json.dumps(dataclasses.asdict(preset))):
        raise ValueError(f"{path} was made with other settings (steps, seeds, network); use another --out")
    if old.get("eval_images") != eval_images:
        other = old.get("eval_images")
        raise ValueError(f"{path} was scored on other --eval-images photos ({other}); use another --out")
    for i, run in enumerate(old["runs"]):
        why = _run_problem(run)
        if why:
            raise ValueError(f"{path}: run {i} {why}; {fix}")
    return [r for r in old["runs"] if r["seed"] in preset.seeds]


def write_report(args, argv, spec, preset, device, teachers, rows, wall, complete: bool) -> dict[str, Any]:
    """Write ``study.json`` (summary over the seeds every method has finished, and every run); returns the summary."""
    summary = summarise(rows, args.tasks, args.methods)
    report = {
        "spark_ext": __import__("spark_ext").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device)
        + (
            f" ({os.cpu_count()} cores, {args.workers} workers x 1 thread)"
            if device.type == "cpu"
            else f" ({args.workers} workers: {', '.join(worker_devices(args.device, args.workers))})"
        ),
        "command": "spark-ext study " + " ".join(sys.argv[2:] if argv is None else argv),
        "preset": {"study": dataclasses.asdict(spec), "demo": dataclasses.asdict(preset)},
        "teachers": teachers,
        "eval_images": eval_photos(args),
        "methods": args.methods,
        "tasks": summary,
        "runs": rows,
        "complete": complete,
        "wall_seconds": wall,
    }
    write_json(args.out / "study.json", report)
    return summary


if __name__ == "__main__":
    sys.exit(main())
