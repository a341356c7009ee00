"""Knowledge distillation from a frozen teacher into any LightningModule (see README.md)."""

from lightning_slim.distillation.callback import KnowledgeDistillation
from lightning_slim.distillation.configs import (
    DistillationConfig,
    DistillationSchedule,
    FeatureDistillation,
    LogitsSource,
    TeacherCacheConfig,
    TokenMask,
)
from lightning_slim.distillation.functional import agreement, feature_loss, soft_target_loss

__all__ = [
    "DistillationConfig",
    "DistillationSchedule",
    "FeatureDistillation",
    "KnowledgeDistillation",
    "LogitsSource",
    "TeacherCacheConfig",
    "TokenMask",
    "agreement",
    "feature_loss",
    "soft_target_loss",
]
