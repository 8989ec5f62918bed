"""The vLLM fixes of the rails (`cppo_trl.trainer.vllm`), in the main suite: what vLLM is sent (one placeholder per
image, the recipe's pixel limits), the encoder-cache reset after a sync, the server-mode grid check and the prompt-id
guard, on stand-ins that record what TRL 1.16's `VLLMGeneration` would hand vLLM. Real vLLM (its CPU build) runs the
same rails in the engine lane: `tests/engines/test_vllm.py`."""

import types

import pytest
import torch
from conftest import generation_batch, make_trainer

from cppo_trl.core.images import PixelBudget
from cppo_trl.trainer.vllm import (
    VLLMFixes,
    check_prompt_ids,
    check_server_features,
    collapse_placeholder_runs,
    placeholder_run_lengths,
)


PAD = 9


def test_collapse_keeps_one_token_per_run():
    ids = [1, PAD, PAD, PAD, 2, PAD, 3, PAD, PAD]
    assert collapse_placeholder_runs(ids, frozenset({PAD})) == [1, PAD, 2, PAD, 3, PAD]
    assert placeholder_run_lengths(ids, frozenset({PAD})) == [3, 1, 2]
    assert collapse_placeholder_runs([1, 2], frozenset({PAD})) == [1, 2]


class _LLM:
    """Records what vLLM receives; reports the prompt as vLLM 0.31 does for Qwen (each image's run expanded from its
    one placeholder back to `tokens_per_image`)."""

    def __init__(self, tokens_per_image: int, placeholder: int = PAD):
        self.tokens_per_image, self.placeholder, self.requests = tokens_per_image, placeholder, []
        self.llm_engine = types.SimpleNamespace(resets=0)
        self.llm_engine.reset_encoder_cache = lambda: setattr(self.llm_engine, "resets", self.llm_engine.resets + 1)

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        self.requests.extend(prompts)
        outputs = []
        for prompt in prompts:
            ids = [
                t
                for token in prompt["prompt_token_ids"]
                for t in ([token] * self.tokens_per_image if token == PAD else [token])
            ]
            outputs.append(types.SimpleNamespace(prompt_token_ids=ids))
        return outputs


class _Generation:
    """TRL's `VLLMGeneration` in colocate mode, reduced to the calls the fixes wrap."""

    mode = "colocate"

    def __init__(self, llm):
        self.llm, self.synced = llm, 0

    def generate(self, prompts, images, num_generations, profiler=None):
        # As TRL 1.16: multimodal data only for a prompt with images.
        requests = [
            {"prompt_token_ids": ids, **({"multi_modal_data": {"image": im}} if im is not None else {})}
            for ids, im in zip(prompts, images, strict=True)
        ]
        outputs = self.llm.generate(requests, sampling_params=None, use_tqdm=False)
        return [o.prompt_token_ids for o in outputs], [[5, 6]] * len(prompts), [[[-1.0]] * 2] * len(prompts), None

    def sync_weights(self):
        self.synced += 1


def _fixed(tokens_per_image=3):
    generation, checked = _Generation(_LLM(tokens_per_image)), []
    config = types.SimpleNamespace(model_type="qwen2_5_vl")
    fixes = VLLMFixes(generation, config, frozenset({PAD}), PixelBudget(28, 784, 12544), on_checked=checked.append)
    return generation, fixes, checked


def test_colocate_sends_one_placeholder_per_image_with_the_recipes_limits():
    generation, _, checked = _fixed()
    prompts = [[1, PAD, PAD, PAD, 2], [1, 2]]
    reported, *_ = generation.generate(prompts, [["image"], None], 1)
    assert reported == prompts and checked == [2]  # vLLM re-expands to exactly the processor's ids
    first, second = generation.llm.requests
    assert first["prompt_token_ids"] == [1, PAD, 2]
    assert first["mm_processor_kwargs"] == {"size": {"shortest_edge": 784, "longest_edge": 12544}}
    assert second == {"prompt_token_ids": [1, 2]}  # a text-only prompt goes as it is


def test_a_grid_other_than_the_processors_is_stopped():
    generation, _, checked = _fixed(tokens_per_image=4)  # vLLM resized to another grid: 4 tokens, not 3
    with pytest.raises(
        ValueError, match=r"sample 0 .*6 tokens \(4 image placeholders\) instead of 5 \(3\).*qwen2_5_vl"
    ):
        generation.generate([[1, PAD, PAD, PAD, 2]], [["image"]], 1)
    assert checked == []


def test_every_sync_resets_the_encoder_cache():
    generation, fixes, _ = _fixed()
    generation.sync_weights()
    generation.sync_weights()
    assert generation.synced == 2 and generation.llm.llm_engine.resets == 2 and fixes.encoder_resets == 2


def test_server_features_must_fill_their_runs():
    features = {"mm_placeholders": {"image": [{"offset": 5, "length": 4}, {"offset": 30, "length": 2}]}}
    check_server_features(features, [1, PAD, PAD, PAD, PAD, 2, PAD, PAD], frozenset({PAD}))
    check_server_features(None, [1], frozenset({PAD}))
    with pytest.raises(
        ValueError,
        match=r"into \[4, 2\] vision tokens where the trainer's processor has \[4, 3\].*mm-processor-kwargs",
    ):
        check_server_features(features, [1, PAD, PAD, PAD, PAD, 2, PAD, PAD, PAD], frozenset({PAD}))


def test_check_prompt_ids_names_the_first_bad_sample():
    config = types.SimpleNamespace(model_type="llava_next")
    sent = [[1, PAD, PAD, 2], [1, PAD, 2], [3]]
    check_prompt_ids(sent, [list(ids) for ids in sent], config, frozenset({PAD}))
    with pytest.raises(
        ValueError, match=r"sample 1 .*4 tokens \(2 image placeholders\) instead of 3 \(1\).*llava_next"
    ):
        check_prompt_ids(sent, [sent[0], [1, PAD, PAD, 2], sent[2]], config, frozenset({PAD}))


def test_the_trainer_generates_through_the_fixes(tiny_qwen, tmp_path):
    """TRL's rollout path with the recording vLLM in colocate mode: each request holds one placeholder per image, the
    prompt ids vLLM reports are checked and counted, and the batch trains."""
    trainer = make_trainer(tiny_qwen, tmp_path)
    image_token = trainer.model.config.image_token_id
    llm = _LLM(tokens_per_image=16)  # the tiny processor's 112x112 image: 16 merged tokens
    generation = _Generation(llm)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction, trainer._last_loaded_step = True, False, 0
    trainer.vllm_generation = generation
    VLLMFixes(
        generation, trainer.model.config, frozenset({image_token}), trainer._pixel_budget, trainer._count_vllm_prompts
    )
    global PAD
    PAD, original = image_token, PAD
    try:
        inputs = generation_batch(trainer)
    finally:
        PAD = original
    assert all(request["prompt_token_ids"].count(image_token) == 1 for request in llm.requests)
    assert trainer._metrics["train"]["cppo/vllm_prompts_checked"] == [4.0]
    assert torch.isfinite(trainer.compute_loss(trainer.model, inputs))
