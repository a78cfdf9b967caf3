"""``spark-ext demo``: W4A4 students of a restoration network on real photos.

What it does, for ``--task denoise`` (AWGN sigma 25/255) or ``--task sr``
(bicubic x2), on scikit-image's bundled photos (no download):

1. loads the FP32 teacher shipped with the package for the ``default``
   preset (:func:`spark_ext.models.load_pretrained_teacher`, hash-checked;
   ``docs/teachers.md``), or, with ``--retrain-teacher`` / ``--teacher-steps``
   and for the other presets, trains one (cached in
   ``~/.cache/spark_ext/teachers/<hash>.pt``; the hash covers everything that
   determines the weights);
2. quantizes a copy to W4A4 (first and last layer W8A8) and calibrates it on
   training crops (PTQ, MSE search) — the **PTQ** row, and the common starting
   point of every trained student;
3. trains, with identical data order, steps, learning rates and seeds,
   **QAT** (L1 only), **KD** (L1 + uniform KD from the FP32 teacher),
   **SPARK** (L1 + policy-weighted KD), **GoR** and **LMR** (L1 + KD combined
   by those balancers); optionally **DFD** (feature KD at the bottleneck);
4. evaluates PSNR / SSIM as papers do (:mod:`spark_ext.metrics`: outputs
   rounded to 8-bit levels; denoising on RGB; SR on the BT.601 Y channel with a
   ``scale``-pixel border cropped; SSIM with an 11x11 Gaussian window) on the
   held-out photos (and, with ``--eval-images DIR``, on every PNG/JPEG photo
   in DIR), prints the table (with the degraded input and the FP32
   teacher), writes ``results.json``, ``crops.png`` (a row of crops per
   method), ``spark_weight_map.png`` (the SPARK policy's weight map over a
   held-out photo) and ``curves.png`` (training losses).

Presets: ``smoke`` (seconds, for tests), ``default`` (a few minutes on a
2-core CPU), ``full`` (GPU: larger network and crops, more steps, three seeds
reported as mean ± std). The teacher is fixed across seeds; a seed sets the
calibration crops, the training data order and the SPARK policy.

Modules, one per purpose: :mod:`~spark_ext.demo.presets` (budgets, methods, labels),
:mod:`~spark_ext.demo.teacher` (the FP32 teacher: shipped, trained or cached),
:mod:`~spark_ext.demo.training` (PTQ start, student training, optimiser and schedule),
:mod:`~spark_ext.demo.scoring` (PSNR / SSIM of a model's outputs),
:mod:`~spark_ext.demo.compare` (every method per seed from one teacher),
:mod:`~spark_ext.demo.figures` (the three PNGs), :mod:`~spark_ext.demo.report` (table, results.json)
and :mod:`~spark_ext.demo.digits` (the digit classifiers of ``spark-ext classify`` and ``daqakd``).
The ``spark-ext demo`` command itself is :mod:`spark_ext.commands.demo`.
"""
