"""SPARK's training system, and the KD methods it is compared with.

SPARK's core, one module each:

* :class:`SparkDistiller` / :class:`DistillConfig` (``trainer``) — a training step for QAT,
  uniform KD and SPARK students, usable inside any training loop;
* :class:`SparkPolicy` (``policy``) — the per-cell Beta policy (docs/spec.md §4);
* ``credit`` — the held-out credit the default policy learns from;
* :class:`ReinforceUpdater` (``reinforce``) — the REINFORCE alternative with an EMA baseline;
* :func:`make_balancer`, :class:`GoRBalancer`, :class:`LMRBalancer` (``balancers``) — docs/spec.md §6;
* ``losses`` (reconstruction losses), ``distributed`` (DDP synchronisation);
* ``spark_ext.distill.lightning.SparkLightningModule`` — SPARK in PyTorch Lightning (the
  ``[lightning]`` extra; not imported here).

The compared methods live in :mod:`spark_ext.distill.baselines` (re-exported here): logit KD for
classifiers (:class:`LogitDistiller`), DFD (:class:`DecoderFreeDistillation`), :class:`DiffKD` and
DA-QAKD's augmentation ranking (:func:`score_augmentations`).

See ``docs/spark.md`` for the choices made where the spec is silent and for
how the policy and balancer stay in sync under DDP.
"""

from .balancers import BALANCERS, Balancer, GoRBalancer, LMRBalancer, NoBalancer, make_balancer
from .baselines.daqakd import AUGMENTATIONS, AugmentationScore, cmi_and_fit, get_augmentation, score_augmentations
from .baselines.dfd import DecoderFreeDistillation, FeatureTap, find_module
from .baselines.diffkd import DiffKD
from .baselines.logit_kd import LOGIT_MODES, LogitDistillConfig, LogitDistiller, accuracy, logit_kd_loss
from .losses import REC_LOSSES, per_image_loss
from .policy import PolicySample, SparkPolicy, standardize_features
from .reinforce import ReinforceUpdater, normalize_advantage, reinforce_loss
from .trainer import MODES, DistillConfig, SparkDistiller

__all__ = [
    "BALANCERS",
    "MODES",
    "REC_LOSSES",
    "Balancer",
    "DecoderFreeDistillation",
    "DiffKD",
    "AUGMENTATIONS",
    "AugmentationScore",
    "cmi_and_fit",
    "get_augmentation",
    "score_augmentations",
    "LOGIT_MODES",
    "LogitDistillConfig",
    "LogitDistiller",
    "accuracy",
    "logit_kd_loss",
    "DistillConfig",
    "FeatureTap",
    "GoRBalancer",
    "LMRBalancer",
    "NoBalancer",
    "PolicySample",
    "ReinforceUpdater",
    "SparkDistiller",
    "SparkPolicy",
    "find_module",
    "make_balancer",
    "normalize_advantage",
    "per_image_loss",
    "reinforce_loss",
    "standardize_features",
]
