"""CPPO (Contrastive Perception Policy Optimization) and PAPO (Perception-Aware Policy Optimization) for Hugging Face
TRL, on one set of rails."""

from importlib import import_module
from typing import TYPE_CHECKING


# Public names are imported on first use (PEP 562), so `python -m cppo_trl.visualize --help` or the data tools do not
# pay for importing TRL's trainer; `from cppo_trl import CPPOTrainer` works as before.
_EXPORTS = {
    "CPPOConfig": ".config",
    "CPPOTrainer": ".trainer",
    "PAPOConfig": ".papo_config",
    "PAPOTrainer": ".papo",
    "PerturbationParams": ".perturbations",
    "PixelBudget": ".images",
    "contrastive_perception_loss": ".perception",
    "make_views": ".perturbations",
    "papo_token_terms": ".perception",
    "select_perception_tokens": ".perception",
    "to_rgb": ".images",
}

if TYPE_CHECKING:
    from .config import CPPOConfig
    from .images import PixelBudget, to_rgb
    from .papo import PAPOTrainer
    from .papo_config import PAPOConfig
    from .perception import contrastive_perception_loss, papo_token_terms, select_perception_tokens
    from .perturbations import PerturbationParams, make_views
    from .trainer import CPPOTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
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
