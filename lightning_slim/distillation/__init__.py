"""Knowledge distillation from a frozen teacher into any LightningModule (see README.md)."""

from lightning_slim.distillation.callback import KnowledgeDistillation
from lightning_slim.distillation.configs import (
    DistillationSchedule,
    FeatureDistillation,
    LogitsSource,
    TeacherCacheConfig,
)
from lightning_slim.distillation.functional import agreement, feature_loss, soft_target_loss

__all__ = [
    "DistillationSchedule",
    "FeatureDistillation",
    "KnowledgeDistillation",
    "LogitsSource",
    "TeacherCacheConfig",
    "agreement",
    "feature_loss",
    "soft_target_loss",
]
