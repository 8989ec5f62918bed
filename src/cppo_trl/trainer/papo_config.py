"""`PAPOConfig`: GRPO's configuration plus the fields of PAPO's implicit perception loss and entropy term."""

import math
from dataclasses import dataclass, field

from cppo_trl.core.perception import POLICY_LOSS_TYPES
from cppo_trl.trainer.perception_grpo_config import PerceptionGRPOConfig


@dataclass
class PAPOConfig(PerceptionGRPOConfig):
    r"""
    Configuration for [`PAPOTrainer`]: every [`~trl.GRPOConfig`] field plus those below.

    Defaults follow the PAPO authors' released PAPO-G configuration (`examples/configs/config_grpo_papo.yaml` and
    `examples/papo_grpo/qwen2_5_vl_3b_grpo_papo.sh`; docs/papo.md). Field names follow TRL's removed experimental
    `PAPOConfig` where the meaning carries over (`perception_loss_weight`, `mask_ratio`, `der_loss_weight1`), so a
    config written for it keeps working; its `der_loss_weight2` and `mask_type` are gone (see the README).

    Parameters:
        > Implicit perception loss and entropy term (added to the policy loss, over all completion tokens)

        perception_loss_weight (`float`, defaults to `0.02`): γ, weight of the KL between the policy with the original
            image and the pre-update policy with the masked image, which the loss *maximises* (subtracts). `0` skips
            the masked pass entirely.
        der_loss_weight1 (`float`, defaults to `0.0`): η, weight of the policy's sampled-token negative log-prob on
            the original image (the authors' `ori_entropy_loss`, an entropy penalty). Authors: off for PAPO-G 3B, 0.05
            for 7B, 0.03 for PAPO-D. γ = η = 0 is exactly GRPO.

        > The masked image (the authors' `random_patch_blackening`)

        mask_ratio (`float`, defaults to `0.6`): probability that each cell is blackened.
        mask_patch_size (`int`, defaults to `14`): side of a cell in pixels of the raw image.

        > GRPO defaults changed to the authors' (and CPPOConfig's, so the two methods differ by the method only)

        beta (`float`, defaults to `0.01`), num_generations (`int`, defaults to `5`), per_device_train_batch_size
        (`int`, defaults to `10`, two groups of 5).
    """

    perception_loss_weight: float = field(
        default=0.02,
        metadata={
            "help": "γ: weight of the implicit perception loss, the k3 KL between the policy with the original image "
            "and the pre-update policy with the masked image, which PAPO maximises (it is subtracted). Authors: 0.02 "
            "(PAPO-G 3B and 7B), 0.01 (PAPO-D). 0 skips the masked pass."
        },
    )
    der_loss_weight1: float = field(
        default=0.0,
        metadata={
            "help": "η: weight of the policy's sampled-token negative log-prob on the original image (the authors' "
            "ori_entropy_loss, a penalty on entropy). Authors: off (PAPO-G 3B), 0.05 (PAPO-G 7B), 0.03 (PAPO-D). "
            "Their second entropy term, on the masked image, is computed without gradient (a constant, their issue "
            "#20): it is logged as papo/masked_logp, not added."
        },
    )
    mask_ratio: float = field(
        default=0.6,
        metadata={"help": "Probability that each cell of the raw image is blackened (authors' black_prob: 0.6)."},
    )
    mask_patch_size: int = field(
        default=14,
        metadata={"help": "Side in pixels of a masking cell, on the raw image before resizing (authors: 14)."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("perception_loss_weight", "der_loss_weight1"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not (isinstance(self.mask_ratio, int | float) and 0.0 <= self.mask_ratio <= 1.0):
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio!r}.")
        if not (isinstance(self.mask_patch_size, int) and self.mask_patch_size >= 1):
            raise ValueError(f"mask_patch_size must be an integer >= 1, got {self.mask_patch_size!r}.")
        if self.papo_enabled and self.loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not supported by PAPO; use one of {POLICY_LOSS_TYPES}.")

    @property
    def papo_enabled(self) -> bool:
        """False when γ = η = 0: the trainer is then GRPO exactly (no masked pass, no extra term)."""
        return self.perception_loss_weight > 0 or self.der_loss_weight1 > 0
