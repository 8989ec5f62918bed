"""`CPPOTrainer`: TRL's `GRPOTrainer` plus the Contrastive Perception Loss, on the shared perception rails."""

import logging
import math
import textwrap
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from cppo_trl.core.images import to_rgb
from cppo_trl.core.perception import (
    POLICY_LOSS_TYPES,
    contrastive_loss_from_divergences,
    full_kl,
    k3_divergence,
    select_perception_tokens,
)
from cppo_trl.core.perturbations import make_views_for_sample
from cppo_trl.trainer.cppo_config import CPPOConfig
from cppo_trl.trainer.perception_grpo_trainer import AnchorCapture, PerceptionGRPOTrainer, ViewPass, _completion_hidden
from cppo_trl.trainer.rank_sync import PASS_PLAN_KEY, zero_weighted
from cppo_trl.trainer.views import RolloutImages, ViewImages, build_sample_views


logger = logging.getLogger(__name__)

VIEWS_KEY = "cppo_views"
"""Key of the per-sample view storage (`cppo_trl.trainer.views.SampleViews` per rollout) in TRL's generation batch."""
PRESERVED, REMOVED = "preserved", "removed"

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


class CPPOTrainer(PerceptionGRPOTrainer):
    """
    Trainer for CPPO (Contrastive Perception Policy Optimization): GRPO plus a Contrastive Perception Loss (CPL).

    What differs from [`~trl.GRPOTrainer`] (equation numbers of the CPPO paper), on the rails of
    [`PerceptionGRPOTrainer`] (images normalised to the pixel budget, views stored per sample, anchor captured):

    1. After rollouts are scored, every rollout that the gate keeps (advantage > 0, Eq. 10) gets one
       information-preserving view I⁺ and one information-removing view I⁻ of each image its policy saw (`view_images`:
       all of them, tool and environment images included, or only the prompt's). A prompt's images get the same views
       in all its rollouts, derived from (seed, step, prompt) so resume and every rank reproduce them; a tool's image
       is seeded by its content. Occlusion cells are the image regions that become one vision token.
    2. The policy forward of TRL's loss is the anchor: its log-probs and entropies (and its last hidden states when
       `cpl_divergence="full"`) are captured, never recomputed. Only gated rows get the two extra passes: I⁻ gives
       the entropy shift ΔH and the top-K perception tokens (Eqs. 3-6), I⁺ the positive; the InfoNCE loss (Eq. 7) on
       those tokens is aggregated like the policy loss (Eqs. 8-9) and added as λ·CPL (Eq. 10). Full-vocabulary logits
       exist only for the selected positions, a chunk at a time, rebuilt in backward.

    Inherited unchanged: generation (transformers or vLLM), rewards, group advantages, the clipped policy loss of every
    `loss_type`, the reference KL (β, original image only), gradient accumulation, PEFT, eval, logging and Hub push.

    Relies on TRL 1.16's `_compute_loss(model, inputs)` computing the policy log-probs with exactly one
    `_get_per_token_logps_and_entropies(..., compute_entropy=True)` call, and the fused LM head calling the model's
    `base_model` (see `tests/test_trl_hooks.py`, which fails if they change).
    """

    _tag_names = ["trl", "grpo", "cppo"]
    _name = "CPPO"
    _metric_prefix = "cppo"
    _config_class = CPPOConfig
    _paper = {
        "title": "CPPO: Contrastive Perception Policy Optimization for VLM Agents",
        "id": "2601.00501",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{rezaei2026cppo,
                title        = {{CPPO: Contrastive Perception Policy Optimization for VLM Agents}},
                author       = {Rezaei, Ahmad and Gholami, Mohsen and Ranjbar Alvar, Saeed and Cannons, Kevin and Hossain, Mohammad Asiful and Zhou, Weimin and Zhou, Shunbo and Zhang, Yong and Akbari, Mohammad},
                journal      = {arXiv preprint arXiv:2601.00501},
                year         = 2026,
            }"""),
    }

    def _check_args(self, args: CPPOConfig) -> None:
        if args.cpl_weight > 0 and args.loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported by CPPOTrainer; use one of {POLICY_LOSS_TYPES}."
            )

    def __init__(self, model, reward_funcs=None, args: CPPOConfig | None = None, **kwargs):
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        args = self.args  # the default config when `args` was None
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
        self._perturbation_params = args.perturbation_params
        # Without an explicit patch size, occlusion cells are the regions the processor turns into one vision token.
        self._align_occlusion = args.occlusion_patch_size is None and self._pixel_budget is not None
        self._logit_scale, self._logit_softcap = _logit_transform(self._policy_lm(self.model).config)

    # ------------------------------------------------------------------ views at rollout time
    def _attach_views(self, rollouts, output) -> None:
        if self.args.cpl_weight > 0:
            output[VIEWS_KEY] = self._build_views(rollouts, output)

    def _build_views(self, rollouts: list[RolloutImages], output: dict) -> list:
        """Per rollout: the processed I⁺ and I⁻ of every image it saw (`SampleViews`), or None if it gets no CPL."""
        return build_sample_views(
            rollouts,
            output,
            self._gate(output["advantages"]).tolist(),
            self._make_view_images,
            self.processing_class,
            self._image_processor_only,
            self.args.view_images,
            **self.chat_template_kwargs,
        )

    def _make_view_images(self, rollout: RolloutImages, key: bytes) -> ViewImages:
        """I⁺ and I⁻ of the rollout: each image `view_images` selects replaced by its views, the others kept."""
        indices = [i for i, perturbed in enumerate(rollout.perturbed(self.args.view_images)) if perturbed]
        images = [to_rgb(rollout.images[i]) for i in indices]
        grids = [self._pixel_budget.token_grid(*image.size) if self._align_occlusion else None for image in images]
        drawn = make_views_for_sample(
            images,
            self._perturbation_params,
            self.args.seed,
            self.state.global_step,
            key,
            token_grids=grids,
            image_keys=[rollout.image_key(i) for i in indices],
        )
        preserved, removed = list(rollout.images), list(rollout.images)
        for index, views in zip(indices, drawn, strict=True):
            preserved[index], removed[index] = views.preserved, views.removed
        return ViewImages(
            images={PRESERVED: preserved, REMOVED: removed},
            transforms=[(v.preserving_name, v.removing_name) for v in drawn],
        )

    def _gate(self, advantages: torch.Tensor) -> torch.Tensor:
        advantages = advantages if advantages.dim() == 1 else advantages[:, 0]
        if self.args.advantage_gating:
            return advantages > 0  # (B,)
        return torch.ones_like(advantages, dtype=torch.bool)

    # ------------------------------------------------------------------ add λ·CPL to TRL's loss
    def _compute_loss(self, model, inputs):
        mode = self._mode
        rows = self._cpl_rows(inputs)
        passes = inputs.get(PASS_PLAN_KEY)  # agreed over the ranks; None with one process
        if rows.numel() == 0:
            loss = super()._compute_loss(model, inputs)
            if not passes:
                self._log_cpl_stats(mode, inputs, rows, {})
                return loss
            # Other ranks run view passes on this micro-batch: run as many on the dummy row, weighted by zero.
            grad_ctx = nullcontext() if self.args.cpl_grad_through_views else torch.no_grad()
            with grad_ctx:
                outputs = [out for _ in range(2 * passes) for out in self._dummy_forward(model, compute_entropy=True)]
            total = self._log_cpl_stats(mode, inputs, rows, {})
            return loss if total["nonfinite_skipped"] else loss + zero_weighted(outputs)
        with self.anchor_capture(need_hidden=self.args.cpl_divergence == "full") as anchor:
            loss = super()._compute_loss(model, inputs)
        cpl, stats, keep = self._contrastive_perception_loss(model, inputs, rows, anchor, mode, passes)
        total = self._log_cpl_stats(mode, inputs, rows, stats)
        if passes is not None and total["nonfinite_skipped"]:
            # Some rank's view was not finite: it cannot backpropagate through it, so no rank does (same passes).
            return loss
        loss = loss + self.args.cpl_weight * cpl
        return loss if keep is None else loss + keep

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

    def _view_passes(self, inputs) -> int:
        """Forwards per view on this micro-batch: its gated rows, `cpl_view_micro_batch_size` at a time."""
        rows = self._cpl_rows(inputs).numel()
        return 0 if rows == 0 else math.ceil(rows / (self.args.cpl_view_micro_batch_size or rows))

    def _view_pass(self, model, inputs, rows, which: str, need_hidden: bool, passes: int | None):
        """Passes of the gated rows with one view, `cpl_view_micro_batch_size` rows at a time, then dummy passes up to
        the `passes` the ranks agreed on; returns the rows' `ViewPass` and the dummies' outputs.

        With `cpl_view_checkpointing`, each micro-batch is one checkpointed region: its activations are dropped after
        the forward and rebuilt in backward, so the views hold one micro-batch of activations instead of all gated
        rows', for one more forward of the gated rows.
        """
        size = self.args.cpl_view_micro_batch_size or rows.numel()
        checkpointed = self.args.cpl_view_checkpointing and torch.is_grad_enabled()
        # The recompute runs inside backward: call the bare module, not a DDP wrapper that would re-arm its reducer.
        module = self.accelerator.unwrap_model(model) if checkpointed else model
        forward = _as_tuple(self._view_forward)
        parts = []
        for start in range(0, rows.numel(), size):
            args = (
                module,
                inputs,
                inputs[VIEWS_KEY],
                rows[start : start + size],
                which,
                which == REMOVED,
                need_hidden,
            )
            parts.append(checkpoint(forward, *args, use_reentrant=False) if checkpointed else forward(*args))
        logps, entropies, hidden = (None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))
        missing = 0 if passes is None else passes - len(parts)
        dummies = [out for _ in range(missing) for out in self._dummy_forward(model, compute_entropy=which == REMOVED)]
        return ViewPass(logps, entropies, hidden), dummies

    def _contrastive_perception_loss(self, model, inputs, rows, anchor: AnchorCapture, mode: str, passes: int | None):
        """(λ-free CPL, its statistics, a zero-weighted term or None).

        With several processes (`passes` agreed), every pass that ran stays in the backward graph: when no token is
        selected, the preserved view still runs and both enter the loss multiplied by zero, so that every rank
        backpropagates through as many passes. A non-finite view instead drops the micro-batch's CPL on every rank
        (`_compute_loss`), since backpropagating through it, even with weight zero, would turn gradients into NaN."""
        args = self.args
        full = args.cpl_divergence == "full"
        mask = self._loss_mask(inputs)[rows]  # (R, T)
        grad_ctx = nullcontext() if args.cpl_grad_through_views else torch.no_grad()
        with grad_ctx:
            removed, kept = self._view_pass(model, inputs, rows, REMOVED, full, passes)
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
        if not selected.any() and passes is None:
            return zero, stats, None
        with grad_ctx:
            preserved, dummies = self._view_pass(model, inputs, rows, PRESERVED, full, passes)
        kept += dummies
        unused = [removed.logps, removed.entropies, preserved.logps, *kept]  # the passes, should CPL not use them
        if not selected.any():
            return zero, stats, zero_weighted(unused)

        positions = selected.nonzero(as_tuple=True)  # N selected (row, t) pairs
        if full:
            anchor_hidden = _completion_hidden(anchor.hidden[rows], mask.size(1))
            per_token, d_pos, d_neg = self._full_cpl_at(model, anchor_hidden, preserved, removed, positions)
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
            return zero, stats, None
        cpl = self._aggregate(per_token, positions, rows, inputs, mode)
        stats["cpl_loss"] = cpl.detach() * (self.current_gradient_accumulation_steps if mode == "train" else 1)
        return cpl, stats, zero_weighted(kept)

    def _full_cpl_at(self, model, anchor_hidden, preserved: ViewPass, removed: ViewPass, positions):
        """InfoNCE with full-vocabulary KL at the selected positions only, `cpl_chunk_size` positions at a time.

        Each chunk is checkpointed, so its three (chunk, V) logits are freed after the forward and rebuilt in backward.
        """
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
        if self.args.cpl_aggregation == "selected_tokens":  # released: token-mean over the selected tokens
            return per_token.mean() / (self.current_gradient_accumulation_steps if mode == "train" else 1)
        mask = self._loss_mask(inputs)
        row_sums = mask.new_zeros(mask.size(0), dtype=per_token.dtype).index_add(0, rows[positions[0]], per_token)
        return self._aggregate_like_policy_loss(row_sums, inputs, mode)

    def _log_cpl_stats(self, mode: str, inputs, rows, stats: dict) -> dict[str, float]:
        """One collective per micro-batch, identical on every rank whatever its rows, then ratios of global sums;
        returns the global sums (every rank sees the same, so decisions taken on them agree)."""
        mask = self._loss_mask(inputs)
        stats = {
            **stats,
            "rows": mask.size(0),
            "gated_rows": self._gate(inputs["advantages"]).sum(),
            "extra_pass_rows": rows.numel(),
            "completion_tokens": mask.sum(),
        }
        total = self._reduce_sums(stats, _STATS)
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
        return total


def _as_tuple(view_forward):
    """`checkpoint` needs a function returning tensors (or tuples of them), not a dataclass."""

    def forward(*args):
        part = view_forward(*args)
        return part.logps, part.entropies, part.hidden

    return forward


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
