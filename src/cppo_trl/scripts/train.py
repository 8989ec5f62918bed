"""Train a vision-language model with CPPO or PAPO: `accelerate launch -m cppo_trl.cppo --config recipes/.../*.yaml`.

A thin open-r1 style script: a recipe (`cppo_trl.recipe`) fills the script arguments, the method's config and TRL's
`ModelConfig`, and `main` wires them into the method's trainer. Everything a paper table needs is a recipe, not code.
GRPO is either method with its weight at 0 (bit-identical, tested).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import import_module

import datasets
import transformers
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_flash_attn_2_available
from trl import ModelConfig, get_peft_config

from cppo_trl.core.images import load_processor
from cppo_trl.data.script_args import CPPOScriptArguments
from cppo_trl.data.splits import filter_long_prompts, load_eval_split, load_split
from cppo_trl.recipe import METHODS, TRAINERS, parse_args, recipe_path
from cppo_trl.testing import resolve_model_path
from cppo_trl.trainer.cppo_config import CPPOConfig
from cppo_trl.trainer.papo_config import PAPOConfig


logger = logging.getLogger(__name__)


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
    # which the trainer then applies to the images themselves (`cppo_trl.core.images`)
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
            splits[role] = filter_long_prompts(
                dataset, processor, script_args, role, training_args.chat_template_kwargs
            )
    train_dataset, eval_dataset = splits["train"], splits.get("eval")

    # ---- Model: loaded by the trainer from the path with these kwargs (it reloads the reference model the same way)
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "revision": model_args.model_revision,
        "attn_implementation": resolve_attn_implementation(model_args.attn_implementation),
        "dtype": model_args.dtype,
    }

    # ---- Rewards: registry names → functions; weights live in CPPOConfig.reward_weights
    from cppo_trl.data.rewards import get_reward_funcs

    reward_funcs = get_reward_funcs(script_args.reward_funcs)

    # ---- Environment: its public methods become the rollout's tools (TRL's environment_factory)
    agent = {}
    if script_args.environment is not None:
        from cppo_trl.data.zoom_tool import get_environment

        agent["environment_factory"] = get_environment(script_args.environment)

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
        **agent,
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


def cli(argv: list[str] | None = None) -> None:
    """Console entry point (`cppo-train --config recipe.yaml [--flag value ...]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parse_args(argv)
    main(script_args, training_args, model_args, recipe=recipe_path(argv))


if __name__ == "__main__":
    cli()
