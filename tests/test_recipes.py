"""Every recipe parses into the training script's dataclasses and keeps the paper's numbers (recipes rot otherwise).

Parsing runs the method's config `__post_init__` (`CPPOConfig` or `PAPOConfig`, per the recipe's `method`) and GRPO's
batch checks on this CPU machine. The GPU recipes keep their `bf16: true`: transformers 5 does not check bf16 support while parsing, only when the Trainer builds its Accelerator,
so no override is needed; `--use_cpu true` is still appended so that parsing on a GPU machine never initialises CUDA.
Parsing sees one process, so the 8-GPU batch arithmetic is recomputed here with `GPUS` instead of the world size.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from trl import ModelConfig

from cppo_trl.recipe import METHODS, TrainScriptArguments, method_of, parse_args
from cppo_trl.scripts import train
from cppo_trl.trainer.papo_config import PAPOConfig


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("config_*.yaml") if "accelerate_configs" not in p.parts)
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml"))
GPUS = 8
SECTIONS = ("# Model arguments", "# Data arguments", "# Trainer arguments")
ABLATION_DIR = ROOT / "recipes" / "Qwen2.5-VL-3B-Instruct"
# Table 2 order; each step must switch on exactly the named field (paper Table 2).
ABLATIONS = [
    ("grpo/config_geometry3k.yaml", None),
    ("cppo/config_geometry3k_cpl_all_tokens.yaml", "cpl_weight"),
    ("cppo/config_geometry3k_topk.yaml", "perception_token_selection"),
    ("cppo/config_geometry3k.yaml", "advantage_gating"),
]
# Fields that name the run rather than configure it.
RUN_IDENTITY = {"output_dir", "run_name", "logging_dir", "hub_model_id"}
# The fields that make a method: a PAPO recipe in CPPO's conditions may differ from the CPPO one only in these.
CPPO_FIELDS = {"cppo_preset", "cpl_weight", "cpl_temperature", "perception_top_fraction"}
PAPO_FIELDS = {"method", "perception_loss_weight", "der_loss_weight1", "mask_ratio", "mask_patch_size"}


def parse(path: Path):
    """A fresh parser per recipe (TrlParser writes the YAML values into the parser's defaults), for its method."""
    return parse_args(["--config", str(path), "--use_cpu", "true"])


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


def field_defaults(method: str = "cppo") -> dict:
    defaults = {}
    for cls in (TrainScriptArguments, METHODS[method], ModelConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    return defaults


def test_recipes_found():
    assert len(RECIPES) == 22, [rel(p) for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_parses(path):
    script_args, training_args, model_args = parse(path)
    method = "papo" if path.parent.name == "papo" else "cppo"
    assert script_args.method == method and type(training_args) is METHODS[method]
    assert script_args.dataset_name and model_args.model_name_or_path
    assert training_args.generation_batch_size % training_args.num_generations == 0


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_layout(path):
    """The recipe layout (docs/recipes.md): launch command and hardware up front, model/data/trainer sections, sorted keys, reasons inline."""
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    assert header.startswith("#") and "Launch:" in header and "Hardware:" in header
    assert f"--config recipes/{rel(path)}" in header.replace("\\\n#    ", "")
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    defaults = field_defaults(method_of(["--config", str(path)]))
    for start, end in zip(positions, positions[1:] + [len(text)], strict=True):
        lines = [line for line in text[start:end].splitlines()[1:] if re.match(r"^\w", line)]
        keys = [line.split(":", 1)[0] for line in lines]
        assert keys == sorted(keys), f"{rel(path)}: keys not sorted in {text[start:end].splitlines()[0]}"
        for line, key in zip(lines, keys, strict=True):
            assert key in defaults, f"{rel(path)}: unknown key {key}"
            value = yaml.safe_load(text[start:end])[key]
            if value != defaults[key]:
                assert "  # " in line, f"{rel(path)}: {key} differs from the default without a reason"


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_paper_recipe_matches_table8(size):
    script_args, args, model_args = parse(ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k.yaml")
    assert model_args.model_name_or_path == f"Qwen/Qwen2.5-VL-{size}-Instruct"
    assert script_args.dataset_name == "TIGER-Lab/ViRL39K"
    assert (args.cppo_preset, args.cpl_weight, args.cpl_temperature, args.perception_top_fraction) == (
        "paper",
        0.02,
        0.1,
        0.5,
    )
    assert (args.beta, args.num_generations, args.temperature, args.num_train_epochs) == (0.01, 5, 1.0, 2)
    assert (args.learning_rate, args.loss_type, args.bf16, args.gradient_checkpointing) == (1e-6, "dapo", True, True)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.push_to_hub and args.report_to == ["wandb"]
    assert script_args.reward_funcs == ["accuracy", "format"] and args.reward_weights == [0.9, 0.1]
    assert args.per_device_train_batch_size * GPUS * args.gradient_accumulation_steps == 512
    assert args.per_device_train_batch_size * GPUS * args.steps_per_generation == 512 * args.num_generations


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_released_recipe_matches_launch_script(size):
    script_args, args, _ = parse(ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k_released.yaml")
    assert args.cppo_preset == "released" and args.cpl_divergence == "k3" and args.cpl_weight == 0.01
    assert args.perception_score == "normalized" and args.cpl_aggregation == "selected_tokens"
    assert script_args.reward_funcs == ["cppo_released"]
    assert (args.learning_rate, args.max_completion_length, args.num_iterations) == (1e-6, 4096, 1)
    # verl: 512 prompts per rollout batch, mini-batch 64 prompts per optimizer step, G = 5.
    assert args.per_device_train_batch_size * GPUS * args.steps_per_generation == 512 * 5
    assert args.per_device_train_batch_size * GPUS * args.gradient_accumulation_steps == 64 * 5


def test_ablations_differ_by_one_switch_each():
    parsed = [parse(ABLATION_DIR / name) for name, _ in ABLATIONS]
    flat = [{**vars(s), **t.to_dict(), **vars(m)} for s, t, m in parsed]
    assert flat[0]["cpl_weight"] == 0 and flat[-1]["cpl_weight"] == 0.02
    assert flat[-1]["perception_token_selection"] and flat[-1]["advantage_gating"]
    for (_, switch), before, after in zip(ABLATIONS[1:], flat[:-1], flat[1:], strict=True):
        changed = {k for k in after if after[k] != before[k]} - RUN_IDENTITY
        assert changed == {switch}
    for args in (t for _, t, _ in parsed):
        assert (
            args.num_train_epochs == 12
            and args.per_device_train_batch_size * GPUS * args.gradient_accumulation_steps == 128
        )


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_lora_recipe(size):
    from trl import get_peft_config

    _, args, model_args = parse(ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k_lora.yaml")
    peft_config = get_peft_config(model_args)
    assert peft_config is not None and peft_config.r == model_args.lora_r
    assert "q_proj" in peft_config.target_modules
    assert args.generation_batch_size % args.num_generations == 0  # one GPU: the parse-time world size is exact


def test_cpu_recipe():
    script_args, args, model_args = parse(ROOT / "recipes/tiny/cppo/config_synthetic_cpu.yaml")
    assert model_args.model_name_or_path == "tiny:qwen2_5_vl" and script_args.dataset_name == "synthetic"
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing and args.report_to == []
    assert 0 < args.save_steps <= args.max_steps


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config(path):
    config = yaml.safe_load(path.read_text())
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader rejects unknown keys
    assert config["num_processes"] == 8 and config["num_machines"] == 1 and config["mixed_precision"] == "bf16"
    expected = {"ddp.yaml": "MULTI_GPU", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}
    assert config["distributed_type"] == expected[path.name]
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == int(path.stem[-1])
    if config["distributed_type"] == "FSDP":
        assert config["fsdp_config"]["fsdp_version"] == 2


def test_accelerate_configs_present():
    assert {p.name for p in ACCELERATE_CONFIGS} == {"ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp.yaml"}


def _flat(path: Path) -> dict:
    script_args, args, model_args = parse(path)
    return {**vars(script_args), **args.to_dict(), **vars(model_args)}


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_papo_recipe_is_the_cppo_recipe_but_the_method(size):
    """GRPO vs PAPO vs CPPO one switch apart: in the CPPO paper's conditions the PAPO recipe keeps every key of the CPPO
    recipe (data, batch, steps, β, lr, rollouts) and differs only in the method and its own fields."""
    folder = ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct"
    cppo_keys = set(yaml.safe_load((folder / "cppo/config_virl39k.yaml").read_text()))
    papo_keys = set(yaml.safe_load((folder / "papo/config_virl39k.yaml").read_text()))
    assert cppo_keys - CPPO_FIELDS == papo_keys - PAPO_FIELDS
    cppo_run, papo_run = _flat(folder / "cppo/config_virl39k.yaml"), _flat(folder / "papo/config_virl39k.yaml")
    shared = (cppo_run.keys() & papo_run.keys()) - RUN_IDENTITY - {"method"}
    assert {k for k in shared if cppo_run[k] != papo_run[k]} == set()
    _, args, _ = parse(folder / "papo/config_virl39k.yaml")
    assert isinstance(args, PAPOConfig) and (args.perception_loss_weight, args.mask_ratio, args.mask_patch_size) == (
        0.02,
        0.6,
        14,
    )
    assert args.der_loss_weight1 == (0.05 if size == "7B" else 0.0)  # authors' PAPO-G η per size


@pytest.mark.parametrize(("size", "variant"), [("3B", "g"), ("7B", "g"), ("3B", "d"), ("7B", "d")])
def test_papo_authors_recipes_match_their_scripts(size, variant):
    script_args, args, model_args = parse(
        ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/papo/config_virl39k_papo_{variant}.yaml"
    )
    assert model_args.model_name_or_path == f"Qwen/Qwen2.5-VL-{size}-Instruct"
    gamma, eta, beta, clip_high = {
        ("3B", "g"): (0.02, 0.0, 0.01, 0.3),
        ("7B", "g"): (0.02, 0.05, 0.01, 0.3),
        ("3B", "d"): (0.01, 0.03, 0.0, 0.28),
        ("7B", "d"): (0.01, 0.03, 0.0, 0.28),
    }[(size, variant)]
    assert (args.perception_loss_weight, args.der_loss_weight1, args.beta) == (gamma, eta, beta)
    assert (args.epsilon, args.epsilon_high, args.delta, args.loss_type) == (0.2, clip_high, 3.0, "bnpo")
    assert (args.mask_ratio, args.mask_patch_size, args.temperature, args.top_p) == (0.6, 14, 1.0, 0.99)
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type.value) == (1e-6, 0.01, "constant")
    assert (args.max_completion_length, args.num_train_epochs, args.num_iterations) == (2048, 2, 1)
    assert not args.vllm_importance_sampling_correction
    assert beta == 0 or not args.use_bias_correction_kl  # verl's KL loss has no importance ratio
    assert (script_args.min_pixels, script_args.max_pixels) == (200704, 1003520)
    assert script_args.prompt_suffix.startswith("\n\nYou first think through the reasoning process")
    assert script_args.reward_funcs == ["cppo_released"] and script_args.max_prompt_tokens == 4096
    # 384 prompts x 5 per rollout batch, 128 prompts x 5 per optimizer step (authors' rollout/global batch).
    assert args.per_device_train_batch_size * GPUS * args.steps_per_generation == 384 * 5
    assert args.per_device_train_batch_size * GPUS * args.gradient_accumulation_steps == 128 * 5


@pytest.mark.parametrize("method", list(METHODS))
def test_help_lists_the_methods_fields(method, capsys):
    """`cppo-train --help` and `cppo-train --method papo --help` print (argparse formats every help string)."""
    argv = ["--help"] if method == "cppo" else ["--method", method, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    own, other = (
        ("--cpl_weight", "--perception_loss_weight")
        if method == "cppo"
        else ("--perception_loss_weight", "--cpl_weight")
    )
    assert own in text and other not in text and "--method {cppo,papo}" in text


def test_method_is_read_before_parsing(tmp_path):
    recipe = ROOT / "recipes/tiny/papo/config_synthetic_cpu.yaml"
    assert method_of(["--config", str(recipe)]) == "papo"
    assert method_of(["--config", str(recipe), "--method", "cppo"]) == "cppo"  # the command line wins
    assert method_of(["--method=papo"]) == "papo" and method_of([]) == "cppo"
    with pytest.raises(ValueError, match=r"method must be one of \['cppo', 'papo'\], got 'grpo'"):
        method_of(["--method", "grpo"])
    # A CPPO field in a PAPO recipe is an error naming it, never silently ignored.
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text() + "cpl_weight: 0.02\n")
    with pytest.raises(ValueError, match="cpl_weight"):
        parse(bad)
