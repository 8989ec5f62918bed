"""VLM agents: tools and environments that return images, through TRL 1.16's own tool loop (`_tool_call_loop`), under
CPPO, PAPO and GRPO.

As in TRL's `test_train_with_tools_multimodal_response`, the model's `generate` is patched so that rollouts call the
tools; everything else (tool execution, the tool response's image tokens, `tool_mask`, the processor path, rewards) is
TRL's. Tiny Qwen3-VL, whose TRL chat template parses tool calls. Each case asserts that the vision tower trains, that
the batch keeps every image, that the rewards see the whole conversation, and that CPL's views or PAPO's mask cover the
rows with tool images, holding as many images per row as the original.
"""

from unittest.mock import patch

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer
from cppo_trl.trainer.cppo_trainer import REMOVED, VIEWS_KEY
from cppo_trl.trainer.papo_trainer import HAS_MASKED_VIEW_KEY


ARGS = {
    "per_device_train_batch_size": 2,
    "num_generations": 2,
    "max_completion_length": 512,
    "max_steps": 1,
    "learning_rate": 0.1,
    "beta": 0.0,
    "report_to": "none",
    "use_cpu": True,
    "bf16": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
}
METHODS = {
    "grpo": (GRPOTrainer, GRPOConfig, {}),
    "cppo": (CPPOTrainer, CPPOConfig, {"cpl_weight": 1.0, "advantage_gating": True}),
    "papo": (PAPOTrainer, PAPOConfig, {"perception_loss_weight": 1.0}),
}


def zoom(region: int) -> list:
    """
    Zoom into a region of the picture.

    Args:
        region: Which region to enlarge.

    Returns:
        The enlarged region.
    """
    rng = np.random.default_rng(region)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return [{"type": "image", "image": picture}, {"type": "text", "text": f"region {region}"}]


class PictureEnvironment:
    """An environment whose first observation is a picture, with the zoom tool as its method."""

    def reset(self, **kwargs) -> list:
        rng = np.random.default_rng(7)
        picture = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
        return [{"type": "image", "image": picture}, {"type": "text", "text": "This is what you see."}]

    def zoom(self, region: int) -> list:
        """
        Zoom into a region of what you see.

        Args:
            region: Which region to enlarge.

        Returns:
            The enlarged region.
        """
        return zoom(region)


def tool_reward(completions, **kwargs):
    """1 for a rollout whose conversation holds a tool answer and ends with "Done.": it sees the whole conversation."""
    return [float(any(m["role"] == "tool" for m in c) and c[-1].get("content") == "Done.") for c in completions]


def _dataset(with_image: bool) -> Dataset:
    rng = np.random.default_rng(3)
    content = [{"type": "text", "text": "What is in the upper left region?"}]
    rows = []
    for _ in range(4):
        row = {"prompt": [{"role": "user", "content": ([{"type": "image"}] if with_image else []) + content}]}
        if with_image:
            row["images"] = [Image.fromarray(rng.integers(0, 256, (100, 130, 3), dtype=np.uint8))]
        rows.append(row)
    return Dataset.from_list(rows)


class ForcedToolCalls:
    """`generate` that makes rollout 0 of every group call `zoom` `calls` times and rollout 1 answer at once."""

    def __init__(self, tokenizer, calls: int):
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.call = tokenizer.encode('<tool_call>\n{"name": "zoom", "arguments": {"region": 1}}\n</tool_call>') + [end]
        self.plain = tokenizer.encode("No tool needed.") + [end]
        self.done = tokenizer.encode("Done.") + [end]
        self.pad, self.calls, self.turn = tokenizer.pad_token_id, calls, 0

    def __call__(self, input_ids, **kwargs):
        if input_ids.shape[0] == ARGS["per_device_train_batch_size"]:  # the first turn of the batch
            self.turn = 1
            rows = [self.call if i % 2 == 0 else self.plain for i in range(input_ids.shape[0])]
        else:  # a post-tool turn of the calling rollouts
            self.turn += 1
            rows = [self.call if self.turn <= self.calls else self.done] * input_ids.shape[0]
        width = max(map(len, rows))
        completions = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=input_ids.device)
        return torch.cat([input_ids, completions], dim=-1)


CASES = {
    "prompt_image_and_tool_image": {"with_image": True, "calls": 1, "environment": False},
    "text_prompt_and_tool_image": {"with_image": False, "calls": 1, "environment": False},
    "three_tool_images_in_one_rollout": {"with_image": True, "calls": 3, "environment": False},
    "environment_observation_image": {"with_image": False, "calls": 1, "environment": True},
}


def _train(method: str, case: dict, tiny_vlm, tmp_path, **overrides):
    trainer_cls, config_cls, extra = METHODS[method]
    env = {"environment_factory": PictureEnvironment} if case["environment"] else {"tools": [zoom]}
    trainer = trainer_cls(
        model=str(tiny_vlm("qwen3_vl")),
        reward_funcs=tool_reward,
        args=config_cls(output_dir=str(tmp_path / method), **ARGS, **{**extra, **overrides}),
        train_dataset=_dataset(case["with_image"]),
        **env,
    )
    batches, completions = [], []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate_and_score(inputs)
        batches.append(output)
        return output

    calculate = trainer._calculate_rewards

    def rewards_seen(inputs, prompts, completions_, ids):
        completions.extend(completions_)
        return calculate(inputs, prompts, completions_, ids)

    trainer._generate_and_score_completions = recording
    trainer._calculate_rewards = rewards_seen
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "visual" in n}
    forced = ForcedToolCalls(trainer.processing_class.tokenizer, case["calls"])
    with patch.object(trainer.model, "generate", side_effect=forced):
        trainer.train()
    return trainer, batches[0], completions, before


def _expected_images(case: dict) -> list[int]:
    """Images per rollout of the group: the prompt's (dataset or observation), plus the tool's for rollout 0."""
    prompt = 1 if (case["with_image"] or case["environment"]) else 0
    return [prompt + case["calls"], prompt]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(CASES))
def test_tool_and_environment_images_train_every_method(method, name, tiny_vlm, tmp_path):
    case = CASES[name]
    trainer, batch, completions, before = _train(method, case, tiny_vlm, tmp_path)
    history = next(h for h in trainer.state.log_history if "loss" in h)
    assert history["tools/call_frequency"] == pytest.approx(case["calls"] / 2)

    # Rewards saw the whole conversation: the calling rollout's tool answers and its post-tool turn.
    calling = completions[0]
    assert [m["role"] for m in calling] == ["assistant", "tool"] * case["calls"] + ["assistant"]
    assert calling[-1]["content"] == "Done." and history["reward"] == pytest.approx(0.5)

    # The batch keeps every image, the tools' included, with their placeholders in the completion.
    assert batch["num_images"] == _expected_images(case)
    assert batch["image_grid_thw"].shape[0] == sum(_expected_images(case))
    if method != "grpo":  # the tool's image tokens are not taken for sampled ones
        assert history[f"{trainer._metric_prefix}/truncated_at_image_token"] == 0
    tool_tokens = (batch["completion_ids"][0] == trainer.model.config.image_token_id) & (batch["tool_mask"][0] == 0)
    assert tool_tokens.sum() > 0

    # The vision tower trained: no image was dropped on the way to the loss.
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(changed) > 0.5 * len(before), f"{len(changed)} of {len(before)} vision parameters changed"

    if method == "cppo":  # the calling rollout is gated in (advantage > 0) and its views hold all its images
        views = batch[VIEWS_KEY]
        assert views[0] is not None and views[1] is None
        grid = views[0].tensors[REMOVED]["image_grid_thw"]
        assert torch.equal(grid, batch["image_grid_thw"][: batch["num_images"][0]])
        assert history["cppo/extra_pass_rows"] == 1 and history["cppo/selected_token_fraction"] > 0
    if method == "papo":  # every row with an image gets the masked pass, tool-image rows included
        assert batch[HAS_MASKED_VIEW_KEY].tolist() == [n > 0 for n in _expected_images(case)]
        assert history["papo/masked_view_rows"] == sum(n > 0 for n in _expected_images(case))
        assert 0 < history["papo/masked_fraction"] < 1


def test_views_of_tool_images_follow_view_images(tiny_vlm, tmp_path):
    """'all': the tool's image is perturbed in both views; 'prompt': it stays as the tool returned it, and the prompt's
    image is still perturbed. (Colour jitter and occlusion: transforms that always change an image.)"""
    case = CASES["prompt_image_and_tool_image"]
    always = {"preserving_perturbations": ["color_jitter"], "removing_perturbations": ["patch_occlusion"]}
    tensors = {}
    for scope in ("all", "prompt"):
        trainer, batch, _, _ = _train("cppo", case, tiny_vlm, tmp_path / scope, view_images=scope, **always)
        rollout = trainer._rollouts[0]
        assert rollout.sources == ("dataset", "tool")
        drawn = trainer._make_view_images(rollout, b"key")
        for name, images in drawn.images.items():
            original_tool, view_tool = np.asarray(rollout.images[1]), np.asarray(images[1])
            assert np.array_equal(original_tool, view_tool) == (scope == "prompt"), (scope, name)
            assert not np.array_equal(np.asarray(rollout.images[0]), np.asarray(images[0]))
        tensors[scope] = batch[VIEWS_KEY][0].tensors[REMOVED]["pixel_values"]
    assert tensors["all"].shape == tensors["prompt"].shape


def test_a_placeholder_the_policy_samples_is_cut_but_a_tools_stays(tiny_vlm, tmp_path):
    """The policy samples an image token in its post-tool turn: the completion is cut there, keeping the tool's turn
    and its image; the tool's own image tokens (tool_mask 0) never trigger the cut."""
    case = CASES["prompt_image_and_tool_image"]
    image_token = None

    class SamplingAPlaceholder(ForcedToolCalls):
        def __init__(self, tokenizer, calls):
            super().__init__(tokenizer, calls)
            self.done = tokenizer.encode("Done.") + [image_token] + tokenizer.encode("more")

    trainer_cls, config_cls, extra = METHODS["cppo"]
    trainer = trainer_cls(
        model=str(tiny_vlm("qwen3_vl")),
        reward_funcs=tool_reward,
        args=config_cls(output_dir=str(tmp_path), **ARGS, **extra),
        train_dataset=_dataset(case["with_image"]),
        tools=[zoom],
    )
    image_token = trainer.model.config.image_token_id
    forced = SamplingAPlaceholder(trainer.processing_class.tokenizer, 1)
    trainer.model.train()
    with patch.object(trainer.model, "generate", side_effect=forced):
        batch = trainer._generate_and_score_completions([trainer.train_dataset[0]] * 2)
    assert batch["num_images"] == [2, 1]  # the tool's image survived the cut
    ids, tool_mask = batch["completion_ids"][0], batch["tool_mask"][0]
    length = int(batch["completion_mask"][0].sum())
    sampled = (ids[:length] == image_token) & (tool_mask[:length] == 1)
    assert not sampled.any() and ((ids[:length] == image_token) & (tool_mask[:length] == 0)).any()
    assert trainer._metrics["train"]["cppo/truncated_at_image_token"][-1] == 1


def test_reward_funcs_are_optional_with_an_environment_reward(tiny_vlm, tmp_path):
    class Rewarding(PictureEnvironment):
        def get_reward(self) -> float:
            return 1.0

    for trainer_cls, config_cls, extra in (METHODS["cppo"], METHODS["papo"]):
        trainer = trainer_cls(
            model=str(tiny_vlm("qwen3_vl")),
            args=config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **ARGS, **extra),
            train_dataset=_dataset(False),
            environment_factory=Rewarding,
        )
        assert trainer.reward_func_names == ["Rewarding"]
