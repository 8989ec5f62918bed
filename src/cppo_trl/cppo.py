"""Train a vision-language model with CPPO or PAPO: `accelerate launch -m cppo_trl.cppo --config recipes/.../*.yaml`.

A thin open-r1 style script: the recipe YAML (or CLI flags, which override it) fills three dataclasses —
`CPPOScriptArguments` (data, rewards, processor; plus the `method` switch), the method's config (`CPPOConfig` or
`PAPOConfig`) and TRL's `ModelConfig` (model, LoRA) — and `main` wires them into the method's trainer. Everything a
paper table needs is a recipe, not code. GRPO is either method with its weight at 0 (bit-identical, tested).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import import_module

import datasets
import transformers
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_flash_attn_2_available
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from cppo_trl import data
from cppo_trl.config import CPPOConfig
from cppo_trl.data import PROMPT_LAYOUTS
from cppo_trl.images import load_processor
from cppo_trl.papo_config import PAPOConfig


logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
VIRL39K_NAME = "TIGER-Lab/ViRL39K"
GEOMETRY3K_NAME = "hiyouga/geometry3k"
# The method switch: the config class the parser fills, and the trainer `main` builds (imported there, so that
# `cppo-train --help` need not load TRL's trainer stack).
METHODS = {"cppo": CPPOConfig, "papo": PAPOConfig}
TRAINERS = {"cppo": ("cppo_trl.trainer", "CPPOTrainer"), "papo": ("cppo_trl.papo", "PAPOTrainer")}
DEFAULT_METHOD = "cppo"


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
            "help": "Reward registry names (cppo_trl.rewards.REWARD_FUNCS); weights are CPPOConfig.reward_weights."
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

    # Evaluation during training (issue 9): a held-out set other than the training data's own test split
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
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")


@dataclass
class TrainScriptArguments(CPPOScriptArguments):
    """`CPPOScriptArguments` plus the method switch (kept apart so the data options can grow on their own)."""

    method: str = field(
        default=DEFAULT_METHOD,
        metadata={
            "help": "Which method to train: 'cppo' (CPPOConfig fields) or 'papo' (PAPOConfig fields). Read from the "
            "command line or the recipe before the parser is built; `--method papo --help` lists PAPO's fields.",
            "choices": list(METHODS),
        },
    )


def resolve_model_path(model_name_or_path: str, family: str) -> str:
    """`tiny` / `tiny:<family>` → a tiny random VLM built (once, cached) on disk; anything else is returned as is."""
    if model_name_or_path == "tiny" or model_name_or_path.startswith(TINY_PREFIX):
        from cppo_trl.testing import build_tiny_vlm

        return str(build_tiny_vlm(family=model_name_or_path[len(TINY_PREFIX) :] or family))
    return model_name_or_path


def load_split(script_args: CPPOScriptArguments, split: str, seed: int) -> datasets.Dataset:
    """Routes `dataset_name` to its `cppo_trl.data` loader and returns one split in prompt/images/solution form."""
    name = script_args.dataset_name
    suffix = {} if script_args.prompt_suffix is None else {"prompt_suffix": script_args.prompt_suffix}
    if name == "synthetic":
        num = {"num_train": script_args.synthetic_num_train, "num_test": script_args.synthetic_num_test}
        splits = data.make_synthetic_splits(**num, seed=seed, tasks=script_args.synthetic_tasks, **suffix)
        return splits["train" if split == script_args.dataset_train_split else "test"]
    rows = {
        "max_images": script_args.max_images_per_row,
        "min_image_side": script_args.min_image_side,
        "prompt_layout": script_args.prompt_layout,
        **suffix,
    }
    if name == VIRL39K_NAME or (os.path.isdir(name) and "virl" in name.lower()):
        return data.load_virl39k(name, split=split, **rows)
    if name == GEOMETRY3K_NAME or "geometry3k" in name.lower():
        return data.load_geometry3k(name, split=split, **rows)
    return data.load_local(name, **rows)


def filter_long_prompts(
    dataset: datasets.Dataset, processor, script_args: CPPOScriptArguments, training_args: CPPOConfig, split: str
) -> datasets.Dataset:
    """`max_prompt_tokens`: the main process counts every prompt with the processor, the other ranks receive the
    counts (counting is the slow part: one processor call per row), and every rank drops the same rows."""
    state = PartialState()
    counts = [None]
    if state.is_main_process:
        num_proc = script_args.prompt_filter_num_proc or max(1, (os.cpu_count() or 1) // 4)
        counts = [
            data.prompt_token_counts(
                dataset,
                processor,
                chat_template_kwargs=training_args.chat_template_kwargs,
                num_proc=num_proc if num_proc > 1 else None,
            )
        ]
    if state.num_processes > 1:
        broadcast_object_list(counts)
    return data.drop_long_prompts(dataset, counts[0], script_args.max_prompt_tokens, split=split)


def resolve_attn_implementation(requested: str | None) -> str | None:
    """`flash_attention_2` when the flash-attn package is importable, else `sdpa` with a warning: flash-attn ships
    no wheels on PyPI (it builds against the local CUDA toolkit), so the GPU recipes must not depend on it."""
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        logger.warning(
            "attn_implementation=flash_attention_2 but the flash-attn package is not installed: using 'sdpa' "
            "(same results, slower on long rollouts). Install it with `pip install flash-attn --no-build-isolation`."
        )
        return "sdpa"
    return requested


def load_eval_split(script_args: CPPOScriptArguments, seed: int) -> datasets.Dataset:
    """The held-out set evaluated during training: `eval_dataset_name` / `eval_dataset_split` when set, else the
    training dataset's `dataset_test_split`."""
    eval_args = dataclasses.replace(
        script_args, dataset_name=script_args.eval_dataset_name or script_args.dataset_name
    )
    return load_split(eval_args, script_args.eval_dataset_split or script_args.dataset_test_split, seed)


def main(
    script_args: CPPOScriptArguments,
    training_args: CPPOConfig | PAPOConfig,
    model_args: ModelConfig,
    recipe: str | None = None,
):
    """Runs one training job of the method whose config `training_args` is; `recipe` is recorded in the model card."""
    method = next((name for name, config in METHODS.items() if type(training_args) is config), None)
    if method is None:
        raise TypeError(
            f"training_args must be one of {[c.__name__ for c in METHODS.values()]}, got "
            f"{type(training_args).__name__}."
        )
    # ---- Logging: one format for every library, verbosity from the trainer's log_level
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info("Model %s | Script %s", model_args, script_args)
    logger.info("Training %s", training_args)

    # ---- Seed: before the dataset and model, so synthetic data and LoRA init are reproducible
    set_seed(training_args.seed)

    # ---- Checkpoint: an explicit path wins; `true` (or nothing, when output_dir already holds one) takes the last
    last_checkpoint = (
        get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    )
    resume = training_args.resume_from_checkpoint
    if str(resume).lower() in ("none", "true"):
        resume = last_checkpoint
    elif str(resume).lower() == "false":
        resume = None
    if resume:
        logger.info("Resuming training from checkpoint %s", resume)
    elif training_args.resume_from_checkpoint not in (None, False, "false", "False"):
        logger.warning(
            "resume_from_checkpoint=true but %s has no checkpoint: training from scratch", training_args.output_dir
        )

    # ---- Processor (before the dataset: the prompt-length filter counts with it), with the recipe's pixel limits,
    # which the trainer then applies to the images themselves (`cppo_trl.images`)
    model_path = resolve_model_path(model_args.model_name_or_path, script_args.tiny_model_family)
    processor = load_processor(
        model_path,
        script_args.min_pixels,
        script_args.max_pixels,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )

    # ---- Dataset: loader options, then the processed prompt-length filter (on the eval set too, as verl does)
    splits = {"train": load_split(script_args, script_args.dataset_train_split, training_args.seed)}
    if training_args.eval_strategy != "no":
        splits["eval"] = load_eval_split(script_args, training_args.seed)
    for role, dataset in splits.items():
        if len(dataset) == 0:
            raise ValueError(f"the {role} dataset has no row left after loading")
        if script_args.max_prompt_tokens is not None:
            splits[role] = filter_long_prompts(dataset, processor, script_args, training_args, role)
    train_dataset, eval_dataset = splits["train"], splits.get("eval")

    # ---- Model: loaded by the trainer from the path with these kwargs (it reloads the reference model the same way)
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "revision": model_args.model_revision,
        "attn_implementation": resolve_attn_implementation(model_args.attn_implementation),
        "dtype": model_args.dtype,
    }

    # ---- Rewards: registry names → functions; weights live in CPPOConfig.reward_weights
    from cppo_trl.rewards import get_reward_funcs

    reward_funcs = get_reward_funcs(script_args.reward_funcs)

    # ---- Trainer (imported here: `cppo-train --help` need not load TRL's trainer stack)
    module, name = TRAINERS[method]
    trainer = getattr(import_module(module), name)(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )

    # ---- Train
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # ---- Save model and model card (main process only); the card names the method, paper and recipe
    trainer.save_model(training_args.output_dir)
    logger.info("Model saved to %s", training_args.output_dir)
    tags = [method] + ([f"recipe:{recipe}"] if recipe else [])
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name, tags=tags)

    # ---- Evaluate
    if eval_dataset is not None and training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # ---- Push to the Hub
    if training_args.push_to_hub:
        logger.info("Pushing to the Hub")
        trainer.push_to_hub(dataset_name=script_args.dataset_name, tags=tags)


def make_parser(method: str = DEFAULT_METHOD) -> TrlParser:
    """The parser of one method's recipes: script arguments, the method's config, TRL's model arguments."""
    return TrlParser((TrainScriptArguments, METHODS[method], ModelConfig))


def method_of(argv: list[str]) -> str:
    """The method a command line asks for: `--method` on it, else the recipe's `method:` key, else CPPO. Needed before
    parsing, because the method decides which config class (and so which fields) the parser knows."""
    method = next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), None)
    if method is None and "--method" in argv[:-1]:
        method = argv[argv.index("--method") + 1]
    recipe = _recipe_path(argv)
    if method is None and recipe is not None:
        with open(recipe) as f:
            method = (yaml.safe_load(f) or {}).get("method")
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    return method


def parse_args(argv: list[str]) -> tuple[TrainScriptArguments, CPPOConfig | PAPOConfig, ModelConfig]:
    """Parse a command line (recipe and overrides) with the parser of the method it names."""
    return make_parser(method_of(argv)).parse_args_and_config(args=argv)


def _recipe_path(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


def cli(argv: list[str] | None = None) -> None:
    """Console entry point (`cppo-train --config recipe.yaml [--flag value ...]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parse_args(argv)
    main(script_args, training_args, model_args, recipe=_recipe_path(argv))


if __name__ == "__main__":
    cli()
