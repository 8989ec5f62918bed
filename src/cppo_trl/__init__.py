"""CPPO: Contrastive Perception Policy Optimization for Hugging Face TRL."""

from .config import CPPOConfig
from .images import PixelBudget, to_rgb
from .perception import contrastive_perception_loss, select_perception_tokens
from .perturbations import PerturbationParams, make_views
from .trainer import CPPOTrainer


__all__ = [
    "CPPOConfig",
    "CPPOTrainer",
    "PerturbationParams",
    "PixelBudget",
    "contrastive_perception_loss",
    "make_views",
    "select_perception_tokens",
    "to_rgb",
]
__version__ = "0.1.0"
