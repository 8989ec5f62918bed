"""`PerceptionGRPOTrainer`: the TRL glue CPPO and PAPO share, so each method's trainer only says which passes and which
loss. Relies on TRL 1.16 private hooks; `tests/test_trl_hooks.py` fails if any of them changes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import GRPOConfig, GRPOTrainer

from cppo_trl.core.images import PixelBudget
from cppo_trl.core.perception import aggregate_like_policy_loss
from cppo_trl.trainer.placeholders import cut_sampled_placeholder, placeholder_token_ids
from cppo_trl.trainer.rank_sync import PASS_PLAN_KEY, DummyVisionPass, agree_on_counts, dummy_row
from cppo_trl.trainer.views import (
    RolloutImages,
    SampleViews,
    rollout_images,
    row_images,
    view_forward_kwargs,
    with_rgb_images,
)
from cppo_trl.trainer.vllm import VLLMFixes


logger = logging.getLogger(__name__)


@dataclass
class AnchorCapture:
    """What the policy's own forward (the GRPO loss pass) yields for a perception loss: log-probs and entropies of the
    completion tokens with the original image, and optionally the backbone's last hidden states."""

    need_hidden: bool
    logps: torch.Tensor | None = None  # (B, T)
    entropies: torch.Tensor | None = None  # (B, T)
    hidden: torch.Tensor | None = None  # (B, L, H)


@dataclass
class ViewPass:
    """A teacher-forced pass of some rows with a view in place of their images."""

    logps: torch.Tensor  # (R, T)
    entropies: torch.Tensor | None  # (R, T)
    hidden: torch.Tensor | None  # (R, T, H): the state just before each completion token


class PerceptionGRPOTrainer(GRPOTrainer):
    """
    [`~trl.GRPOTrainer`] plus what a perception-aware method needs, and fixes to TRL 1.16 on vision-language data:

    1. Prompt images are normalised once, before TRL, the views and vLLM see them: 8-bit RGB (`to_rgb`), then resized
       to the processor's own pixel budget (`PixelBudget`), so every consumer computes the same vision-token grid.
    2. `_attach_views` (a subclass hook) stores per-sample views after rollouts are scored (`cppo_trl.trainer.views`).
    3. `anchor_capture()` captures the log-probs/entropies (and hidden states) of TRL's own policy forward in the loss,
       so the original-image pass is never recomputed; `_view_forward` runs the same forward with a view's tensors.
    4. `_aggregate_like_policy_loss` normalises a per-token term exactly like TRL normalises the policy loss for the
       configured `loss_type`, scaled for gradient accumulation the same way.
    5. Fixes to TRL on VLM data: a text-only prompt in a multimodal batch trains (TRL hands the processor `None`); a
       text-only rank does not deadlock the others in TRL's image logging; a completion containing an image
       placeholder token is cut before it; vLLM gets one placeholder per image and the recipe's pixel limits, its
       encoder cache is reset after every weight sync and its prompt ids are checked (`trainer.vllm`); resuming a
       transformers-5 VLM checkpoint reloads every weight.

    Subclasses set `_metric_prefix`, `_config_class` and `_name`, and override `_attach_views` and `_compute_loss`
    (calling `super()`).
    """

    _metric_prefix = "perception"
    _config_class = GRPOConfig  # the method's config; `args=None` builds a default one named after the model

    def _check_args(self, args) -> None:
        """Method-specific checks of `args` before TRL builds anything."""

    def __init__(self, model, reward_funcs=None, args=None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self._config_class(f"{model_name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self._config_class):
            raise TypeError(f"{type(self).__name__} needs a {self._config_class.__name__}, got {type(args).__name__}.")
        self._check_args(args)
        # `reward_funcs` is optional as in TRL 1.16: an `environment_factory` may own the reward.
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._anchor_capture: AnchorCapture | None = None
        self._pixel_budget = PixelBudget.from_processor(self.processing_class)
        # Image/video placeholder ids of the model: a completion must not sample them (see `_generate`).
        self._placeholder_ids = placeholder_token_ids(self._policy_lm(self.model).config)
        self._dataset_images: list[list | None] = []
        self._rollouts: list[RolloutImages] | None = None
        self._image_processor_only = False
        self._dummy: dict | None = None  # built on first use (`_dummy_forward`)
        # Sharded multi-process training: a forward without images still runs the vision tower (`rank_sync`).
        self._vision_passes: list[DummyVisionPass] = []
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if self.accelerator.num_processes > 1 and sharded and self._is_vlm:
            for module in (self.model, self.ref_model):
                if module is not None:
                    vlm = self._policy_lm(module).base_model
                    self._vision_passes.append(DummyVisionPass(vlm, self._dummy_row()))
        if self.use_vllm:  # one placeholder per image, the recipe's pixel limits, fresh vision embeddings, checked
            self._vllm_fixes = VLLMFixes(
                self.vllm_generation,
                self._policy_lm(self.model).config,
                self._placeholder_ids,
                self._pixel_budget,
                on_checked=self._count_vllm_prompts,
            )

    # ------------------------------------------------------------------ rollouts
    def _generate_and_score_completions(self, inputs):
        inputs = [with_rgb_images(row) for row in inputs]
        self._dataset_images = [row_images(row) for row in inputs]
        self._rollouts, self._gather_images_here = None, False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.log_multimodal = self.args.log_multimodal
        if self._gather_images_here:
            self._logs["images"].extend(gather_object([list(rollout.images) for rollout in self._rollouts]))
        # On every rank, images or not: a method's view passes may be collectives the ranks must agree on.
        self._attach_views(self._rollouts, output)
        return output

    def _attach_views(self, rollouts: list[RolloutImages], output: dict) -> None:
        """Store per-rollout views in `output`; `rollouts` say which images each rollout's policy saw (a batch
        without any image comes here too, so that collectives in a method's view passes line up across ranks)."""

    def _generate(self, prompts: list):
        """TRL 1.16's generation, then what the rails need from it:

        - A prompt without image in a multimodal batch comes back with `None` images, which TRL then hands to the
          processor, which rejects `None`: an empty list is what the processor (and `num_images`) expect.
        - A completion in which the policy *sampled* an image placeholder (`placeholders.cut_sampled_placeholder`) is
          cut just before it, with its `logprobs`/`tool_mask` and any tool image whose placeholders the cut removed,
          and its text re-decoded as one assistant message so rewards score what is trained; it no longer ends with
          EOS, so TRL counts it as truncated. Placeholders TRL inserted for a tool's image (`tool_mask` 0) stay. The
          count is logged as `<prefix>/truncated_at_image_token`.
        - Every image each rollout saw is recorded (`RolloutImages`: the prompt's, an environment's observation, the
          tools'), with the processor path TRL takes for the forward pass, for `_attach_views`.
        - With several processes, TRL gathers images for logging only on ranks that have some, and the others wait
          forever: the ranks agree in the same all-reduce as the cut count, and when they disagree TRL's gather is
          switched off for this batch and `_generate_and_score_completions` gathers on every rank instead.
        """
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = (
            super()._generate(prompts)
        )
        if images is not None and any(image_list for image_list in images):
            images = [image_list or [] for image_list in images]
        truncated = 0
        for i, ids in enumerate(completion_ids):
            cut = cut_sampled_placeholder(
                ids,
                None if logprobs is None else logprobs[i],
                None if tool_mask is None else tool_mask[i],
                self._placeholder_ids,
                self.eos_token_ids[0],
            )
            if cut is None:
                continue
            truncated += 1
            completion_ids[i] = cut.completion_ids
            if logprobs is not None:
                logprobs[i] = cut.logprobs
            if tool_mask is not None:
                tool_mask[i] = cut.tool_mask
            if tool_images and len(tool_images[i]) > cut.tool_images_kept:
                dropped = len(tool_images[i]) - cut.tool_images_kept
                tool_images[i] = tool_images[i][: cut.tool_images_kept]
                images[i] = images[i][: len(images[i]) - dropped]
            text = self.processing_class.decode(completion_ids[i], skip_special_tokens=True)
            completions[i] = [{"role": "assistant", "content": text}] if isinstance(completions[i], list) else text
        self._image_processor_only = bool(self._is_vlm and self.tools and tool_images and any(tool_images))
        self._rollouts = rollout_images(
            prompts, images, tool_images, self._dataset_images, self._tools_per_prompt(len(prompts))
        )
        has_images = images is not None or any(rollout.images for rollout in self._rollouts)
        total_truncated, ranks_with_images = self._reduce_sums(
            {"truncated": truncated, "images": float(has_images)}, ("truncated", "images")
        ).values()
        if self.args.log_multimodal and ranks_with_images not in (0, self.accelerator.num_processes):
            self.log_multimodal, self._gather_images_here = False, True
        self._metrics[self._mode][f"{self._metric_prefix}/truncated_at_image_token"].append(total_truncated)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _tools_per_prompt(self, count: int) -> list[list | None]:
        """The tools each prompt was rendered with (TRL 1.16: an environment's own, else the trainer's)."""
        if self.environment_factories is not None:
            return [self._env_tools[name] for name in self._batch_environments]
        return [self.tools or None] * count

    def _count_vllm_prompts(self, count: int) -> None:
        self._metrics[self._mode][f"{self._metric_prefix}/vllm_prompts_checked"].append(float(count))

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    # ------------------------------------------------------------------ checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """transformers 5 saves VLMs under their Hub key names (`save_pretrained` reverses the in-memory renaming, e.g.
        Qwen2.5-VL `model.visual.*` -> `visual.*`), but `Trainer._load_from_checkpoint` loads the raw file with
        `strict=False`: every renamed weight is silently skipped and the run resumes from the initial weights. When the
        saved names are not the model's, reload them through `from_pretrained`, which applies the renaming."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        if is_peft_model(unwrapped) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # their own loaders (adapter files, engine/FSDP state) do not go through the raw state dict
        single = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        index = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(single):
            with safe_open(single, "pt") as f:
                saved = set(f.keys())
        elif os.path.isfile(index):
            with open(index) as f:
                saved = set(json.load(f)["weight_map"])
        else:
            return
        if saved <= set(unwrapped.state_dict()):
            return  # names match: `super()` loaded them
        dtype = next(unwrapped.parameters()).dtype
        reloaded = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=dtype)
        unwrapped.load_state_dict(reloaded.state_dict())

    # ------------------------------------------------------------------ the same passes on every rank
    def _prepare_inputs(self, generation_batch):
        """TRL 1.16 generates a generation batch and splits it into micro-batches, kept in `_buffered_inputs` and reused
        for `num_iterations`. Right after a split (in eval: for each batch), with several processes, the ranks agree in
        ONE collective on how many view passes each micro-batch's loss runs, so that every rank runs as many
        (`rank_sync`); the count rides with the micro-batch under `PASS_PLAN_KEY`."""
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self.accelerator.num_processes > 1:
            if not self.model.training:
                self._agree_on_view_passes([inputs])
            elif self._buffered_inputs is not buffered:
                self._agree_on_view_passes(self._buffered_inputs)
        return inputs

    def _agree_on_view_passes(self, batches: list[dict]) -> None:
        agreed = agree_on_counts([self._view_passes(batch) for batch in batches], self.accelerator)
        for batch, passes in zip(batches, agreed, strict=True):
            batch[PASS_PLAN_KEY] = passes

    def _agreed_passes(self, local: int) -> int:
        """The largest of every rank's `local` pass count (one collective), or `local` with one process."""
        return local if self.accelerator.num_processes == 1 else agree_on_counts([local], self.accelerator)[0]

    def _view_passes(self, inputs) -> int:
        """How many forwards per view this rank's loss would run on micro-batch `inputs` (a subclass hook)."""
        return 0

    def _dummy_row(self) -> dict:
        if self._dummy is None:
            self._dummy = dummy_row(self.processing_class, self._pixel_budget, self.eos_token_ids[0])
        return self._dummy

    def _dummy_forward(self, model, compute_entropy: bool = False) -> list[torch.Tensor]:
        """One pass of the one-row dummy (`rank_sync.dummy_row`) through the parent's forward, standing in for a pass
        this rank has no rows for; returns its outputs, for `rank_sync.zero_weighted`."""
        device = self.accelerator.device
        row = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self._dummy_row().items()}
        logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            self,
            model,
            row.pop("input_ids"),
            row.pop("attention_mask"),
            row.pop("completion_length"),
            compute_entropy=compute_entropy,
            **row,
        )
        return [logps, entropies]

    # ------------------------------------------------------------------ the anchor: TRL's own policy forward
    @contextmanager
    def anchor_capture(self, need_hidden: bool) -> Iterator[AnchorCapture]:
        """Within the block, the first policy forward (TRL's loss pass) records its outputs in the yielded capture."""
        self._anchor_capture = AnchorCapture(need_hidden=need_hidden)
        try:
            yield self._anchor_capture
        finally:
            self._anchor_capture = None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with self._vision_passes_active():
            return self._forward_capturing_the_anchor(model, *args, **kwargs)

    @contextmanager
    def _vision_passes_active(self) -> Iterator[None]:
        """TRL's own forwards (policy, reference, old log-probs) run the dummy vision pass when text-only."""
        with ExitStack() as stack:
            for vision in self._vision_passes:
                stack.enter_context(vision.active())
            yield

    def _forward_capturing_the_anchor(self, model, *args, **kwargs):
        capture = self._anchor_capture
        if capture is None or capture.logps is not None:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        with self._hidden_states(model) if capture.need_hidden else nullcontext([]) as hidden:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        capture.logps, capture.entropies = logps, entropies
        capture.hidden = torch.cat(hidden, dim=0) if hidden else None
        return logps, entropies, aux_loss

    def _policy_lm(self, model):
        """The model carrying TRL's fused LM head (PEFT's base model when an adapter is trained)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    @contextmanager
    def _hidden_states(self, model) -> Iterator[list[torch.Tensor]]:
        """Collect the backbone's last hidden states; TRL 1.16's fused head runs `model.base_model` then the head."""
        collected: list[torch.Tensor] = []

        def hook(module, args, output):
            collected.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self._policy_lm(model).base_model.register_forward_hook(hook)
        try:
            yield collected
        finally:
            handle.remove()

    # ------------------------------------------------------------------ view passes and the extra loss
    def _view_forward(
        self,
        model,
        inputs: dict[str, Any],
        views: Sequence[SampleViews],
        rows: torch.Tensor,
        name: str,
        compute_entropy: bool = False,
        need_hidden: bool = False,
    ) -> ViewPass:
        """Teacher-forced pass of `rows` (their prompt + completion tokens) with view `name` in place of their images,
        through the parent's own forward (TRL 1.16 `_get_per_token_logps_and_entropies`), so it scores exactly like
        the policy pass."""
        completion_length = inputs["completion_ids"].size(1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)[rows]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)[rows]
        kwargs = view_forward_kwargs(views, name, inputs, rows, inputs["completion_ids"].device)
        with self._hidden_states(model) if need_hidden else nullcontext([]) as hidden:
            logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self, model, input_ids, attention_mask, completion_length, compute_entropy=compute_entropy, **kwargs
            )
        completion_hidden = _completion_hidden(torch.cat(hidden), completion_length) if hidden else None
        return ViewPass(logps, entropies, completion_hidden)

    def _loss_mask(self, inputs) -> torch.Tensor:
        """The tokens TRL 1.16's policy loss counts: completion mask times tool mask."""
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]  # (B, T)

    def _aggregate_like_policy_loss(self, row_sums: torch.Tensor, inputs, mode: str) -> torch.Tensor:
        """Batch value of a per-token term from its per-row masked sums (B,), normalised like TRL 1.16's policy loss
        for `loss_type` and scaled for gradient accumulation the same way."""
        mask = self._loss_mask(inputs)
        tokens_per_micro_batch = None
        if self.loss_type in ("dapo", "cispo", "vespo"):
            # TRL 1.16: `num_items_in_batch` counts the whole generation batch's tokens over all processes.
            tokens_per_micro_batch = inputs["num_items_in_batch"] / self.accelerator.num_processes
            if mode == "train":
                tokens_per_micro_batch = tokens_per_micro_batch / self.args.steps_per_generation
        value = aggregate_like_policy_loss(
            row_sums,
            mask.sum(-1),
            self.loss_type,
            max_completion_length=self.max_completion_length,
            tokens_per_micro_batch=tokens_per_micro_batch,
        )
        return value / (self.current_gradient_accumulation_steps if mode == "train" else 1)

    def _reduce_sums(self, stats: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
        """Sum `stats[k]` (0 when absent) over processes in ONE collective, identical on every rank whatever its rows."""
        device = self.accelerator.device
        local = torch.stack([torch.as_tensor(stats.get(k, 0.0), device=device, dtype=torch.float32) for k in keys])
        return dict(zip(keys, self.accelerator.reduce(local, reduction="sum").tolist(), strict=True))


def _completion_hidden(hidden: torch.Tensor, completion_length: int) -> torch.Tensor:
    """(B, L, H) -> (B, T, H): the hidden state at position p predicts token p + 1, so completion token t is scored
    from the state just before it."""
    return hidden[:, -completion_length - 1 : -1]
