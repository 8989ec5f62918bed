"""The GPU acceptance check and its offline wheel list cannot rot: smoke mode on CPU, checks that can fail, the list.

No GPU here: `benchmarks/gpu_check.py --device cpu --tiny` runs the same code path (six real `Trainer.train()` runs,
timing hooks, the vision-token check) on the tiny model; the 3B shapes are checked on the meta device.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cppo_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_on_cpu(tmp_path):
    gpu_check = _load("gpu_check")
    argv = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--completion-length", "6"]
    argv += ["--image-size", "56", "--model-cache", str(tmp_path / "models"), "--out", str(tmp_path / "out")]
    payload = gpu_check.main(argv)
    assert payload["complete"], payload["incomplete_reasons"]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == json.loads(json.dumps(payload))
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.count("\n| full |") == 3 and table.count("\n| lora |") == 3
    runs = {(run["mode"], run["variant"]): run for run in payload["runs"]}
    assert set(runs) == {(m, v) for m in gpu_check.MODES for v in gpu_check.VARIANTS}
    for (mode, variant), run in runs.items():
        assert run["completion_length"] == 6  # EOS suppressed: every rollout pays for the full length
        assert run["vision_token_rows_checked"] == 8 and run["vision_token_mismatches"] == []
        assert math.isfinite(run["grad_norm"]) and run["grad_norm"] > 0
        assert run["step_ratio"] > 0 and run["loss_phase_ratio"] > 0 and run["memory_ratio"] is None  # CPU
        assert (run["gated_fraction"] is None) == (variant == "grpo")
        if mode == "lora":
            assert run["trainable_params"] < run["params"] / 5
    assert runs[("full", "grpo")]["step_ratio"] == 1.0
    # No GPU here: both engine checks are reported as skipped, with why, never as passed.
    assert {name: r["status"] for name, r in payload["engines"].items()} == dict.fromkeys(gpu_check.ENGINES, "skipped")
    assert all(r["reason"] for r in payload["engines"].values()) and "| vllm_colocate | skipped |" in table


def test_vision_token_check_finds_a_mismatch():
    gpu_check = _load("gpu_check")
    image = 7
    batch = {
        "prompt_ids": torch.tensor([[1, image, image, image, image, 2], [0, image, image, image, image, 2]]),
        "prompt_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),  # 16 patches = 4 merged tokens each
        "num_images": [1, 1],
        "pixel_values": torch.zeros(32, 8),
    }
    assert gpu_check.vision_token_mismatches(batch, image, merge_size=2) == (2, [])
    batch["prompt_ids"][1, 2] = 3  # one image-pad token lost (as when vLLM and the processor disagree)
    rows, problems = gpu_check.vision_token_mismatches(batch, image, merge_size=2)
    assert rows == 2 and problems == ["row 1: 3 image tokens in the prompt ids, 4 from image_grid_thw"]
    batch["pixel_values"] = torch.zeros(30, 8)
    assert "pixel_values has 30 patches" in gpu_check.vision_token_mismatches(batch, image, merge_size=2)[1][-1]


def test_3b_shapes_are_qwen2_5_vl_3b():
    from transformers import AutoModelForImageTextToText

    from cppo_trl import testing

    spec = testing._FAMILIES["qwen2_5_vl"]
    tokenizer = testing.build_local_tokenizer(
        spec.special_tokens,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        extra_special_tokens=spec.extra_special_tokens,
    )
    config = testing._qwen2_5_vl_sized_config(tokenizer, "3b")
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (2048, 36)
    assert (config.text_config.vocab_size, config.vision_config.depth, config.vision_config.hidden_size) == (
        151936,
        32,
        1280,
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    # Qwen2.5-VL-3B-Instruct has 3.75B parameters, 0.67B of them in the vision tower.
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 3.75
    assert round(sum(p.numel() for p in model.model.visual.parameters()) / 1e9, 2) == 0.67
    with pytest.raises(ValueError, match="size"):
        testing.build_tiny_vlm("gemma3", size="3b")


def test_gpu_wheels_lists_every_dependency_but_torch(capsys):
    gpu_wheels = _load("gpu_wheels")
    requirements = gpu_wheels.main(["--dry-run", "--out", "unused"])
    names = {requirement.split("==")[0].split(">")[0].lower() for requirement in requirements}
    assert {"trl", "transformers", "accelerate", "peft", "datasets", "mathruler", "pylatexenc", "torchvision"} <= names
    assert {"setuptools", "wheel"} <= names  # `pip install -e .` builds cppo_trl offline
    assert not {name for name in names if name == "torch" or name.startswith(("nvidia", "triton", "cuda-"))}
    from importlib.metadata import version

    assert f"trl=={version('trl')}" in requirements  # pinned to the tested versions
    command = capsys.readouterr().out
    assert "--only-binary=:all:" in command and "--python-version 3.12" in command and "--no-deps" in command
    assert "manylinux_2_31_x86_64" in command  # llguidance-style wheels are tagged 2_31, not 2014
    without = gpu_wheels.main(["--dry-run", "--torchvision", "none"])
    assert not any(requirement.startswith("torchvision") for requirement in without)
    assert sys.executable in command
