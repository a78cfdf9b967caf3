"""One torch.ao QAT training step of ResNet-18 and MobileNetV2: our LearnableFakeQuantize vs torch's.

Each model (torchvision's quantizable one when torchvision imports, else the
same model from spark_ext.benchmarks.qat_models; the case says which) is fused
(``fuse_model(is_qat=True)``) and prepared with ``torch.ao.quantization.prepare_qat``
under a QConfig whose fake quants are either ``spark_ext.quant.LearnableFakeQuantize``
(``impl: "ours"``) or ``torch.ao.quantization._LearnableFakeQuantize``
(``"torch"``): quint8 activations per tensor, qint8 weights per channel
(symmetric), both with LSQ gradient scaling. The per-channel scales are sized
to each layer after ``prepare_qat`` (torch's module cannot size itself). One
observed forward sets the scales, then ``enable_param_learning`` (observers
off, scales and zero points learn), as a learnable-QAT run trains.

A step: forward, cross-entropy on random labels, ``backward``, SGD (momentum
0.9) step, ``zero_grad``. Both models of a case are built from the same seed
and timed interleaved (ours, torch, ours, ...: one step per sample, wall
time; on CUDA synchronised before and after), after 3 warm-up steps each.
Reported per case: p50 (``ms``), p20 / p80, p90 and max of the samples, and
the ratio ours / torch at the median (a row with ``impl: "ratio"``; < 1:
ours is faster).

Cases: CPU batch 1 and 8 at 64 px, at 1 and 2 threads; CUDA batch 32 at 224 px.

    python -m spark_ext.benchmarks.bench_qat_step                       # CPU: 2 models x 2 batches x 2 thread counts
    python -m spark_ext.benchmarks.bench_qat_step --quick               # batch 1 at 64 px, 1 thread, 3 samples
    python -m spark_ext.benchmarks.bench_qat_step --device cuda --models resnet18   # the GPU check's case
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from spark_ext.benchmarks import common, qat_models
from spark_ext.quant import LearnableFakeQuantize, qat_qconfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.quantization as tq
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

FAKE_QUANTS = {"ours": LearnableFakeQuantize, "torch": _LearnableFakeQuantize}
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def size_weight_qparams(model: nn.Module) -> int:
    """Give every per-channel weight fake quant one scale / zero point per output channel; returns how many.

    A QConfig shared by layers of different widths cannot give torch's module its ``channel_len``; this
    does it per layer after ``prepare_qat`` (ours would size itself on the first batch; done for both, so
    both start from the same parameters)."""
    sized = 0
    for module in model.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is not None and fq.qscheme in _PER_CHANNEL:
            channels = module.weight.shape[fq.ch_axis]
            fq.scale.data = torch.ones(channels, device=fq.scale.device)
            fq.zero_point.data = torch.zeros(channels, device=fq.zero_point.device)
            sized += 1
    return sized


def enable_param_learning(module: nn.Module) -> None:
    if isinstance(module, (LearnableFakeQuantize, _LearnableFakeQuantize)):
        module.enable_param_learning()


def build(name: str, impl: str, source: str, batch: int, px: int, device: torch.device):
    """``(step, model source, fake quant count)``: a prepared model's training step on a fixed batch."""
    torch.manual_seed(0)
    model, where = qat_models.build(name, source)
    model.train()
    model.fuse_model(is_qat=True)
    # quint8 per-tensor activations, qint8 symmetric per-channel weights, LSQ grad scaling.
    model.qconfig = qat_qconfig(fake_quant=FAKE_QUANTS[impl])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    size_weight_qparams(model)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, px, px, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    with torch.no_grad():
        model(x)  # the observers set the first scales
    model.apply(enable_param_learning)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    n_fq = sum(isinstance(m, FAKE_QUANTS[impl]) for m in model.modules())

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, where, n_fq


def spread(samples: list[float]) -> dict:
    out = common.percentiles(samples)
    out["ms_p90"] = statistics.quantiles(samples, n=10, method="inclusive")[8] if len(samples) > 1 else samples[0]
    out["ms_max"] = max(samples)
    return out


def time_case(steps: dict, device: torch.device, samples: int) -> dict:
    """impl -> per-step ms samples, interleaved, after 3 warm-up steps each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(3):
            step()
    times = {impl: [] for impl in steps}
    order = list(steps)
    for r in range(samples):
        for impl in order[r % 2 :] + order[: r % 2]:  # alternate which goes first
            sync()
            t0 = time.perf_counter()
            steps[impl]()
            sync()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    return times


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"argument --{name}: expected comma-separated positive integers, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="comma list of resnet18, mobilenet_v2")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes (CPU 1,8; CUDA 32)")
    parser.add_argument("--px", type=int, default=None, help="image side (CPU 64; CUDA 224)")
    parser.add_argument("--threads", default=None, help="comma list of CPU thread counts (default 1,2; CUDA 1)")
    parser.add_argument("--source", default="auto", choices=("auto", "torchvision", "bench"), help="model code")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in qat_models.MODELS]
    if not models or unknown:
        parser.error(f"argument --models: choose from {', '.join(qat_models.MODELS)}, got {args.models!r}")
    cuda = device.type == "cuda"
    try:
        batches = int_list(args.batch or ("32" if cuda else "1" if args.quick else "1,8"), "batch")
        thread_counts = int_list(args.threads or ("1" if cuda or args.quick else "1,2"), "threads")
    except ValueError as exc:
        parser.error(str(exc))
    px = args.px or (224 if cuda else 64)
    if px < 64:  # batch norm in training needs > 1 value per channel at the last stage (px / 32 wide)
        parser.error(f"argument --px: the models need at least 64 px, got {px}")
    samples = common.default_reps(args, quick=3, headline=8, full=10)

    load_before = os.getloadavg()[0]  # a shared machine: the timings are only as clean as it was idle
    rows = []
    all_threads = torch.get_num_threads()
    try:
        for name in models:
            for batch in batches:
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    steps, where = {}, None
                    for impl in FAKE_QUANTS:
                        steps[impl], where, n_fq = build(name, impl, args.source, batch, px, device)
                    case = f"{name} b{batch} {px}px t{threads} W8A8 ({n_fq} fake quants, {where})"
                    times = time_case(steps, device, samples)
                    for impl, ms in times.items():
                        rows.append(
                            {
                                "op": "qat_step",
                                "case": case,
                                "pass": "step",
                                "impl": impl,
                                **spread(ms),
                                "samples": len(ms),
                                "threads": threads,
                                "bytes": None,
                                "gbps": None,
                                "copy_fraction": None,
                                "peak_extra_bytes": None,
                            }
                        )
                    ours, theirs = (next(r["ms"] for r in rows[-2:] if r["impl"] == i) for i in ("ours", "torch"))
                    rows.append(
                        {
                            "op": "qat_step_ours_over_torch",
                            "case": case,
                            "pass": "step",
                            "impl": "ratio",
                            "ms": ours / theirs,
                        }
                    )
                    print(
                        f"{case:70s} ours {ours:8.1f} ms  torch {theirs:8.1f} ms  ours/torch {ours / theirs:.2f}",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(all_threads)

    print(
        "\n| model | batch | px | threads | ours p50 ms | ours p90 | ours max | torch p50 ms | torch p90 | torch max "
        "| ours/torch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ratio in (r for r in rows if r["impl"] == "ratio"):
        ours, theirs = (
            next(r for r in rows if r["case"] == ratio["case"] and r["impl"] == i) for i in ("ours", "torch")
        )
        name, batch, size, threads = ratio["case"].split()[:4]
        cells = [f"{r[k]:.1f}" for r in (ours, theirs) for k in ("ms", "ms_p90", "ms_max")]
        print(
            f"| {name} | {batch[1:]} | {size[:-2]} | {threads[1:]} | " + " | ".join(cells) + f" | {ratio['ms']:.2f} |"
        )
    config = {"models": models, "batch": batches, "px": px, "threads": thread_counts, "samples": samples}
    config["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(common.save_results("qat_step", device, rows, args.out, config=config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
