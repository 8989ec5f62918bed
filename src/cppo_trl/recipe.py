"""A training recipe, read: the method switch (CPPO or PAPO), the dataclasses a recipe fills and its parser.

A recipe is YAML (or CLI flags, which override it) for three dataclasses: `TrainScriptArguments` (data, rewards,
processor, and the `method` switch), the method's config (`CPPOConfig` or `PAPOConfig`) and TRL's `ModelConfig`. The
method must be known before parsing, because it decides which config class (and so which fields) the parser knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from trl import ModelConfig, TrlParser

from cppo_trl.data.script_args import CPPOScriptArguments
from cppo_trl.trainer.cppo_config import CPPOConfig
from cppo_trl.trainer.papo_config import PAPOConfig


# The method switch: the config class the parser fills, and the trainer `main` builds (imported there, so that
# `cppo-train --help` need not load TRL's trainer stack).
DEFAULT_METHOD = "cppo"
METHODS = {"cppo": CPPOConfig, "papo": PAPOConfig}

TRAINERS = {
    "cppo": ("cppo_trl.trainer.cppo_trainer", "CPPOTrainer"),
    "papo": ("cppo_trl.trainer.papo_trainer", "PAPOTrainer"),
}


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


def make_parser(method: str = DEFAULT_METHOD) -> TrlParser:
    """The parser of one method's recipes: script arguments, the method's config, TRL's model arguments."""
    return TrlParser((TrainScriptArguments, METHODS[method], ModelConfig))


def method_of(argv: list[str]) -> str:
    """The method a command line asks for: `--method` on it, else the recipe's `method:` key, else CPPO. Needed before
    parsing, because the method decides which config class (and so which fields) the parser knows."""
    method = next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), None)
    if method is None and "--method" in argv[:-1]:
        method = argv[argv.index("--method") + 1]
    recipe = recipe_path(argv)
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


def recipe_path(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
