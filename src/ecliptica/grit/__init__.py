"""GRIT: curvature-aware LoRA optimizer (K-FAC rank-space preconditioning,
Fisher-guided reprojection, dynamic rank). See docs/grit.md."""

from .config import GritConfig
from .layers import find_lora_layers, parameter_counts
from .optimizer import GritOptimizer

__all__ = ["GritConfig", "GritOptimizer", "find_lora_layers", "parameter_counts"]
