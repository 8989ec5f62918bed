"""The CPU recipe end to end through `accelerate launch -m cppo_trl.cppo`, as a user runs it: checkpoint, resume,
offline wandb metrics and the model card. Offline, tiny model, a few steps (each launch is ~30-60 s on 2 CPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny/cppo/config_synthetic_cpu.yaml"
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "1"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cppo_trl.cppo"]
# Smallest run that still exercises CPPO: 1 prompt x 2 rollouts per step, 8 completion tokens.
TINY = ["--per_device_train_batch_size", "2", "--max_completion_length", "8", "--synthetic_num_train", "8"]

pytestmark = pytest.mark.slow


def launch(output_dir: Path, env: dict, *extra: str) -> str:
    cmd = [*ACCELERATE, "--config", RECIPE, "--output_dir", str(output_dir), *TINY, *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    return log


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_script")
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false"
    )
    env.update(WANDB_DIR=str(root / "wandb"), WANDB_SILENT="true", CPPO_TRL_CACHE=str(root / "models"))
    (root / "wandb").mkdir()
    return env


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    """Two steps with a checkpoint at step 2, logging to an offline wandb run."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    log = launch(output_dir, env, "--max_steps", "2", "--save_steps", "2", "--report_to", "wandb")
    return output_dir, log


def global_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["global_step"]


def test_checkpoint_reloads(first_run):
    from transformers import AutoModelForImageTextToText

    output_dir, _ = first_run
    checkpoint = output_dir / "checkpoint-2"
    assert global_step(checkpoint) == 2
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert model.config.model_type == "qwen2_5_vl"
    assert (output_dir / "model.safetensors").exists()


def test_model_card_names_method_paper_and_recipe(first_run):
    card = (first_run[0] / "README.md").read_text()
    assert "CPPO" in card
    assert "CPPO: Contrastive Perception Policy Optimization for VLM Agents" in card
    assert "2601.00501" in card and "Rezaei, Ahmad" in card  # the arXiv id and the authors' BibTeX
    assert RECIPE in card


def test_wandb_offline_run_has_cpl_metrics(first_run, env):
    runs = list(Path(env["WANDB_DIR"]).rglob("*.wandb"))
    assert runs, "no offline wandb run was written"
    data = b"".join(path.read_bytes() for path in runs)
    for key in ("cppo/cpl_loss", "cppo/gated_fraction", "cppo/selected_token_fraction"):
        assert key.encode() in data, key


def test_resume_continues_from_checkpoint(first_run, env):
    output_dir, _ = first_run
    log = launch(output_dir, env, "--max_steps", "3", "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert f"Resuming training from checkpoint {output_dir / 'checkpoint-2'}" in log  # the script's decision
    assert f"Loading model from {output_dir / 'checkpoint-2'}" in log  # transformers really restored it
    assert global_step(output_dir) == 3
