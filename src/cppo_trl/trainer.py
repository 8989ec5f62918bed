"""`CPPOTrainer`: TRL's `GRPOTrainer` plus the Contrastive Perception Loss, through three narrow hooks."""

import json
import logging
import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template, prepare_multimodal_messages

from .config import CPPOConfig
from .perception import (
    CPL_LOSS_TYPES,
    aggregate_cpl,
    contrastive_loss_from_divergences,
    full_kl,
    k3_divergence,
    select_perception_tokens,
)
from .perturbations import make_views_for_sample, sample_key, to_rgb


logger = logging.getLogger(__name__)

VIEWS_KEY = "cppo_views"
"""Key of the per-sample view storage in TRL's generation batch. A list (one entry per rollout) is permuted and split
by TRL's `shuffle_sequence_dict`/`split_tensor_dict` together with the other rows; a flat tensor would not be."""

# Vision tensors TRL keeps from the processor and passes to `_get_per_token_logps_and_entropies` (TRL 1.16,
# `_generate_and_score_completions` output). Text-side tensors (`token_type_ids`, `mm_token_type_ids`) are shared by
# all views because the prompt tokens are checked to be identical.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")
TEXT_SIDE_KEYS = ("token_type_ids", "mm_token_type_ids")

# Order of the per-micro-batch statistics reduced across processes in one collective.
_STATS = (
    "cpl_loss",
    "rows",
    "gated_rows",
    "extra_pass_rows",
    "completion_tokens",
    "selected_tokens",
    "entropy_shift_sum",
    "entropy_shift_count",
    "divergence_preserved_sum",
    "divergence_removed_sum",
    "nonfinite_skipped",
)


@dataclass
class _AnchorCapture:
    """What the policy's own forward (the GRPO loss pass) yields for CPL: the anchor of Eq. 7."""

    need_hidden: bool
    logps: torch.Tensor | None = None  # (B, T)
    entropies: torch.Tensor | None = None  # (B, T)
    hidden: torch.Tensor | None = None  # (B, L, H), only for divergence="full"


@dataclass
class _ViewPass:
    logps: torch.Tensor  # (R, T)
    entropies: torch.Tensor | None  # (R, T)
    hidden: torch.Tensor | None  # (R, L, H)


def _row_images(row: dict[str, Any]) -> list | None:
    if row.get("images") is not None:
        return list(row["images"])
    if row.get("image") is not None:
        return [row["image"]]
    return None


def _with_rgb_images(row: dict[str, Any]) -> dict[str, Any]:
    """Normalise the row's images to 8-bit RGB once, so the processor (anchor) and the views see the same pixels."""
    if row.get("images") is not None:
        return {**row, "images": [to_rgb(image) for image in row["images"]]}
    if row.get("image") is not None:
        return {**row, "image": to_rgb(row["image"])}
    return row


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample tensors on dim 0, zero-padding other dims when samples differ (e.g. Idefics3 pads
    `pixel_values` to the largest image count of the batch; zero rows are masked by `pixel_attention_mask`)."""
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors, dim=0)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *shape))
        out[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded, dim=0)


class CPPOTrainer(GRPOTrainer):
    """
    Trainer for CPPO (Contrastive Perception Policy Optimization): GRPO plus a Contrastive Perception Loss (CPL).

    What differs from [`~trl.GRPOTrainer`] (equation numbers of the CPPO paper):

    1. Prompt images are normalised to 8-bit RGB (EXIF orientation applied, alpha composited on white, 16-bit scaled)
       before TRL processes them, so the anchor and the views see the same pixels.
    2. After rollouts are scored, every prompt with at least one rollout that the gate keeps (advantage > 0, Eq. 10)
       gets one information-preserving view I⁺ and one information-removing view I⁻ per image, shared by its
       rollouts and derived from (seed, step, prompt) so resume and every rank reproduce them. Each view is processed
       with the same prompt text, checked to yield the same prompt tokens, and stored per sample (`cppo_views`).
    3. The policy forward of TRL's loss is the anchor: its log-probs and entropies (and its last hidden states when
       `cpl_divergence="full"`) are captured, never recomputed. Only gated rows get the two extra passes: I⁻ gives
       the entropy shift ΔH and the top-K perception tokens (Eqs. 3-6), I⁺ the positive; the InfoNCE loss (Eq. 7) on
       those tokens is aggregated like the policy loss (Eqs. 8-9) and added as λ·CPL (Eq. 10). Full-vocabulary logits
       exist only for the selected positions, a chunk at a time, rebuilt in backward.

    Inherited unchanged: generation (transformers or vLLM), rewards, group advantages, the clipped policy loss of every
    `loss_type`, the reference KL (β, original image only), gradient accumulation, PEFT, eval, logging and Hub push.

    Relies on TRL 1.16's `_generate_and_score_completions(inputs)`, `_compute_loss(model, inputs)` computing the policy
    log-probs with exactly one `_get_per_token_logps_and_entropies(..., compute_entropy=True)` call, and the fused LM
    head calling the model's `base_model` (see `tests/test_trl_hooks.py`, which fails if they change).
    """

    _tag_names = ["trl", "grpo", "cppo"]
    _name = "CPPO"
    _paper = {
        "title": "CPPO: Contrastive Perception for Vision Language Policy Optimization",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{cppo2025,
                title        = {{CPPO: Contrastive Perception for Vision Language Policy Optimization}},
                year         = 2025,
            }"""),
    }

    def __init__(self, model, reward_funcs, args: CPPOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = CPPOConfig(f"{model_name.split('/')[-1]}-CPPO")
        if not isinstance(args, CPPOConfig):
            raise TypeError(f"CPPOTrainer needs a CPPOConfig, got {type(args).__name__}.")
        if args.cpl_weight > 0 and args.loss_type not in CPL_LOSS_TYPES:
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported by CPPOTrainer; use one of {CPL_LOSS_TYPES}."
            )
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        sharded = is_deepspeed_zero3_enabled() or self.is_fsdp_enabled
        if args.cpl_weight > 0 and args.cpl_view_checkpointing and sharded:
            raise ValueError(
                "cpl_view_checkpointing recomputes the views with the unwrapped model in backward, which DeepSpeed "
                "ZeRO-3 and FSDP shard; use DDP / ZeRO-2, or cpl_view_checkpointing=False."
            )
        if args.cpl_weight > 0 and args.cpl_divergence == "full" and sharded:
            raise ValueError(
                "cpl_divergence='full' projects hidden states through the LM head weight directly, which DeepSpeed "
                "ZeRO-3 and FSDP shard. Use cpl_divergence='k3' (the released code's estimate) with them, or "
                "DDP / ZeRO-2 (recipes/accelerate_configs/zero2.yaml)."
            )
        self._anchor_capture: _AnchorCapture | None = None
        self._perturbation_params = args.perturbation_params
        self._logit_scale, self._logit_softcap = _logit_transform(self._policy_lm(self.model).config)
        # Image/video placeholder ids of the model: a completion must not contain them (see `_generate`).
        self._placeholder_ids = _placeholder_token_ids(self._policy_lm(self.model).config)

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

    # ------------------------------------------------------------------ hook 1: views at rollout time
    def _generate_and_score_completions(self, inputs):
        inputs = [_with_rgb_images(row) for row in inputs]
        output = super()._generate_and_score_completions(inputs)
        if self.args.cpl_weight > 0 and output.get("num_images") is not None:
            output[VIEWS_KEY] = self._build_views(inputs, output)
        return output

    def _generate(self, prompts: list):
        """TRL 1.16 returns `None` for a prompt without image in a multimodal batch, and then passes that list to the
        processor, which rejects `None`; an empty list is what the processor (and `num_images`) expect.

        A completion containing an image/video placeholder token (possible with vLLM, a custom `rollout_func` or
        `generation_kwargs` overriding TRL's `suppress_tokens`) makes every later forward fail: the model finds more
        placeholder tokens than image features. Such a completion is cut just before its first placeholder (its
        `logprobs`/`tool_mask` entries too) and its text re-decoded, so rewards score what is trained; the cut
        completion no longer ends with EOS, so TRL counts it as truncated (`mask_truncated_completions` masks it). A
        completion that would become empty keeps one EOS token (sampling log-prob unknown: NaN, which TRL
        neutralises). The count is logged as `cppo/truncated_at_image_token`."""
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = (
            super()._generate(prompts)
        )
        if images is not None and any(image_list for image_list in images):
            images = [image_list or [] for image_list in images]
        truncated = 0
        if self._placeholder_ids:
            for i, ids in enumerate(completion_ids):
                cut = next((t for t, token in enumerate(ids) if token in self._placeholder_ids), None)
                if cut is None:
                    continue
                truncated += 1
                completion_ids[i] = list(ids[:cut]) if cut > 0 else [self.eos_token_ids[0]]
                if logprobs is not None:
                    logprobs[i] = list(logprobs[i][:cut]) if cut > 0 else [None]
                if tool_mask is not None:
                    tool_mask[i] = list(tool_mask[i][:cut]) if cut > 0 else [1]
                text = self.processing_class.decode(completion_ids[i], skip_special_tokens=True)
                completions[i] = [{"role": "assistant", "content": text}] if isinstance(completions[i], list) else text
        mode = "train" if self.model.training else "eval"
        total = self.accelerator.reduce(torch.tensor(float(truncated), device=self.accelerator.device), "sum")
        self._metrics[mode]["cppo/truncated_at_image_token"].append(total.item())
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _gate(self, advantages: torch.Tensor) -> torch.Tensor:
        advantages = advantages if advantages.dim() == 1 else advantages[:, 0]
        if self.args.advantage_gating:
            return advantages > 0  # (B,)
        return torch.ones_like(advantages, dtype=torch.bool)

    def _build_views(self, inputs: list[dict], output: dict) -> list[dict | None]:
        """Per rollout: the processed vision tensors of its prompt's I⁺ and I⁻ (and, under `names`, which transform
        drew each view of each image, for inspection), or None if it gets no CPL."""
        gate = self._gate(output["advantages"]).tolist()
        prompt_ids = output["prompt_ids"].cpu()
        prompt_mask = output["prompt_mask"].bool().cpu()
        # Per-image layout tensors of the original batch, per row, to check each view against (same grid / size).
        layout = {
            k: torch.split(output[k].cpu(), output["num_images"])
            for k in ("image_grid_thw", "image_sizes")
            if k in output
        }
        views_by_key: dict[bytes, dict] = {}
        views: list[dict | None] = []
        for i, row in enumerate(inputs):
            images = _row_images(row)
            if not gate[i] or not images:
                views.append(None)
                continue
            prompt = prepare_multimodal_messages(row["prompt"], images=images)
            text = apply_chat_template(
                {"prompt": prompt}, self.processing_class, tools=self.tools or None, **self.chat_template_kwargs
            )["prompt"]
            key = sample_key(text, images)
            if key not in views_by_key:
                expected = prompt_ids[i][prompt_mask[i]]
                views_by_key[key] = self._process_views(i, text, images, key, expected)
                for k, per_row in layout.items():
                    if not torch.equal(views_by_key[key]["removed"][k].cpu(), per_row[i]):
                        raise ValueError(f"Sample {i}: the views' `{k}` differs from the original image's.")
            views.append(views_by_key[key])
        return views

    def _process_views(self, index: int, text: str, images: list, key: bytes, expected_ids: torch.Tensor) -> dict:
        image_views = make_views_for_sample(
            images, self._perturbation_params, self.args.seed, self.state.global_step, key
        )
        processed = {}
        for which in ("preserved", "removed"):
            view_images = [getattr(v, which) for v in image_views]
            # Same token count can still hide another layout (Qwen: a 224x56 view has the 112x112 image's 16 tokens
            # but another `image_grid_thw`), so every view must keep its image's size (SPEC §4), checked first.
            for n, (view, image) in enumerate(zip(view_images, images, strict=True)):
                if view.size != image.size:
                    raise ValueError(
                        f"Sample {index}, image {n}: the {which} view is {view.size[0]}x{view.size[1]} but the image "
                        f"is {image.size[0]}x{image.size[1]}; CPPO views must keep the original size so that the "
                        f"vision-token layout does not change."
                    )
            encoded = self.processing_class(images=[view_images], text=[text], return_tensors="pt")
            ids = encoded["input_ids"][0]
            if ids.shape != expected_ids.shape or not torch.equal(ids, expected_ids):
                raise ValueError(
                    f"Sample {index}: the processor gives {ids.numel()} prompt tokens for the {which} view but "
                    f"{expected_ids.numel()} for the original image. CPPO needs views with the same vision-token "
                    f"layout; this processor ({type(self.processing_class).__name__}) changes it under a view."
                )
            processed[which] = {k: encoded[k] for k in VISION_KEYS if k in encoded}
        for k, tensor in processed["preserved"].items():
            if tensor.shape != processed["removed"][k].shape:
                raise ValueError(f"Sample {index}: `{k}` differs in shape between the two views.")
        processed["names"] = [(v.preserving_name, v.removing_name) for v in image_views]
        return processed

    # ------------------------------------------------------------------ hook 2: capture the anchor
    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
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

    # ------------------------------------------------------------------ hook 3: add λ·CPL to TRL's loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        rows = self._cpl_rows(inputs)
        if rows.numel() == 0:
            loss = super()._compute_loss(model, inputs)
            self._log_cpl_stats(mode, inputs, rows, {})
            return loss
        self._anchor_capture = _AnchorCapture(need_hidden=self.args.cpl_divergence == "full")
        try:
            loss = super()._compute_loss(model, inputs)
            anchor = self._anchor_capture
        finally:
            self._anchor_capture = None
        cpl, stats = self._contrastive_perception_loss(model, inputs, rows, anchor, mode)
        self._log_cpl_stats(mode, inputs, rows, stats)
        return loss + self.args.cpl_weight * cpl

    def _loss_mask(self, inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]  # (B, T)

    def _cpl_rows(self, inputs) -> torch.Tensor:
        """Rows that get the extra passes: gated in, with views (hence images), with at least one loss token."""
        device = inputs["completion_ids"].device
        views = inputs.get(VIEWS_KEY)
        if self.args.cpl_weight == 0 or views is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        has_tokens = self._loss_mask(inputs).sum(-1) > 0
        has_views = torch.tensor([v is not None for v in views], device=device)
        keep = self._gate(inputs["advantages"]) & has_tokens & has_views
        return keep.nonzero(as_tuple=True)[0]

    def _view_pass(self, model, inputs, rows, which: str, need_hidden: bool) -> _ViewPass:
        """Teacher-forced passes of the gated rows' prompt+completion tokens with a view's vision tensors.

        With `cpl_view_checkpointing`, every `cpl_view_micro_batch_size` rows form one checkpointed region: their
        activations are dropped after the forward and rebuilt in backward, so the views hold one micro-batch of
        activations instead of all gated rows', for one more forward of the gated rows.
        """
        size = self.args.cpl_view_micro_batch_size or rows.numel()
        checkpointed = self.args.cpl_view_checkpointing and torch.is_grad_enabled()
        # The recompute runs inside backward: call the bare module, not a DDP wrapper that would re-arm its reducer.
        module = self.accelerator.unwrap_model(model) if checkpointed else model
        parts = []
        for start in range(0, rows.numel(), size):
            args = (module, inputs, rows[start : start + size], which, need_hidden)
            parts.append(
                checkpoint(self._view_forward, *args, use_reentrant=False)
                if checkpointed
                else self._view_forward(*args)
            )
        logps, entropies, hidden = (None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))
        return _ViewPass(logps, entropies, hidden)

    def _view_forward(self, model, inputs, rows, which: str, need_hidden: bool):
        """(logps (R, T), entropies (R, T) for I⁻ else None, hidden states before each completion token (R, T, H))."""
        idx = rows.tolist()
        device = inputs["completion_ids"].device
        completion_length = inputs["completion_ids"].size(1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)[rows]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)[rows]
        per_sample = [inputs[VIEWS_KEY][i][which] for i in idx]
        kwargs = {k: _stack_padded([s[k] for s in per_sample]).to(device) for k in per_sample[0]}
        kwargs.update({k: inputs[k][rows] for k in TEXT_SIDE_KEYS if inputs.get(k) is not None})
        with self._hidden_states(model) if need_hidden else nullcontext([]) as hidden:
            logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_length,
                compute_entropy=which == "removed",
                num_images=[inputs["num_images"][i] for i in idx],
                **kwargs,
            )
        return logps, entropies, _completion_hidden(torch.cat(hidden), completion_length) if hidden else None

    def _contrastive_perception_loss(self, model, inputs, rows, anchor: _AnchorCapture, mode: str):
        args = self.args
        full = args.cpl_divergence == "full"
        mask = self._loss_mask(inputs)[rows]  # (R, T)
        grad_ctx = nullcontext() if args.cpl_grad_through_views else torch.no_grad()
        with grad_ctx:
            removed = self._view_pass(model, inputs, rows, "removed", need_hidden=full)
        anchor_entropy = anchor.entropies[rows].detach()  # (R, T)
        entropy_shift = removed.entropies.detach() - anchor_entropy  # (R, T)
        if args.perception_token_selection:
            selected = select_perception_tokens(
                anchor_entropy,
                removed.entropies.detach(),
                mask,
                args.perception_top_fraction,
                args.perception_score,
                k_rule=args.perception_k_rule,
            )
        else:
            selected = mask.bool()
        stats = {
            "entropy_shift_sum": (entropy_shift * mask).sum(),
            "entropy_shift_count": mask.sum(),
            "selected_tokens": selected.sum(),
        }
        zero = torch.zeros((), device=mask.device)
        if not selected.any():
            return zero, stats
        with grad_ctx:
            preserved = self._view_pass(model, inputs, rows, "preserved", need_hidden=full)

        positions = selected.nonzero(as_tuple=True)  # N selected (row, t) pairs
        if full:
            per_token, d_pos, d_neg = self._full_cpl_at(
                model, anchor.hidden[rows], preserved, removed, positions, mask
            )
        else:
            d_pos = k3_divergence(anchor.logps[rows][positions], preserved.logps[positions])  # (N,)
            d_neg = k3_divergence(anchor.logps[rows][positions], removed.logps[positions])  # (N,)
            per_token = contrastive_loss_from_divergences(d_pos, d_neg, args.cpl_temperature)  # (N,)
        stats["divergence_preserved_sum"] = d_pos.detach().sum()
        stats["divergence_removed_sum"] = d_neg.detach().sum()
        if not torch.isfinite(per_token).all():
            # A non-finite view (e.g. overflowing logits) must not poison the weights: drop CPL for this micro-batch.
            stats["nonfinite_skipped"] = torch.ones((), device=mask.device)
            stats["divergence_preserved_sum"] = stats["divergence_removed_sum"] = zero
            return zero, stats
        cpl = self._aggregate(per_token, positions, rows, inputs, mode)
        stats["cpl_loss"] = cpl.detach() * (self.current_gradient_accumulation_steps if mode == "train" else 1)
        return cpl, stats

    def _full_cpl_at(self, model, anchor_hidden, preserved: _ViewPass, removed: _ViewPass, positions, mask):
        """InfoNCE with full-vocabulary KL at the selected positions only, `cpl_chunk_size` positions at a time.

        Each chunk is checkpointed, so its three (chunk, V) logits are freed after the forward and rebuilt in backward.
        """
        anchor_hidden = _completion_hidden(anchor_hidden, mask.size(1))
        hidden = [h[positions] for h in (anchor_hidden, preserved.hidden, removed.hidden)]  # (N, H)
        head = self._policy_lm(model).get_output_embeddings()
        losses, d_pos, d_neg = [], [], []
        for start in range(0, hidden[0].size(0), self.args.cpl_chunk_size):
            chunk = [h[start : start + self.args.cpl_chunk_size] for h in hidden]
            if torch.is_grad_enabled():
                out = checkpoint(self._chunk_cpl, head.weight, head.bias, *chunk, use_reentrant=False)
            else:
                out = self._chunk_cpl(head.weight, head.bias, *chunk)
            for acc, value in zip((losses, d_pos, d_neg), out, strict=True):
                acc.append(value)
        return torch.cat(losses), torch.cat(d_pos), torch.cat(d_neg)

    def _chunk_cpl(self, weight, bias, anchor_h, preserved_h, removed_h):
        anchor, preserved, removed = (self._project(h, weight, bias) for h in (anchor_h, preserved_h, removed_h))
        d_pos, d_neg = full_kl(anchor, preserved), full_kl(anchor, removed)  # (n,)
        return contrastive_loss_from_divergences(d_pos, d_neg, self.args.cpl_temperature), d_pos, d_neg

    def _project(self, hidden, weight, bias) -> torch.Tensor:
        """Vocabulary logits as TRL 1.16's fused LM head scores them: scale, soft-cap, then sampling temperature."""
        with torch.autocast(hidden.device.type, enabled=False):  # float32 logits even under bf16/fp16 autocast
            logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        logits = logits * self._logit_scale
        if self._logit_softcap is not None:
            logits = self._logit_softcap * torch.tanh(logits / self._logit_softcap)
        return logits / self.temperature  # (n, V)

    def _aggregate(self, per_token, positions, rows, inputs, mode: str) -> torch.Tensor:
        """Aggregate the selected-token losses into one scalar, scaled for gradient accumulation like the policy loss."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.args.cpl_aggregation == "selected_tokens":  # released: token-mean over the selected tokens
            return per_token.mean() / accumulation
        mask = self._loss_mask(inputs)
        row_sums = mask.new_zeros(mask.size(0), dtype=per_token.dtype).index_add(0, rows[positions[0]], per_token)
        tokens_per_micro_batch = None
        if self.loss_type in ("dapo", "cispo", "vespo"):
            # TRL 1.16: `num_items_in_batch` counts the whole generation batch's tokens over all processes.
            tokens_per_micro_batch = inputs["num_items_in_batch"] / self.accelerator.num_processes
            if mode == "train":
                tokens_per_micro_batch = tokens_per_micro_batch / self.args.steps_per_generation
        cpl = aggregate_cpl(
            row_sums,
            mask.sum(-1),
            self.loss_type,
            max_completion_length=self.max_completion_length,
            tokens_per_micro_batch=tokens_per_micro_batch,
        )
        return cpl / accumulation

    def _log_cpl_stats(self, mode: str, inputs, rows, stats: dict) -> None:
        """One collective per micro-batch, identical on every rank whatever its rows, then ratios of global sums."""
        device = inputs["completion_ids"].device
        mask = self._loss_mask(inputs)
        stats = {
            **stats,
            "rows": mask.size(0),
            "gated_rows": self._gate(inputs["advantages"]).sum(),
            "extra_pass_rows": rows.numel(),
            "completion_tokens": mask.sum(),
        }
        local = torch.stack([torch.as_tensor(stats.get(k, 0.0), device=device, dtype=torch.float32) for k in _STATS])
        total = dict(zip(_STATS, self.accelerator.reduce(local, reduction="sum").tolist(), strict=True))
        metrics = self._metrics[mode]
        metrics["cppo/cpl_loss"].append(total["cpl_loss"] / self.accelerator.num_processes)
        metrics["cppo/gated_fraction"].append(total["gated_rows"] / max(total["rows"], 1))
        metrics["cppo/extra_pass_rows"].append(total["extra_pass_rows"])
        metrics["cppo/selected_token_fraction"].append(total["selected_tokens"] / max(total["completion_tokens"], 1))
        metrics["cppo/nonfinite_skipped"].append(total["nonfinite_skipped"])
        if total["entropy_shift_count"] > 0:
            metrics["cppo/entropy_shift_mean"].append(total["entropy_shift_sum"] / total["entropy_shift_count"])
        if total["selected_tokens"] > 0:
            metrics["cppo/divergence_preserved"].append(total["divergence_preserved_sum"] / total["selected_tokens"])
            metrics["cppo/divergence_removed"].append(total["divergence_removed_sum"] / total["selected_tokens"])


def _placeholder_token_ids(config) -> frozenset[int]:
    """Token ids the model replaces with vision features (`image_token_id`/`image_token_index`, video likewise)."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return frozenset(getattr(config, n) for n in names if isinstance(getattr(config, n, None), int))


def _completion_hidden(hidden: torch.Tensor, completion_length: int) -> torch.Tensor:
    """(B, L, H) -> (B, T, H): the hidden state at position p predicts token p + 1, so completion token t is scored
    from the state just before it."""
    return hidden[:, -completion_length - 1 : -1]


def _logit_transform(config) -> tuple[float, float | None]:
    """(logit scale, final soft-cap) of the LM head, read from the text config as TRL 1.16's `add_fused_lm_head` does."""
    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None) if scale is None else scale
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)
