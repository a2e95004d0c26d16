"""Model families, one package each, registered by name on import."""

from fedrec.models import hstu, sasrec  # noqa: F401  (registers the models)
from fedrec.models.base import SequentialModelConfig, SequentialRecommender
from fedrec.models.registry import (
    build_model,
    model_class,
    model_config,
    model_names,
    register_model,
)

__all__ = [
    "SequentialModelConfig",
    "SequentialRecommender",
    "build_model",
    "model_class",
    "model_config",
    "model_names",
    "register_model",
]
