"""`PerceptionGRPOConfig`: the GRPO defaults CPPO and PAPO share, so that switching method changes nothing else."""

from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class PerceptionGRPOConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] with the defaults of the CPPO paper (Table 8) and of the PAPO authors' scripts, which agree;
    TRL's are β 0.0, G 8 and 8 rollouts per device.

    Parameters:
        beta (`float`, defaults to `0.01`): KL coefficient to the reference policy, on the original image only.
        num_generations (`int`, defaults to `5`): rollouts per prompt (G).
        per_device_train_batch_size (`int`, defaults to `10`): two groups of G = 5.
    """

    beta: float = field(
        default=0.01,
        metadata={
            "help": "KL coefficient to the reference policy, on the original image only. CPPO paper and PAPO "
            "authors: 0.01."
        },
    )
    num_generations: int | None = field(
        default=5, metadata={"help": "Rollouts per prompt (G). CPPO paper and released code, PAPO authors: 5."}
    )
    per_device_train_batch_size: int = field(
        default=10,
        metadata={
            "help": "Rollouts per device and micro-batch. TRL counts completions, not prompts: the default holds two "
            "groups of G = 5 (TRL's default of 8 is not divisible by 5)."
        },
    )
