"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., 2024)."""

from fedrec.models.hstu.model import HSTU, HSTUConfig, HSTULayer, RelativeBucketedBias

__all__ = ["HSTU", "HSTUConfig", "HSTULayer", "RelativeBucketedBias"]
