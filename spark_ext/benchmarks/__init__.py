"""spark_ext's benchmarks, installed with the package (docs/spec.md §8): ``spark-ext bench`` runs them.

Each ``bench_<name>`` module times our op against its peers and saves one JSON (the row schema of
:mod:`~spark_ext.benchmarks.common`); an op's kernel, reference, test and benchmark share its name.
Every one runs as ``python -m spark_ext.benchmarks.bench_<name> [--quick | --headline] [--out DIR]``
(default ``--out``: ``./spark-ext-bench``):

* ``bench_difficulty``        ``difficulty_signals``: the SPARK path, fwd / bwd / fwd+bwd
* ``bench_weighted_kd``       ``fused_weighted_kd``
* ``bench_lsq``               ``lsq_fake_quant`` vs torch's learnable fake quant
* ``bench_fake_quant``        the drop-ins for ``torch._fake_quantize_learnable_per_*_affine`` (§5a)
* ``bench_call_overhead``     per-call time of every op and quantizer module on tiny tensors
* ``bench_threads``           CPU thread scaling of the C++ kernels (``make bench-cpu``)
* ``bench_e2e``               one W4A4 SPARK QAT step: our ops vs the eager and compiled reference
* ``bench_qat_step``          a torch.ao QAT step of ResNet-18 / MobileNetV2, our vs torch's fake quant
* ``bench_distill_variants``  the demo's SPARK step vs uniform KD and plain QAT

And their support, not run by ``spark-ext bench``:

* ``common``            the harness: timing percentiles, copy bandwidth, the row schema, JSON
* ``report``            reading results: checks, tables, plots (``spark-ext bench --from``)
* ``qat_models``        ResNet-18 / MobileNetV2 as torchvision's quantizable models, without torchvision
* ``ab_huge_pages``     A/B of the CPU kernels' huge-page output cache (text report, no JSON)
* ``sanitize_kernels``  one short run of every GPU kernel for ``compute-sanitizer``
* ``gpu_check``         ``make gpu-check``: build, tests, benchmarks and memcheck in one budget

Committed results, the latest per benchmark and device: ``docs/benchmarks/``.
"""
