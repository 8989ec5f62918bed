"""`CPPOScriptArguments`: the script section of a training recipe (data, rewards, processor limits), shared by
the training script, `cppo-eval` (which reads a training recipe to prompt and resize like training) and the demo."""

from dataclasses import dataclass, field

from trl import ScriptArguments

from cppo_trl.data.loaders import PROMPT_LAYOUTS
from cppo_trl.data.zoom_tool import ENVIRONMENTS


@dataclass
class CPPOScriptArguments(ScriptArguments):
    """TRL's script arguments plus what CPPO recipes need: dataset routing, reward names, processor limits.

    `dataset_name` routes to a loader of `cppo_trl.data`: `"synthetic"` (offline generator), `"TIGER-Lab/ViRL39K"` or
    a local ViRL39K folder, `"hiyouga/geometry3k"` or a local parquet with Geometry3K columns, else a local
    jsonl/parquet with `prompt`/`images`/`solution`.
    """

    dataset_name: str | None = field(
        default="synthetic",
        metadata={
            "help": "'synthetic', 'TIGER-Lab/ViRL39K' (or its local folder), 'hiyouga/geometry3k' (or a local "
            "parquet of it), or a local jsonl/parquet file already in prompt/images/solution form."
        },
    )
    synthetic_num_train: int = field(default=64, metadata={"help": "Rows of the synthetic train split."})
    synthetic_num_test: int = field(default=16, metadata={"help": "Rows of the synthetic test split."})
    synthetic_tasks: list[str] = field(
        default_factory=lambda: ["color", "count", "position", "digit"],
        metadata={"help": "Tasks of the synthetic dataset (cppo_trl.data.SYNTHETIC_TASKS)."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={
            "help": "Reward registry names (cppo_trl.data.rewards.REWARD_FUNCS); weights are CPPOConfig.reward_weights."
        },
    )
    prompt_suffix: str | None = field(
        default=None, metadata={"help": "Instruction appended to every question; None keeps the loader's default."}
    )
    tiny_model_family: str = field(
        default="qwen2_5_vl",
        metadata={
            "help": "Family of the offline random model built when model_name_or_path is 'tiny' ('tiny:<family>' "
            "names the family itself). For tests and the CPU recipe."
        },
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Qwen processor min_pixels (None: processor's)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Qwen processor max_pixels (None: processor's)."})

    # Row selection and prompt form of the authors' released run (README "Released-run parity"); all off by default.
    max_images_per_row: int | None = field(
        default=None,
        metadata={
            "help": "Drop rows with more images than this (the released ViRL39K preprocessing keeps rows with at most "
            "1). None keeps every row. Applies to file datasets (synthetic rows have one image)."
        },
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Drop rows whose processed prompt (chat template and image tokens included, images at this "
            "recipe's pixel budget, counted with the processor) has more tokens than this, logging how many "
            "were dropped; the released run uses 512 (verl max_prompt_length + filter_overlong_prompts). None keeps "
            "every row."
        },
    )
    prompt_filter_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes counting prompt tokens for max_prompt_tokens (None: one per 4 CPU cores)."},
    )
    min_image_side: int | None = field(
        default=None,
        metadata={
            "help": "Upscale (LANCZOS, aspect kept) images whose short side is below this many pixels to it, as the "
            "released ViRL39K preprocessing does with 28. None leaves images as they are. File datasets only."
        },
    )
    prompt_layout: str = field(
        default="default",
        metadata={
            "help": "'default' or 'released': the authors' prompt string ('<image>\\n' prepended when the question "
            "has no placeholder, the instruction appended after the whole question). File datasets only.",
            "choices": list(PROMPT_LAYOUTS),
        },
    )

    # Agents: an environment whose public methods become the rollout's tools (TRL's `environment_factory`)
    environment: str | None = field(
        default=None,
        metadata={
            "help": "Registry name of the environment passed to the trainer as `environment_factory` "
            "(cppo_trl.data.zoom_tool.ENVIRONMENTS): 'zoom' (a zoom_in(bbox_2d) tool cropping the row's image, box in "
            "pixels of the original image) or 'zoom_relative' (the same tool, box on a 0-1000 grid, as Qwen3-VL "
            "grounds). Needs a chat template that parses tool calls (Qwen3-VL). None: no tools.",
            "choices": list(ENVIRONMENTS),
        },
    )

    # Evaluation during training : a held-out set other than the training data's own test split
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset evaluated when eval_strategy is not 'no', routed like dataset_name (e.g. "
            "'hiyouga/geometry3k' for a ViRL39K run, which has no test split). None: dataset_name."
        },
    )
    eval_dataset_split: str | None = field(
        default=None, metadata={"help": "Split of the eval dataset. None: dataset_test_split."}
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        for name in ("max_images_per_row", "max_prompt_tokens", "prompt_filter_num_proc", "min_image_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
        if self.environment is not None and self.environment not in ENVIRONMENTS:
            raise ValueError(f"environment must be one of {sorted(ENVIRONMENTS)} or None, got {self.environment!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")
