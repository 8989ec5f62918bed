"""`PerceptionGRPOConfig`: the GRPO defaults CPPO and PAPO share, so that switching method changes nothing else."""

from dataclasses import dataclass, field

from trl import GRPOConfig


# What a view replaces: every image the policy saw, or only its prompt's (docs/agents.md).
VIEW_IMAGE_SCOPES = ("all", "prompt")


@dataclass
class PerceptionGRPOConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] with the defaults of the CPPO paper (Table 8) and of the PAPO authors' scripts, which agree;
    TRL's are β 0.0, G 8 and 8 rollouts per device.

    Parameters:
        beta (`float`, defaults to `0.01`): KL coefficient to the reference policy, on the original image only.
        num_generations (`int`, defaults to `5`): rollouts per prompt (G).
        per_device_train_batch_size (`int`, defaults to `10`): two groups of G = 5.

        > What a view replaces

        view_images (`str`, defaults to `"all"`): `"all"`, every image the policy saw (the prompt's, an environment's
            observation, the images tools returned), or `"prompt"`, only the prompt's (tool images stay as returned).
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
    view_images: str = field(
        default="all",
        metadata={
            "help": "Which images a perception view replaces: 'all' (every image the policy saw: the prompt's, an "
            "environment's first observation and the images tools returned, since the loss is about the visual "
            "input) or 'prompt' (only the prompt's images, dataset and observation; tool images stay as the tool "
            "returned them). CPPO's views and PAPO's mask follow it.",
            "choices": list(VIEW_IMAGE_SCOPES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.view_images not in VIEW_IMAGE_SCOPES:
            raise ValueError(f"view_images must be one of {VIEW_IMAGE_SCOPES}, got {self.view_images!r}")
