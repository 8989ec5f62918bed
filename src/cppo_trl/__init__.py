"""CPPO (Contrastive Perception Policy Optimization) and PAPO (Perception-Aware Policy Optimization) for Hugging Face
TRL, on one set of rails."""

from importlib import import_module
from typing import TYPE_CHECKING


# Public names are imported on first use (PEP 562), so `cppo-visualize --help` or the data tools do not pay for importing
# TRL's trainer; `from cppo_trl import CPPOTrainer` imports it.
_EXPORTS = {
    "CPPOConfig": "cppo_trl.trainer.cppo_config",
    "CPPOTrainer": "cppo_trl.trainer.cppo_trainer",
    "PAPOConfig": "cppo_trl.trainer.papo_config",
    "PAPOTrainer": "cppo_trl.trainer.papo_trainer",
    "PerturbationParams": "cppo_trl.core.perturbations",
    "PixelBudget": "cppo_trl.core.images",
    "contrastive_perception_loss": "cppo_trl.core.perception",
    "make_views": "cppo_trl.core.perturbations",
    "papo_token_terms": "cppo_trl.core.perception",
    "select_perception_tokens": "cppo_trl.core.perception",
    "to_rgb": "cppo_trl.core.images",
}

if TYPE_CHECKING:
    from cppo_trl.core.images import PixelBudget, to_rgb
    from cppo_trl.core.perception import contrastive_perception_loss, papo_token_terms, select_perception_tokens
    from cppo_trl.core.perturbations import PerturbationParams, make_views
    from cppo_trl.trainer.cppo_config import CPPOConfig
    from cppo_trl.trainer.cppo_trainer import CPPOTrainer
    from cppo_trl.trainer.papo_config import PAPOConfig
    from cppo_trl.trainer.papo_trainer import PAPOTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
