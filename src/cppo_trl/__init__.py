"""CPPO (Contrastive Perception Policy Optimization) and PAPO (Perception-Aware Policy Optimization) for Hugging Face
TRL, on one set of rails."""

from .config import CPPOConfig
from .images import PixelBudget, to_rgb
from .papo import PAPOTrainer
from .papo_config import PAPOConfig
from .perception import contrastive_perception_loss, papo_token_terms, select_perception_tokens
from .perturbations import PerturbationParams, make_views
from .trainer import CPPOTrainer


__all__ = [
    "CPPOConfig",
    "CPPOTrainer",
    "PAPOConfig",
    "PAPOTrainer",
    "PerturbationParams",
    "PixelBudget",
    "contrastive_perception_loss",
    "make_views",
    "papo_token_terms",
    "select_perception_tokens",
    "to_rgb",
]
__version__ = "0.1.0"
