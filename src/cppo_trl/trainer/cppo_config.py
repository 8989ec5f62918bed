"""`CPPOConfig`: GRPO's configuration plus the fields of the Contrastive Perception Loss."""

import math
from dataclasses import dataclass, field, fields

from cppo_trl.core.perception import CPL_AGGREGATIONS, CPL_DIVERGENCES, PERCEPTION_K_RULES, PERCEPTION_SCORES
from cppo_trl.core.perturbations import PRESERVING_PERTURBATIONS, REMOVING_PERTURBATIONS, PerturbationParams
from cppo_trl.trainer.perception_grpo_config import PerceptionGRPOConfig


CPPO_PRESETS = ("paper", "released")

# Every point where the paper's text and the authors' released verl code differ (docs/method.md, paper or released code). A field left at `None`
# takes its value from the chosen preset; a value the user sets explicitly wins.
PRESET_VALUES: dict[str, dict[str, object]] = {
    "paper": {
        "cpl_weight": 0.02,
        "perception_score": "raw",
        "perception_k_rule": "exact",
        "cpl_divergence": "full",
        "cpl_aggregation": "all_tokens",
        "preserving_perturbations": ["color_jitter", "perspective", "rotation", "gaussian_blur"],
        "removing_perturbations": ["patch_occlusion", "zoom_crop"],
        "zoom_crop_side_range": [math.sqrt(0.3), math.sqrt(0.3)],
    },
    "released": {
        "cpl_weight": 0.01,
        "perception_score": "normalized",
        "perception_k_rule": "float32",
        "cpl_divergence": "k3",
        "cpl_aggregation": "selected_tokens",
        "preserving_perturbations": ["color_jitter", "perspective", "rotation"],
        "removing_perturbations": ["noise_rectangles", "zoom_crop"],
        "zoom_crop_side_range": [0.6, 0.7],
    },
}

# Fields copied verbatim into `PerturbationParams` (same names on both sides: one source of truth).
PERTURBATION_FIELDS = tuple(f.name for f in fields(PerturbationParams))


@dataclass
class CPPOConfig(PerceptionGRPOConfig):
    r"""
    Configuration for [`CPPOTrainer`]: every [`~trl.GRPOConfig`] field plus those below.

    Defaults follow the CPPO paper's text; `cppo_preset="released"` switches every point where the authors' released
    code differs (docs/method.md, paper or released code) at once. Fields marked *preset* default to `None` and are filled from the preset; set them
    explicitly to override it.

    Parameters:
        > Contrastive Perception Loss (paper Eqs. 7-10)

        cppo_preset (`str`, defaults to `"paper"`): `"paper"` or `"released"`.
        cpl_weight (`float`, *preset*): λ; paper 0.02, released 0.01. `0` gives exactly GRPO.
        cpl_temperature (`float`, defaults to `0.1`): τ of the InfoNCE loss.
        cpl_divergence (`str`, *preset*): `"full"` KL over the vocabulary (paper) or `"k3"` on the sampled token
            (released).
        cpl_aggregation (`str`, *preset*): `"all_tokens"` (paper Eq. 9, aggregated like the policy loss) or
            `"selected_tokens"` (released: mean over selected tokens).
        advantage_gating (`bool`, defaults to `True`): CPL only on rollouts with advantage > 0.
        cpl_grad_through_views (`bool`, defaults to `True`): backpropagate through the perturbed passes.
        cpl_view_checkpointing (`bool`, defaults to `False`): recompute the perturbed passes in backward.
        cpl_view_micro_batch_size (`int`, *optional*): rows per perturbed forward (default: all gated rows).
        cpl_chunk_size (`int`, defaults to `256`): positions per chunk for `"full"` KL logits.

        > Perception-token selection (paper Eqs. 3-6)

        perception_token_selection (`bool`, defaults to `True`): `False` applies CPL to every completion token.
        perception_top_fraction (`float`, defaults to `0.5`): K, fraction of positive-ΔH tokens kept.
        perception_score (`str`, *preset*): `"raw"` ΔH or `"normalized"` relu(ΔH)/H(I⁻).
        perception_k_rule (`str`, *preset*): how k = K·n⁺ is rounded down: `"exact"` floor (paper) or the
            released code's `"float32"` product then truncation.

        > Perturbations (paper §4.1 and §7; see `cppo_trl.core.perturbations`)

        preserving_perturbations, removing_perturbations (`list[str]`, *preset*) and the transform parameters
        `occlusion_ratio`, `occlusion_patch_size`, `zoom_crop_side_range` (*preset*), `noise_rectangles_count`,
        `noise_rectangles_size_range`, `color_jitter_brightness`, `color_jitter_contrast`, `color_jitter_saturation`,
        `perspective_distortion`, `perspective_probability`, `rotation_degrees`, `gaussian_blur_kernel_size`,
        `gaussian_blur_sigma`, `gaussian_noise_std`.

        > GRPO defaults changed to the paper's (Table 8)

        beta (`float`, defaults to `0.01`), num_generations (`int`, defaults to `5`), per_device_train_batch_size
        (`int`, defaults to `10`, two groups of 5).
    """

    cppo_preset: str = field(
        default="paper",
        metadata={
            "help": "Which reference the preset fields follow: 'paper' (the paper's text) or 'released' (the "
            "authors' released verl code). Explicitly set fields win over the preset.",
            "choices": list(CPPO_PRESETS),
        },
    )
    cpl_weight: float | None = field(
        default=None,
        metadata={"help": "λ, weight of the Contrastive Perception Loss (Eq. 10). Preset: paper 0.02, released 0.01."},
    )
    cpl_temperature: float = field(
        default=0.1,
        metadata={"help": "τ, temperature of the InfoNCE loss (Eq. 7). Paper Table 8 and released code: 0.1."},
    )
    cpl_divergence: str | None = field(
        default=None,
        metadata={
            "help": "Divergence D in the CPL: 'full' KL(anchor‖view) over the vocabulary (paper) or 'k3', the "
            "clamped sampled-token estimate (released code). Preset.",
            "choices": list(CPL_DIVERGENCES),
        },
    )
    cpl_aggregation: str | None = field(
        default=None,
        metadata={
            "help": "'all_tokens': masked CPL terms aggregated over all completion tokens exactly like the policy "
            "loss (paper Eq. 9); 'selected_tokens': mean over the selected tokens (released code). Preset.",
            "choices": list(CPL_AGGREGATIONS),
        },
    )
    advantage_gating: bool = field(
        default=True,
        metadata={"help": "Apply CPL only to rollouts with strictly positive advantage (Eq. 10). Paper and released."},
    )
    cpl_grad_through_views: bool = field(
        default=True,
        metadata={
            "help": "Backpropagate through the two perturbed forward passes (paper and released). False runs them "
            "without gradient: cheaper in time and memory, but the CPL then only moves the anchor distribution."
        },
    )
    cpl_view_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the two perturbed passes in backward instead of keeping their activations "
            "(torch.utils.checkpoint per cpl_view_micro_batch_size rows): the views then hold one micro-batch of "
            "activations, for one more forward of the gated rows. Same gradients."
        },
    )
    cpl_view_micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per perturbed forward (None: all gated rows of the micro-batch at once)."},
    )
    cpl_chunk_size: int = field(
        default=256,
        metadata={
            "help": "Selected positions per chunk when cpl_divergence='full': vocabulary logits are only built for "
            "that many positions at a time (and rebuilt in backward), never for a whole view."
        },
    )
    perception_token_selection: bool = field(
        default=True,
        metadata={
            "help": "Select perception tokens by entropy shift (Eqs. 3-6). False applies CPL to every completion "
            "token (the paper's 'CPL on all tokens' ablation, Table 2)."
        },
    )
    perception_top_fraction: float = field(
        default=0.5,
        metadata={
            "help": "K: fraction of the positive-ΔH tokens of each response kept, k = max(1, floor(K·n⁺)). 1.0 keeps "
            "every token with ΔH > 0. Paper Table 8 and released: 0.5."
        },
    )
    perception_score: str | None = field(
        default=None,
        metadata={
            "help": "Ranking score for top-K: 'raw' ΔH (paper) or 'normalized' relu(ΔH)/(H(I⁻)+1e-6) (released). "
            "Preset.",
            "choices": list(PERCEPTION_SCORES),
        },
    )
    perception_k_rule: str | None = field(
        default=None,
        metadata={
            "help": "How k = K·n⁺ is rounded down: 'exact' floor of K (read as written, e.g. 0.35) times n⁺ (paper), "
            "or 'float32': the released code's float32 product then truncation, which is one lower for some "
            "(n⁺, K), e.g. K 0.84 and n⁺ 75 give 62 instead of 63 (K 0.5 never differs). Preset.",
            "choices": list(PERCEPTION_K_RULES),
        },
    )
    preserving_perturbations: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Information-preserving transforms, one drawn per image per step. Choices: "
            f"{', '.join(PRESERVING_PERTURBATIONS)}. Preset: paper color_jitter, perspective, rotation, "
            "gaussian_blur; released drops gaussian_blur."
        },
    )
    removing_perturbations: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Information-removing transforms, one drawn per image per step. Choices: "
            f"{', '.join(REMOVING_PERTURBATIONS)}. Preset: paper patch_occlusion, zoom_crop; released "
            "noise_rectangles, zoom_crop."
        },
    )
    occlusion_ratio: float = field(
        default=0.8, metadata={"help": "Fraction of patches blacked out by patch_occlusion (paper: 80%%)."}
    )
    occlusion_patch_size: int | None = field(
        default=None,
        metadata={
            "help": "Side in pixels of an occlusion patch. None: one merged vision token of the processor's grid "
            "(patch x merge size: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), on which images arrive, so a patch hides "
            "exactly one token; 28 for processors without such a grid."
        },
    )
    zoom_crop_side_range: list[float] | None = field(
        default=None,
        metadata={
            "help": "Range of the fraction of each side kept by zoom_crop before resizing back. Preset: paper "
            "[0.5477, 0.5477] (30%% of the area), released [0.6, 0.7]."
        },
    )
    noise_rectangles_count: int = field(
        default=50, metadata={"help": "Number of random-noise rectangles (released code: 50)."}
    )
    noise_rectangles_size_range: list[float] = field(
        default_factory=lambda: [0.05, 0.15],
        metadata={"help": "Side of each noise rectangle as a fraction of the image side (released: 5-15%%)."},
    )
    color_jitter_brightness: list[float] = field(
        default_factory=lambda: [0.2, 1.3], metadata={"help": "Brightness factor range (released code)."}
    )
    color_jitter_contrast: list[float] = field(
        default_factory=lambda: [0.2, 1.8], metadata={"help": "Contrast factor range (released code)."}
    )
    color_jitter_saturation: list[float] = field(
        default_factory=lambda: [0.2, 1.8], metadata={"help": "Saturation factor range (released code)."}
    )
    perspective_distortion: float = field(
        default=0.2, metadata={"help": "Distortion scale of the random perspective (released code: 0.2)."}
    )
    perspective_probability: float = field(
        default=0.5, metadata={"help": "Probability that the perspective transform is applied (released: 0.5)."}
    )
    rotation_degrees: float = field(
        default=10.0, metadata={"help": "Rotation angle drawn in [-d, d] degrees (released code: 10)."}
    )
    gaussian_blur_kernel_size: int = field(default=5, metadata={"help": "Gaussian blur kernel size (odd)."})
    gaussian_blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0], metadata={"help": "Gaussian blur sigma range."}
    )
    gaussian_noise_std: float = field(
        default=0.05, metadata={"help": "Std of the additive Gaussian noise on the [0, 1] pixel scale."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.cppo_preset not in CPPO_PRESETS:
            raise ValueError(f"cppo_preset must be one of {CPPO_PRESETS}, got {self.cppo_preset!r}.")
        for name, value in PRESET_VALUES[self.cppo_preset].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)

        if not (isinstance(self.cpl_weight, int | float) and math.isfinite(self.cpl_weight) and self.cpl_weight >= 0):
            raise ValueError(f"cpl_weight must be a finite number >= 0, got {self.cpl_weight!r}.")
        if not (math.isfinite(self.cpl_temperature) and self.cpl_temperature > 0):
            raise ValueError(f"cpl_temperature must be > 0, got {self.cpl_temperature!r}.")
        if not 0 < self.perception_top_fraction <= 1:
            raise ValueError(f"perception_top_fraction must be in (0, 1], got {self.perception_top_fraction!r}.")
        if self.cpl_view_micro_batch_size is not None and self.cpl_view_micro_batch_size < 1:
            raise ValueError(
                f"cpl_view_micro_batch_size must be >= 1 or None, got {self.cpl_view_micro_batch_size!r}."
            )
        if self.cpl_chunk_size < 1:
            raise ValueError(f"cpl_chunk_size must be >= 1, got {self.cpl_chunk_size!r}.")
        for name, choices in (
            ("perception_score", PERCEPTION_SCORES),
            ("perception_k_rule", PERCEPTION_K_RULES),
            ("cpl_divergence", CPL_DIVERGENCES),
            ("cpl_aggregation", CPL_AGGREGATIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        _ = self.perturbation_params  # validates every transform name and parameter, naming the field in the error

    @property
    def perturbation_params(self) -> PerturbationParams:
        """The perturbation fields as the frozen, validated `PerturbationParams` the view builder takes."""
        values = {name: getattr(self, name) for name in PERTURBATION_FIELDS}
        if values["occlusion_patch_size"] is None:  # the trainer aligns it to the processor's token grid
            del values["occlusion_patch_size"]
        return PerturbationParams(**values)
