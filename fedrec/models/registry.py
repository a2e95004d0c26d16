"""Models registered by name, so configs and later issues add models without an if/elif."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fedrec.models.base import SequentialModelConfig, SequentialRecommender

_MODELS: dict[str, type[SequentialRecommender]] = {}
M = TypeVar("M", bound=type[SequentialRecommender])


def register_model(name: str) -> Callable[[M], M]:
    def decorate(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = cls
        return cls

    return decorate


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_class(name: str) -> type[SequentialRecommender]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {model_names()}")
    return _MODELS[name]


def model_config(name: str, params: dict[str, Any] | None = None) -> SequentialModelConfig:
    """Build (and so validate) the config dataclass of model ``name`` from plain values."""
    cls = model_class(name).config_class
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(params or {}) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; known: {sorted(known)}")
    return cls(**(params or {}))


def build_model(name: str, num_items: int, config: SequentialModelConfig) -> SequentialRecommender:
    cls = model_class(name)
    if not isinstance(config, cls.config_class):
        raise TypeError(
            f"model {name!r} needs a {cls.config_class.__name__}, got {type(config).__name__}"
        )
    return cls(config, num_items)
