"""TRL 1.16's vLLM generation, right for vision-language models: the prompt vLLM reads, the grid it resizes images to,
and the vision embeddings it caches across weight syncs.

Colocate mode (`VLLMGeneration.generate` -> `LLM.generate`) sends vLLM the processor's *expanded* prompt ids with the
images. vLLM's multimodal processor then expands each image's placeholder again: it replaces the first placeholder of
the prompt with the whole image, so n placeholders come back as 2n - 1 and the model generates from a corrupted
prompt (Qwen2-VL, Qwen2.5-VL, Qwen3-VL on vLLM 0.31 and 0.32). Sending every run of placeholders as one token gives
back exactly the processor's ids. vLLM also resizes the images with the checkpoint's own pixel limits, not the recipe's,
so each request carries the trainer's (`mm_processor_kwargs`). And TRL's weight sync resets vLLM's prefix cache but not
its encoder cache, so an image seen before a sync (every image after the first epoch) is generated from the old vision
tower's embeddings: the cache is reset after every sync.

Server mode (`trl vllm-serve`) receives the trainer's expanded ids with image features the server computed, and TRL
places the features on the runs of placeholders itself (`VLLMGeneration._place_features`), so nothing is expanded
twice; but the server resizes with its own limits, so the features of an image may not fit its run. That is checked
here, naming the server option that fixes it; the server's encoder cache is reset after each sync too.

Every vLLM generation is then checked: the prompt ids vLLM reports must equal the processor's (`check_prompt_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cppo_trl.core.images import PixelBudget


logger = logging.getLogger(__name__)


def collapse_placeholder_runs(ids: Sequence[int], placeholder_ids: frozenset[int]) -> list[int]:
    """`ids` with every run of consecutive placeholder tokens reduced to its first token: what vLLM expands back."""
    return [token for i, token in enumerate(ids) if not (token in placeholder_ids and i and ids[i - 1] == token)]


def placeholder_run_lengths(ids: Sequence[int], placeholder_ids: frozenset[int]) -> list[int]:
    lengths, previous = [], None
    for token in ids:
        if token in placeholder_ids:
            if token == previous:
                lengths[-1] += 1
            else:
                lengths.append(1)
        previous = token
    return lengths


def check_prompt_ids(
    sent: Sequence[Sequence[int]], reported: Sequence[Sequence[int]], config, placeholder_ids: frozenset[int]
) -> None:
    """Raise if vLLM generated from other prompt ids than the processor's."""
    for index, (ours, theirs) in enumerate(zip(sent, reported, strict=True)):
        if list(ours) == list(theirs):
            continue
        ours_images = sum(token in placeholder_ids for token in ours)
        theirs_images = sum(token in placeholder_ids for token in theirs)
        raise ValueError(
            f"vLLM generated sample {index} from other prompt ids than the processor's: {len(theirs)} tokens "
            f"({theirs_images} image placeholders) instead of {len(ours)} ({ours_images}), model type "
            f"{config.model_type!r}. vLLM expanded the image placeholders differently or resized the image to another "
            f"grid, so its completions belong to another prompt. Ways out: a vLLM version inside TRL 1.16's range "
            f"(0.22-0.31), the recipe's min_pixels / max_pixels on the processor (cppo_trl hands them to vLLM), or "
            f"`use_vllm: false`."
        )


def check_server_features(features: dict | None, prompt_ids: Sequence[int], placeholder_ids: frozenset[int]) -> None:
    """Raise if the vLLM server's features of an image do not fill that image's run of placeholders: the server
    resized it with other pixel limits than the trainer's processor."""
    if features is None:
        return
    served = [placeholder["length"] for placeholder in features["mm_placeholders"]["image"]]
    ours = placeholder_run_lengths(prompt_ids, placeholder_ids)
    if len(served) == len(ours) and served != ours:
        raise ValueError(
            f"The vLLM server turned the images into {served} vision tokens where the trainer's processor has {ours}: "
            f"it resizes them with other pixel limits. Start it with the recipe's limits, e.g. "
            f"`trl vllm-serve --model ... --mm-processor-kwargs "
            f'\'{{"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}}\'`.'
        )


class VLLMFixes:
    """Installs the fixes above on a trainer's `VLLMGeneration` (TRL 1.16), by wrapping the four calls they concern."""

    def __init__(
        self, vllm_generation, config, placeholder_ids: frozenset[int], budget: PixelBudget | None, on_checked
    ):
        self.generation = vllm_generation
        self.config = config  # the policy's model config, for error messages
        self.placeholder_ids = placeholder_ids
        self.request_kwargs = {} if budget is None else {"mm_processor_kwargs": budget.processor_kwargs()}
        self.on_checked = on_checked  # called with the number of prompts whose ids were verified
        self.encoder_resets = 0
        generation = vllm_generation
        generation.generate = self._checked(generation.generate)
        generation.sync_weights = self._resetting_encoder_cache(generation.sync_weights)
        if generation.mode == "colocate":
            generation.llm.generate = self._one_placeholder_per_image(generation.llm.generate)
        else:
            generation._place_features = self._fitting(generation._place_features)

    def _checked(self, generate):
        def checked(prompts, images, num_generations, profiler=None):
            result = generate(prompts=prompts, images=images, num_generations=num_generations, profiler=profiler)
            check_prompt_ids(prompts, result[0], self.config, self.placeholder_ids)
            self.on_checked(len(prompts))
            return result

        return checked

    def _one_placeholder_per_image(self, llm_generate):
        def generate(prompts, *args, **kwargs):
            prompts = [self._request(prompt) for prompt in prompts]
            return llm_generate(prompts, *args, **kwargs)

        return generate

    def _request(self, prompt):
        if not isinstance(prompt, dict) or "multi_modal_data" not in prompt:
            return prompt
        ids = collapse_placeholder_runs(prompt["prompt_token_ids"], self.placeholder_ids)
        return {**prompt, "prompt_token_ids": ids, **self.request_kwargs}

    def _fitting(self, place_features):
        def place(features, prompt_ids):
            check_server_features(features, prompt_ids, self.placeholder_ids)
            return place_features(features, prompt_ids)

        return place

    def _resetting_encoder_cache(self, sync_weights):
        def sync():
            sync_weights()
            self.reset_encoder_cache()

        return sync

    def reset_encoder_cache(self) -> None:
        """Drop the vision embeddings vLLM computed with the previous weights."""
        generation = self.generation
        if generation.mode == "colocate":
            generation.llm.llm_engine.reset_encoder_cache()
        elif generation.accelerator.is_main_process:
            client = generation.vllm_client
            response = client.session.post(f"{client.base_url}/reset_encoder_cache")
            if response.status_code != 200:  # the route exists only in vLLM's dev mode, which `trl vllm-serve` sets
                logger.warning("the vLLM server did not reset its encoder cache (HTTP %s)", response.status_code)
                return
        self.encoder_resets += 1
