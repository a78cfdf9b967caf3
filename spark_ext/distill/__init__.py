"""SPARK training system: policy, REINFORCE, balancers, DFD and the distiller.

* :class:`SparkDistiller` / :class:`DistillConfig` — a training step for QAT,
  uniform KD and SPARK students, usable inside any training loop;
* :class:`SparkPolicy` — the per-cell Beta policy (docs/spec.md §4);
* :class:`ReinforceUpdater` — its REINFORCE update with an EMA baseline;
* :func:`make_balancer`, :class:`GoRBalancer`, :class:`LMRBalancer` — docs/spec.md §6;
* :class:`DecoderFreeDistillation` — feature KD at a named bottleneck (docs/spec.md §6);
* ``spark_ext.distill.lightning.SparkLightningModule`` — SPARK in PyTorch Lightning (the
  ``[lightning]`` extra; not imported here).

See ``docs/spark.md`` for the choices made where the spec is silent and for
how the policy and balancer stay in sync under DDP.
"""

from .balancers import BALANCERS, Balancer, GoRBalancer, LMRBalancer, NoBalancer, make_balancer
from .daqakd import AUGMENTATIONS, AugmentationScore, cmi_and_fit, get_augmentation, score_augmentations
from .dfd import DecoderFreeDistillation, FeatureTap, find_module
from .diffkd import DiffKD
from .logit_kd import LOGIT_MODES, LogitDistillConfig, LogitDistiller, accuracy, logit_kd_loss
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
