"""The command line as a user meets it (`cppo-eval --help`, `python -m cppo_trl.evaluate --help`, `compare --help`),
every eval recipe parsed and laid out like the training recipes, and the training script's eval split."""

import dataclasses
import json
import re
import runpy
import sys
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from cppo_trl.data.script_args import CPPOScriptArguments
from cppo_trl.data.splits import load_eval_split
from cppo_trl.evaluate import arguments, cli, evaluation
from cppo_trl.recipe import make_parser


ROOT = Path(__file__).resolve().parents[1]
EVAL_RECIPES = sorted((ROOT / "recipes" / "eval").glob("*.yaml"))
SECTIONS = ("# Model arguments", "# Data arguments", "# Protocol arguments", "# Backend arguments")


def test_module_help(capsys, monkeypatch):
    """`python -m cppo_trl.evaluate --help`, run in this process (runpy is what `-m` does) to skip a second import."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cppo_trl.evaluate", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--num_samples" in out and "--perturb" in out and "cppo-eval compare" in out


def test_console_script_help(capsys):
    target = re.search(r'^cppo-eval = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    entry = getattr(import_module(target.group(1)), target.group(2))
    for argv in (["--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            entry(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cppo-eval" in out and "usage: cppo-eval compare" in out and "--paper" in out


def test_eval_recipes_found():
    assert [p.name for p in EVAL_RECIPES] == ["eval_table1.yaml", "eval_table6.yaml", "eval_tiny_cpu.yaml"]


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: p.name)
def test_eval_recipe_parses_and_is_laid_out(path):
    (args,) = cli.make_parser().parse_args_and_config(args=["--config", str(path)])
    assert args.model_name_or_path and args.benchmarks
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    assert "Launch:" in header and "Hardware:" in header and f"--config recipes/eval/{path.name}" in header
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(arguments.EvalArguments)
    }
    values = yaml.safe_load(text)
    for section in re.split(r"\n# [A-Z][a-z]+ arguments\n", text)[1:]:
        keys = [line.split(":", 1)[0] for line in section.splitlines() if re.match(r"^\w", line)]
        assert keys == sorted(keys), f"{path.name}: keys not sorted: {keys}"
        for line in (line for line in section.splitlines() if re.match(r"^\w", line)):
            key = line.split(":", 1)[0]
            assert key in defaults, f"{path.name}: unknown key {key}"
            assert "  # " in line or values[key] == defaults[key] or isinstance(values[key], list), (
                f"{path.name}: {key}"
            )
    if args.training_recipe:
        assert (ROOT / args.training_recipe).is_file()


def test_table_recipes_follow_the_paper():
    (table1,) = cli.make_parser().parse_args_and_config(args=["--config", str(ROOT / "recipes/eval/eval_table1.yaml")])
    assert table1.benchmarks == list(evaluation.registry.TABLE1_BENCHMARKS) and table1.backend == "vllm"
    assert (table1.num_samples, table1.temperature, table1.top_p, table1.top_k) == (8, 1.0, 1.0, 0)
    (table6,) = cli.make_parser().parse_args_and_config(args=["--config", str(ROOT / "recipes/eval/eval_table6.yaml")])
    assert sorted(table6.benchmarks) == ["logicvista", "mathvision", "mathvista", "wemath"]
    settings = evaluation.resolve_settings(table6)
    views = evaluation.expand_views(table6.perturb, settings.perturbation_params)
    assert views == {
        "color_jitter": "preserving",
        "perspective": "preserving",
        "rotation": "preserving",
        "gaussian_blur": "preserving",
        "patch_occlusion": "removing",
        "zoom_crop": "removing",
    }  # exactly the rows of the paper's Table 6
    assert settings.max_pixels == 1003520 and settings.prompt_suffix.startswith(" You FIRST think")


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_virl39k_recipes_evaluate_on_geometry3k_test(size):
    script_args, training_args, _ = make_parser().parse_args_and_config(
        args=[
            "--config",
            str(ROOT / f"recipes/Qwen2.5-VL-{size}-Instruct/cppo/config_virl39k.yaml"),
            "--use_cpu",
            "true",
        ]
    )
    assert (script_args.eval_dataset_name, script_args.eval_dataset_split) == ("hiyouga/geometry3k", "test")
    assert training_args.eval_strategy == "steps" and training_args.num_generations_eval == 8
    assert training_args.per_device_eval_batch_size * 8 % training_args.num_generations_eval == 0  # 8 GPUs


def test_eval_split_routes_to_eval_dataset(tmp_path):
    args = CPPOScriptArguments(
        dataset_name=str(tmp_path / "train.jsonl"), synthetic_num_test=5, synthetic_tasks=["color"]
    )
    args = dataclasses.replace(args, eval_dataset_name="synthetic")
    split = load_eval_split(args, seed=0)
    assert len(split) == 5 and set(split["task"]) == {"color"}
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "missing.png"}))
    with pytest.raises(ValueError, match="missing.png"):  # without eval_dataset_name: the training data's own file
        load_eval_split(dataclasses.replace(args, eval_dataset_name=None), seed=0)
