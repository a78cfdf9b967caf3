"""The KD methods SPARK is compared with (each also usable on its own).

* :mod:`~spark_ext.distill.baselines.logit_kd` — logit KD for classifiers (:class:`LogitDistiller`), with the
  GoR/LMR balancers and teacher ensembles;
* :mod:`~spark_ext.distill.baselines.dfd` — decoder-free feature distillation at a named layer (docs/spec.md §6);
* :mod:`~spark_ext.distill.baselines.diffkd` — DiffKD: the student's features denoised by a small diffusion model;
* :mod:`~spark_ext.distill.baselines.daqakd` — DA-QAKD's ranking of data augmentations.

Their public names are re-exported by :mod:`spark_ext.distill`. Nothing is imported here, so the
distiller can import DFD and DiffKD without a cycle through logit KD (which builds on the distiller).
"""
