"""One split of the dataset a recipe names: `dataset_name` routed to its loader, and the processed prompt-length filter
run once on the main process."""

from __future__ import annotations

import dataclasses
import os

import datasets
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from cppo_trl.data import loaders, synthetic
from cppo_trl.data.script_args import CPPOScriptArguments


VIRL39K_NAME = "TIGER-Lab/ViRL39K"

GEOMETRY3K_NAME = "hiyouga/geometry3k"

DEEPEYES_NAME = loaders.DEEPEYES_NAME


def load_split(script_args: CPPOScriptArguments, split: str, seed: int) -> datasets.Dataset:
    """Routes `dataset_name` to its `cppo_trl.data` loader and returns one split in prompt/images/solution form."""
    name = script_args.dataset_name
    suffix = {} if script_args.prompt_suffix is None else {"prompt_suffix": script_args.prompt_suffix}
    if name == "synthetic":
        num = {"num_train": script_args.synthetic_num_train, "num_test": script_args.synthetic_num_test}
        splits = synthetic.make_synthetic_splits(**num, seed=seed, tasks=script_args.synthetic_tasks, **suffix)
        return splits["train" if split == script_args.dataset_train_split else "test"]
    rows = {
        "max_images": script_args.max_images_per_row,
        "min_image_side": script_args.min_image_side,
        "prompt_layout": script_args.prompt_layout,
        **suffix,
    }
    if name == VIRL39K_NAME or (os.path.isdir(name) and "virl" in name.lower()):
        return loaders.load_virl39k(name, split=split, **rows)
    if name == GEOMETRY3K_NAME or "geometry3k" in name.lower():
        return loaders.load_geometry3k(name, split=split, **rows)
    if name == DEEPEYES_NAME or "deepeyes" in name.lower():
        return loaders.load_deepeyes(name, split=split, **rows)
    return loaders.load_local(name, **rows)


def load_eval_split(script_args: CPPOScriptArguments, seed: int) -> datasets.Dataset:
    """The held-out set evaluated during training: `eval_dataset_name` / `eval_dataset_split` when set, else the
    training dataset's `dataset_test_split`."""
    eval_args = dataclasses.replace(
        script_args, dataset_name=script_args.eval_dataset_name or script_args.dataset_name
    )
    return load_split(eval_args, script_args.eval_dataset_split or script_args.dataset_test_split, seed)


def filter_long_prompts(
    dataset: datasets.Dataset,
    processor,
    script_args: CPPOScriptArguments,
    split: str,
    chat_template_kwargs: dict | None = None,
) -> datasets.Dataset:
    """`max_prompt_tokens`: the main process counts every prompt with the processor, the other ranks receive the
    counts (counting is the slow part: one processor call per row), and every rank drops the same rows."""
    state = PartialState()
    counts = [None]
    if state.is_main_process:
        num_proc = script_args.prompt_filter_num_proc or max(1, (os.cpu_count() or 1) // 4)
        counts = [
            loaders.prompt_token_counts(
                dataset,
                processor,
                chat_template_kwargs=chat_template_kwargs,
                num_proc=num_proc if num_proc > 1 else None,
            )
        ]
    if state.num_processes > 1:
        broadcast_object_list(counts)
    return loaders.drop_long_prompts(dataset, counts[0], script_args.max_prompt_tokens, split=split)
