"""`PAPOTrainer`: TRL's `GRPOTrainer` plus PAPO's implicit perception loss, on the shared perception rails."""

import textwrap

import torch
from trl.models.utils import disable_gradient_checkpointing

from cppo_trl.core.images import to_rgb
from cppo_trl.core.masking import blacken_patches, patch_mask
from cppo_trl.core.perception import papo_token_terms
from cppo_trl.core.perturbations import view_seed
from cppo_trl.trainer.papo_config import PAPOConfig
from cppo_trl.trainer.perception_grpo_trainer import PerceptionGRPOTrainer
from cppo_trl.trainer.views import RolloutImages, SampleViews, ViewImages, build_sample_views


MASKED = "masked"
"""Name of PAPO's one view in `cppo_trl.trainer.views.SampleViews`."""
MASKED_LOGPS_KEY = "papo_masked_logps"
"""(B, T) log-probs of the sampled tokens with the masked image (NaN for rows without image), in the generation batch."""
HAS_MASKED_VIEW_KEY = "papo_has_masked_view"
"""(B,) bool: the row's prompt has at least one image, so `MASKED_LOGPS_KEY` holds its masked pass."""
MASK_CELLS_KEYS = ("papo_masked_cells", "papo_total_cells")
"""0-dim counts of blackened and total cells over the generation batch's distinct images (TRL keeps 0-dim tensors
whole through its shuffle/split, so every micro-batch carries the batch's totals)."""

# Order of the per-micro-batch statistics reduced across processes in one collective.
_STATS = (
    "papo_loss",
    "kl_sum",
    "kl_tokens",
    "nll_sum",
    "loss_tokens",
    "masked_logp_sum",
    "nonfinite_masked_tokens",
    "masked_view_rows",
    "masked_cells",
    "total_cells",
)


class PAPOTrainer(PerceptionGRPOTrainer):
    """
    Trainer for PAPO (Perception-Aware Policy Optimization): GRPO plus an implicit perception loss, faithful to the
    authors' released EasyR1 code (docs/papo.md).

    What differs from [`~trl.GRPOTrainer`], on the rails of [`PerceptionGRPOTrainer`] (images in RGB, per-rollout
    views of every image the policy saw, anchor captured):

    1. After rollouts are scored, each image a rollout saw (`view_images`: all, tool and environment images
       included, or only the prompt's) is masked before the processor resizes it, as the authors mask the raw image:
       a grid of `mask_patch_size` px cells, each blackened with probability `mask_ratio`. A prompt's images get one
       mask shared by its rollouts, seeded from (seed, step, prompt, image index), so it is redrawn when the prompt
       comes back and a resumed run or another rank rebuilds it; a tool's image is seeded by its content.
    2. Still at rollout time, once per generation batch, without gradient and with the pre-update policy at the
       rollout temperature, one batched teacher-forced pass gives the masked log-prob a_t of every sampled token
       (`per_device_train_batch_size` rows at a time, like TRL's own old-log-prob pass). Only a_t is kept, as a
       (B, T) tensor that TRL's shuffle/split carries with the rows; all `num_iterations` reuse it.
    3. The loss adds −γ·M[k3(l_t, a_t)] + η·M[−l_t] over every completion token of every rollout (no gating, no token
       selection), with l_t the log-probs of TRL's own policy forward (captured, not recomputed), k3 the clamped
       `low_var_kl` estimate and M aggregated exactly like the policy loss for `loss_type` (and gradient
       accumulation). Tokens whose a_t is not finite are dropped from the KL term and counted.

    Inherited unchanged: generation (transformers or vLLM), rewards, group advantages, the clipped policy loss of every
    `loss_type`, the reference KL (β, original image only), gradient accumulation, PEFT, eval, logging and Hub push.
    With γ = η = 0 the trainer is GRPO bit for bit. The authors' second entropy term (on the masked image) has no
    gradient in their code; it is logged as `papo/masked_logp`, never added.

    Relies on TRL 1.16's `_compute_loss(model, inputs)` computing the policy log-probs with exactly one
    `_get_per_token_logps_and_entropies` call, and on `_prepare_inputs` shuffling/splitting every tensor of the
    generation batch by rows (see `tests/test_trl_hooks.py`).
    """

    _tag_names = ["trl", "grpo", "papo"]
    _name = "PAPO"
    _metric_prefix = "papo"
    _config_class = PAPOConfig
    _paper = {
        "title": "Perception-Aware Policy Optimization for Multimodal Reasoning",
        "id": "2507.06448",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{wang2025perception,
                title        = {{Perception-Aware Policy Optimization for Multimodal Reasoning}},
                author       = {Wang, Zhenhailong and Guo, Xuehang and Stoica, Sofia and Xu, Haiyang and Wang, Hongru and Ha, Hyeonjeong and Chen, Xiusi and Chen, Yangyi and Yan, Ming and Huang, Fei and others},
                journal      = {arXiv preprint arXiv:2507.06448},
                year         = 2025,
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: PAPOConfig | None = None, **kwargs):
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._cell_counts = [0, 0]  # blackened, total: over the distinct images of the batch being masked

    # ------------------------------------------------------------------ the masked pass at rollout time
    def _attach_views(self, rollouts, output) -> None:
        if self.args.perception_loss_weight == 0:
            return  # η alone reads only the policy's own log-probs
        self._cell_counts = [0, 0]
        views = build_sample_views(
            rollouts,
            output,
            [True] * len(rollouts),
            self._make_masked_images,
            self.processing_class,
            self._image_processor_only,
            self.args.view_images,
            **self.chat_template_kwargs,
        )
        output[MASKED_LOGPS_KEY], output[HAS_MASKED_VIEW_KEY] = self._masked_logps(output, views)
        device = output["completion_ids"].device
        for key, count in zip(MASK_CELLS_KEYS, self._cell_counts, strict=True):
            output[key] = torch.tensor(float(count), device=device)

    def _make_masked_images(self, rollout: RolloutImages, key: bytes) -> ViewImages:
        """The rollout's images with each one `view_images` selects masked as the authors mask the raw image (in RGB,
        before the processor resizes it); the others kept."""
        prompt_seed = view_seed(self.args.seed, self.state.global_step, key)
        masked, count = list(rollout.images), 0
        for index, perturbed in enumerate(rollout.perturbed(self.args.view_images)):
            if not perturbed:
                continue
            rgb = to_rgb(rollout.images[index])
            cells = patch_mask(
                rgb.width,
                rgb.height,
                self.args.mask_patch_size,
                self.args.mask_ratio,
                view_seed(prompt_seed, rollout.image_key(index), b"papo-mask"),
            )
            self._cell_counts[0] += int(cells.sum())
            self._cell_counts[1] += cells.size
            masked[index] = blacken_patches(rgb, cells, self.args.mask_patch_size)
            count += 1
        return ViewImages(images={MASKED: masked}, transforms=[("patch_blackening",)] * count)

    def _masked_logps(self, output: dict, views: list[SampleViews | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass of every row with an image, its masked view in place of the images, in chunks of TRL's
        micro-batch size; returns (B, T) log-probs (NaN on rows without image) and the (B,) rows that have them.

        With several processes the ranks first agree on the number of chunks (one collective per generation batch), and
        a rank with fewer image rows runs the rest on the dummy row (`rank_sync`): under ZeRO-3 every forward gathers."""
        completion_ids = output["completion_ids"]
        device = completion_ids.device
        has_view = torch.tensor([view is not None for view in views], device=device)
        masked = torch.full(completion_ids.shape, float("nan"), device=device)
        rows = has_view.nonzero(as_tuple=True)[0]
        train = self._mode == "train"
        size = self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size
        chunks = [rows[start : start + size] for start in range(0, rows.numel(), size)]
        passes = self._agreed_passes(len(chunks))
        # As TRL 1.16's old-log-prob pass: no gradient, checkpointing off, the model as it was when it generated.
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for chunk in chunks:
                masked[chunk] = self._view_forward(self.model, output, views, chunk, MASKED).logps.float()
            for _ in range(passes - len(chunks)):
                self._dummy_forward(self.model)
        return masked, has_view

    # ------------------------------------------------------------------ add the PAPO terms to TRL's loss
    def _compute_loss(self, model, inputs):
        if not self.args.papo_enabled:
            return super()._compute_loss(model, inputs)
        mode = self._mode
        with self.anchor_capture(need_hidden=False) as anchor:
            loss = super()._compute_loss(model, inputs)
        papo_loss, stats = self._perception_loss(inputs, anchor.logps, mode)
        self._log_papo_stats(mode, inputs, stats)
        return loss + papo_loss

    def _perception_loss(self, inputs, policy_logps: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict]:
        """−γ·M[k3(l, a)] + η·M[−l] over the loss tokens, M aggregated like the policy loss (docs/papo.md)."""
        args = self.args
        mask = self._loss_mask(inputs)  # (B, T)
        masked_logps = inputs.get(MASKED_LOGPS_KEY)
        has_view = inputs.get(HAS_MASKED_VIEW_KEY)
        if masked_logps is None:  # γ = 0, or a batch without any image
            masked_logps = torch.full_like(policy_logps, float("nan"))
            has_view = torch.zeros(mask.size(0), dtype=torch.bool, device=mask.device)
        kl_prc, nll, kl_mask = papo_token_terms(policy_logps, masked_logps, mask)  # (B, T) each
        row_sums = -args.perception_loss_weight * kl_prc.sum(-1) + args.der_loss_weight1 * nll.sum(-1)  # (B,)
        papo_loss = self._aggregate_like_policy_loss(row_sums, inputs, mode)
        view_tokens = (mask != 0) & has_view.unsqueeze(1)  # (B, T)
        stats = {
            "papo_loss": papo_loss.detach() * (self.current_gradient_accumulation_steps if mode == "train" else 1),
            "kl_sum": kl_prc.detach().sum(),
            "kl_tokens": kl_mask.sum(),
            "nll_sum": nll.detach().sum(),
            "loss_tokens": (mask != 0).sum(),
            "masked_logp_sum": torch.where(kl_mask, masked_logps, 0.0).sum(),
            "nonfinite_masked_tokens": (view_tokens & ~torch.isfinite(masked_logps)).sum(),
            "masked_view_rows": has_view.sum(),
        }
        for name, key in zip(("masked_cells", "total_cells"), MASK_CELLS_KEYS, strict=True):
            if key in inputs:
                stats[name] = inputs[key]
        return papo_loss, stats

    def _log_papo_stats(self, mode: str, inputs, stats: dict) -> None:
        """One collective per micro-batch, identical on every rank whatever its rows, then ratios of global sums."""
        total = self._reduce_sums(stats, _STATS)
        metrics = self._metrics[mode]
        metrics["papo/loss"].append(total["papo_loss"] / self.accelerator.num_processes)
        metrics["papo/nonfinite_masked_tokens"].append(total["nonfinite_masked_tokens"])
        metrics["papo/masked_view_rows"].append(total["masked_view_rows"])
        if total["loss_tokens"] > 0:
            metrics["papo/entropy"].append(total["nll_sum"] / total["loss_tokens"])
        if total["kl_tokens"] > 0:
            metrics["papo/kl_prc"].append(total["kl_sum"] / total["kl_tokens"])
            metrics["papo/masked_logp"].append(total["masked_logp_sum"] / total["kl_tokens"])
        if total["total_cells"] > 0:
            metrics["papo/masked_fraction"].append(total["masked_cells"] / total["total_cells"])
